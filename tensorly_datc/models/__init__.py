"""Reference network architectures used by the examples and benchmarks."""
