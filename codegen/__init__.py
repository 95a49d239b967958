"""Lowering of a :class:`linattn.Spec` to specialised chunkwise Triton kernels.

Not built yet: this package is empty, and nothing imports it.
"""
