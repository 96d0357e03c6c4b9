"""Benchmarks that need no model: load generators and simulated clusters (``lmcache-disagg bench``)."""
