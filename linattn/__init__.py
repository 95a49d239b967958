"""linattn: linear-attention recurrences described as specs, compiled to chunkwise kernels.

A :class:`Spec` describes a recurrence by its terms (decay, correction, gating); the
:mod:`linattn.specs` module holds the built-in ones (Mamba-2, GDN, KDA, GLA, DeltaNet,
plain linear attention) and the fused forms the hybrid models call.
:func:`compile` lowers a spec to specialised chunkwise Triton kernels.
"""
from . import gates, specs
from .spec import Correction, Decay, Operand, OutputGate, Role, Skip, Spec, Term, term
from .op import CompiledOp, compile  # noqa: A004 (linattn.compile is the public name)
from . import ops  # noqa: E402 (the drop-in ops need compile)

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
