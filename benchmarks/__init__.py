"""Benchmarks of osrt-fast, run as modules from the repository root: speed/, gpu/, learning/
(benchmarks/README.md)."""
