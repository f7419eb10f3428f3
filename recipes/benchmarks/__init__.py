"""Benchmarks: attention strategies and layouts, kernels, decode, memory, the data pipeline."""
