"""Benchmarks of the generated kernels against fla, mamba_ssm and SDPA."""
