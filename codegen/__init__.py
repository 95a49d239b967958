"""Lowering of a :class:`linattn.Spec` to specialised chunkwise Triton kernels.

``make_plan`` decides the stages and tiles; ``generate`` emits the module source
(one file per plan) and ``load`` caches it on disk and imports it. Nothing here touches
tensors: launching is :mod:`linattn.compile`'s job.
"""
from . import tuning
from .cache import cache_dir, load
from .forward import Kernel, forward_kernels
from .module import generate
from .plan import CODEGEN_VERSION, Options, Plan, make_plan

__all__ = ["Options", "Plan", "make_plan", "Kernel", "forward_kernels", "generate", "load", "cache_dir", "CODEGEN_VERSION", "tuning"]
