"""Benchmark programs (imported as tensafe.benchmarks); each writes JSON under benchmarks/results."""
