"""Benchmarks: ``python -m brainmt.bench.loader``; the model benchmark follows (issue 9)."""
