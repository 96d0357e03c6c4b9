"""lmcache_disagg.connector"""
