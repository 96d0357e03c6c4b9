"""Benchmarks and their tooling (stub workers, load generators); not imported by the runtime."""
