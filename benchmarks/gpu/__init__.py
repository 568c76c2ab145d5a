"""The one GPU run: the suite, what the GPU machine needs, and the report of its results
(benchmarks/README.md, docs/GPU.md)."""
