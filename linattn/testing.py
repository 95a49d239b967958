"""Random arguments and error measures for checking an implementation of a spec.

Used by the project's tests, its demo and its benchmarks, so that "a plausible call of
this spec" means the same everywhere.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .spec import OutputGate, Role, Skip, Spec

__all__ = ["rel_err", "Inputs", "random_inputs"]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in float64; NaN or inf anywhere gives inf."""
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return math.inf
    denom = ref.norm().item()
    err = (out - ref).norm().item()
    return err / denom if denom > 0 else err


@dataclass
class Inputs:
    """A call's arguments: positional q, k, v and keyword arguments for the spec."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    kwargs: dict = field(default_factory=dict)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor argument that can carry a gradient, by name."""
        out = {"q": self.q, "k": self.k, "v": self.v}
        for name, x in self.kwargs.items():
            if isinstance(x, torch.Tensor) and x.is_floating_point():
                out[name] = x
        return out

    def requires_grad_(self) -> Inputs:
        for x in self.tensors().values():
            x.requires_grad_(True)
        return self


def _operand_value(name: str, role: Role, shape, gen, dtype, strength: float):
    def U(lo, hi):
        return torch.rand(shape, generator=gen, dtype=torch.float64).mul(hi - lo).add(lo).to(dtype)

    if role is Role.SCALAR:
        return {"lower_bound": -5.0, "dt_min": 0.05, "dt_max": 0.8}.get(name, 1.0)
    if name == "g":
        return U(-strength, 0.0)
    if name == "beta":
        return U(0.0, 1.0)
    if name == "dt":
        return U(0.01, 1.0)
    if name == "A":
        return U(-4.0, -0.5)
    if name == "A_log":
        return U(0.0, 2.5)
    if name == "g_gamma":
        return U(-1.0, 0.0)
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)


def random_inputs(
    spec: Spec,
    *,
    B: int = 2,
    T: int = 50,
    H: int = 2,
    HV: int | None = None,
    K: int = 16,
    V: int = 8,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
    strength: float = 1.0,
    lengths: list[int] | None = None,
    h0: bool = False,
) -> Inputs:
    """Fresh random arguments for ``spec``: q, k, v, every operand the spec reads and its
    correction's inputs (Comba's ``p``; DPLR's ``a``, ``b``).

    Gates are drawn in ``(-strength, 0)`` per token, β in ``(0, 1)``, Mamba's ``dt`` in
    ``(0.01, 1)`` and ``A`` in ``(-4, -0.5)``; other operands are standard normal.
    ``lengths`` packs sequences (B = 1, ``cu_seqlens``); ``h0`` adds an initial state.
    """
    gen = torch.Generator().manual_seed(seed)
    HV = HV or H
    if lengths is not None:
        B, T = 1, sum(lengths)

    def randn(*shape):
        return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)

    q = randn(B, T, H, K)
    k = randn(B, T, H, K) / math.sqrt(K)
    v = randn(B, T, HV, V)
    kwargs: dict = {}
    shapes = {
        Role.TOKEN: (B, T, HV),
        Role.TOKEN_CHANNEL: (B, T, HV, K),
        Role.HEAD: (HV,),
        Role.HEAD_CHANNEL: (HV, K),
        Role.SCALAR: (),
    }
    log_decay = spec.gate.operands[0].name if spec.gate is not None and spec.gate.is_identity else "g"
    for op in spec.operands:  # an identity gate's input is drawn as g is, whatever its name (gk, w)
        kwargs[op.name] = _operand_value("g" if op.name == log_decay else op.name, op.role, shapes[op.role], gen,
                                         dtype, strength)
    if "p" in spec.correction_inputs:  # Comba's read key, drawn like k
        kwargs["p"] = randn(B, T, H, K) / math.sqrt(K)
    if "a" in spec.correction_inputs:  # DPLR in RWKV-7's range: a = -κ̂, b = κ̂ ⊙ (a gate in (0, 1))
        kappa = torch.nn.functional.normalize(randn(B, T, H, K), dim=-1)
        kwargs["a"], kwargs["b"] = -kappa, kappa * torch.rand(B, T, H, K, generator=gen, dtype=torch.float64).to(dtype)
    if spec.skip is Skip.HEAD:
        kwargs["D"] = randn(HV)
    elif spec.skip is Skip.CHANNEL:
        kwargs["D"] = randn(HV, V)
    if spec.output_gate is OutputGate.SILU:
        kwargs["z"] = randn(B, T, HV, V)
    if lengths is not None:
        bounds = [0]
        for n in lengths:
            bounds.append(bounds[-1] + n)
        kwargs["cu_seqlens"] = torch.tensor(bounds, dtype=torch.int32)
    if h0:
        N = len(lengths) if lengths is not None else B
        kwargs["initial_state"] = randn(N, HV, K, V)
    return Inputs(q, k, v, kwargs)
