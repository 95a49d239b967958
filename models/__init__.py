"""Nemotron-H, Qwen3-Next and Kimi Linear assembled from linattn ops.

Not built yet: this package is empty, and nothing imports it.
"""
