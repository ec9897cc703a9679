"""Benchmark scripts (each writes JSON results and a Markdown table; see BENCHMARKS.md)."""
