"""lmcache_disagg.proxy"""
