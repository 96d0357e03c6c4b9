"""lmcache_disagg.kernels"""
