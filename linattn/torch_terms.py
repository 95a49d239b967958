"""The spec's terms in torch: gate and β evaluation, and the layer-side pre/post ops.

Shared by the reference oracles and any torch path, so that "what a term means" is
written once. Everything here is differentiable by autograd.
"""
from __future__ import annotations

import functools
import math
import operator

import sympy as sp
import torch
import torch.nn.functional as F

from . import expr as _expr
from .inputs import Call
from .spec import QK_L2NORM_EPS, Decay, OutputGate, Role, Skip, Spec, Term

__all__ = [
    "evaluate_term",
    "evaluate_expr",
    "l2norm",
    "prepare",
    "prepare_vectors",
    "finish",
    "finish_vjp",
    "L2NORM_EPS",
]

#: ``x / sqrt(sum(x²) + eps)``: the epsilon of the in-kernel L2 normalisation.
L2NORM_EPS = QK_L2NORM_EPS


def _unary(torch_fn, math_fn):
    return lambda x: torch_fn(x) if isinstance(x, torch.Tensor) else math_fn(x)


def _softplus_math(x: float) -> float:
    return x if x > _expr.SOFTPLUS_THRESHOLD else math.log1p(math.exp(x))


def _inside(x, lo, hi):
    if isinstance(x, torch.Tensor):
        return ((x >= lo) & (x <= hi)).to(x.dtype)
    return float(lo <= x <= hi)


def _clamp(x, lo, hi):
    if isinstance(x, torch.Tensor):
        return torch.clamp(x, lo, hi)
    return min(max(x, lo), hi)


_TORCH_OPS = {
    "number": float,
    "add": lambda xs: functools.reduce(operator.add, xs),
    "mul": lambda xs: functools.reduce(operator.mul, xs),
    "pow": lambda x, p: x**p,
    "exp": _unary(torch.exp, math.exp),
    "log": _unary(torch.log, math.log),
    "softplus": _unary(lambda x: F.softplus(x, threshold=_expr.SOFTPLUS_THRESHOLD), _softplus_math),
    "sigmoid": _unary(torch.sigmoid, lambda x: 1.0 / (1.0 + math.exp(-x))),
    "clamp": _clamp,
    "inside": _inside,
}


def evaluate_term(
    t: Term, values: dict[str, torch.Tensor | float], shape: tuple[int, ...], dtype: torch.dtype
) -> torch.Tensor:
    """Evaluate ``t`` elementwise to a tensor of ``shape`` (``[B, T, HV]`` or ``[B, T, HV, K]``)."""
    return evaluate_expr(t.expr, {o.name: o.role for o in t.operands}, values, shape, dtype)


def evaluate_expr(
    expr: sp.Expr,
    roles: dict[str, Role],
    values: dict[str, torch.Tensor | float],
    shape: tuple[int, ...],
    dtype: torch.dtype,
) -> torch.Tensor:
    """Evaluate an expression over operands of the given roles (e.g. a term's derivative)."""
    channel = len(shape) == 4

    def leaf(sym):
        x = values[sym.name]
        role = roles[sym.name]
        if role is Role.SCALAR:
            return x
        x = x.to(dtype)
        if channel and role in (Role.TOKEN, Role.HEAD):
            x = x.unsqueeze(-1)  # broadcast over the key channel
        return x

    out = _expr.walk(expr, leaf, _TORCH_OPS)
    return torch.as_tensor(out, dtype=dtype, device=_any_device(values)).broadcast_to(shape)


def _any_device(values: dict[str, torch.Tensor | float]) -> torch.device | None:
    for x in values.values():
        if isinstance(x, torch.Tensor):
            return x.device
    return None


def l2norm(x: torch.Tensor) -> torch.Tensor:
    """L2-normalise the last dimension."""
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + L2NORM_EPS)


def prepare(call: Call, dtype: torch.dtype):
    """``q, k`` (expanded to the value heads), ``v``, ``g`` and ``β`` in ``dtype``.

    ``g`` is ``None`` without decay, ``β`` is ``None`` without a write strength. Shapes:
    q, k ``[B, T, HV, K]``, v ``[B, T, HV, V]``, g ``[B, T, HV]`` or ``[B, T, HV, K]``,
    β ``[B, T, HV]`` (k, v and β with ``T · householder`` rows with DeltaProduct's steps).
    """
    spec: Spec = call.spec
    q, k, v = call.q.to(dtype), call.k.to(dtype), call.v.to(dtype)
    if spec.qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    if call.group > 1:
        q = q.repeat_interleave(call.group, dim=2)
        k = k.repeat_interleave(call.group, dim=2)
    B, T, HV, K = q.shape
    g = beta = None
    if spec.gate is not None:
        shape = (B, T, HV, K) if spec.decay is Decay.CHANNEL else (B, T, HV)
        g = evaluate_term(spec.gate, call.operands, shape, dtype)
    if spec.beta is not None:  # one per write: T · householder rows
        beta = evaluate_term(spec.beta, call.operands, (B, v.shape[1], HV), dtype)
    return q, k, v, g, beta


def prepare_vectors(call: Call, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The correction's key-shaped inputs (``p``; ``a``, ``b``) in ``dtype``, expanded to the
    value heads ``[B, T, HV, K]``. ``qk_l2norm`` normalises Comba's read key ``p`` as it does
    ``k`` (as fla does); DPLR's ``a`` and ``b`` are taken as given."""
    out = {}
    for name, x in call.vectors.items():
        x = x.to(dtype)
        if call.spec.qk_l2norm and name == "p":
            x = l2norm(x)
        out[name] = x.repeat_interleave(call.group, dim=2) if call.group > 1 else x
    return out


def finish(call: Call, o: torch.Tensor) -> torch.Tensor:
    """Apply the layer-side output terms (``D`` skip, ``silu(z)`` gate) to the recurrence's output."""
    spec = call.spec
    if spec.skip is Skip.HEAD:
        o = o + call.D.to(o.dtype)[:, None] * call.v.to(o.dtype)
    elif spec.skip is Skip.CHANNEL:
        o = o + call.D.to(o.dtype) * call.v.to(o.dtype)
    if spec.output_gate is OutputGate.SILU:
        o = o * F.silu(call.z.to(o.dtype))
    return o


def finish_vjp(
    call: Call, o: torch.Tensor | None, do: torch.Tensor, skip: bool = True
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Back through :func:`finish`: the gradient of the recurrence's output ``o`` and of ``v``, ``D``, ``z``.
    ``o`` is needed for an output gate only (None without one). ``skip=False`` leaves the D
    skip out: ``o`` includes it already, and its gradients are taken elsewhere."""
    spec, grads = call.spec, {}
    d_pre = do
    if spec.output_gate is OutputGate.SILU:
        v = call.v.to(o.dtype)
        pre = o
        if skip and spec.skip is Skip.HEAD:
            pre = o + call.D.to(o.dtype)[:, None] * v
        elif skip and spec.skip is Skip.CHANNEL:
            pre = o + call.D.to(o.dtype) * v
        z = call.z.to(o.dtype)
        sig = torch.sigmoid(z)
        d_pre = do * z * sig
        grads["z"] = do * pre * sig * (1 + z * (1 - sig))
    if skip and spec.skip is not Skip.NONE:
        D = call.D.float()[:, None] if spec.skip is Skip.HEAD else call.D.float()
        dims = (0, 1, 3) if spec.skip is Skip.HEAD else (0, 1)
        grads["D"] = (d_pre.float() * call.v).sum(dim=dims)
        grads["v"] = D * d_pre
    return d_pre, grads
