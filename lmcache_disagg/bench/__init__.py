"""Benchmarks and their tooling (load generators, stub workers), apart from the product code."""
