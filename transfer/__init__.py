"""lmcache_disagg.transfer"""
