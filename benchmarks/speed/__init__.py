"""Speed and memory benchmarks: training step, training loop, kernels, activation memory,
loaders, viewer frame rate (benchmarks/README.md)."""
