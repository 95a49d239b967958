"""Nemotron-H, Qwen3-Next and Kimi Linear assembled from linattn ops.

Built so far: the short causal convolution with its decode state (:mod:`models.conv`).
The model families themselves are not built yet.
"""
