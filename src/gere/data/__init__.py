"""Benchmark data built from public sources: `gere.data.cl15`."""
