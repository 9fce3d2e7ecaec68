"""The sections of benchmarks/gpu_check.py, one module per concern (docs/gpu.md says what each figure means)."""
