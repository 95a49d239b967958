"""linattn: linear-attention recurrences described as specs, compiled to chunkwise kernels.

A :class:`Spec` describes a recurrence by its terms (decay, correction, gating); the
:mod:`linattn.specs` module holds the built-in ones (Mamba-2, GDN, KDA, GLA, DeltaNet,
plain linear attention) and the fused forms the hybrid models call.
:func:`compile` lowers a spec to specialised chunkwise Triton kernels.

Layers, each importing only those before it: the DSL (``spec``, ``expr``, ``gates``,
``specs``: sympy, no torch) ← the compiler (``linattn.codegen``: source text, no tensors) ←
the runtime (``op``, ``custom_ops``, ``ops``, ``runtime``: torch and Triton) ← the oracles
(``linattn.reference``) and the models (``linattn.models``). Importing ``linattn`` loads the
DSL alone; the runtime loads on first use of :func:`compile`, :class:`CompiledOp` or
:mod:`linattn.ops` (PEP 562), so ``import linattn.codegen`` neither imports torch nor
registers a custom op.
"""
from __future__ import annotations

import importlib
from typing import Any

from . import gates, specs
from .spec import Correction, Decay, Operand, OutputGate, Role, Skip, Spec, Term, term

__all__ = [
    "Spec",
    "Term",
    "Operand",
    "Decay",
    "Correction",
    "Skip",
    "OutputGate",
    "Role",
    "term",
    "compile",
    "CompiledOp",
    "specs",
    "gates",
    "ops",
]
__version__ = "0.1.0"

#: names loaded on first use, with the module that holds them
_LAZY = {"compile": ".op", "CompiledOp": ".op", "ops": ".ops"}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'linattn' has no attribute {name!r}")
    module = importlib.import_module(_LAZY[name], __name__)
    value = module if name == "ops" else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
