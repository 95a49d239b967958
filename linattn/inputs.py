"""Checking and normalising the arguments of a call, once, for every implementation.

The reference oracles, the generated kernels' launcher and the drop-in ops all take the
same arguments; a bad one is reported here by name, before any kernel sees it.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
import dataclasses
from dataclasses import dataclass

import torch

from .spec import OutputGate, Role, Skip, Spec

__all__ = ["Call", "check_call", "FLOAT_DTYPES"]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass
class Call:
    """The validated arguments of one call (tensors untouched: no copies, no casts)."""

    spec: Spec
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    operands: dict[str, torch.Tensor | float]
    z: torch.Tensor | None
    D: torch.Tensor | None
    scale: float
    initial_state: torch.Tensor | None
    cu_seqlens: torch.Tensor | None
    #: the correction's key-shaped inputs by name (``p``; ``a``, ``b``), ``[B, T, H, K]``
    vectors: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)

    @property
    def named(self) -> dict[str, torch.Tensor | float]:
        """The spec's named arguments as a call takes them: the terms' operands and the
        correction's inputs."""
        return {**self.operands, **self.vectors}

    @property
    def B(self) -> int:
        return self.q.shape[0]

    @property
    def T(self) -> int:
        return self.q.shape[1]

    @property
    def H(self) -> int:
        return self.q.shape[2]

    @property
    def HV(self) -> int:
        return self.v.shape[2]

    @property
    def K(self) -> int:
        return self.q.shape[3]

    @property
    def V(self) -> int:
        return self.v.shape[3]

    @property
    def group(self) -> int:
        """Value heads served by one q/k head."""
        return self.HV // self.H

    @property
    def n_seqs(self) -> int:
        return self.B if self.cu_seqlens is None else self.cu_seqlens.numel() - 1

    def segments(self) -> list[tuple[int, int, int]]:
        """``(batch index, start, end)`` of every sequence (reads ``cu_seqlens`` on the host)."""
        if self.cu_seqlens is None:
            return [(b, 0, self.T) for b in range(self.B)]
        bounds = self.cu_seqlens.tolist()
        return [(0, bounds[i], bounds[i + 1]) for i in range(len(bounds) - 1)]


def _tensor(name: str, x: object) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    return x


def _float_tensor(name: str, x: object, device: torch.device) -> torch.Tensor:
    x = _tensor(name, x)
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name}: expected a floating dtype (fp16, bf16, fp32, fp64), got {x.dtype}")
    if x.device != device:
        raise ValueError(f"{name}: on {x.device}, but q is on {device}; all tensors must share one device")
    return x


def _shape(name: str, x: torch.Tensor, expected: tuple[int, ...], what: str) -> None:
    if tuple(x.shape) != expected:
        raise ValueError(f"{name}: expected shape {list(expected)} ({what}), got {list(x.shape)}")


def _check_operand(name: str, role: Role, x: object, shapes: dict[Role, tuple[int, ...]], device: torch.device):
    """A term's operand, checked against its role; a wrong one's error lists every role's shape."""

    def fail(problem: str) -> ValueError:
        given = list(x.shape) if isinstance(x, torch.Tensor) else None
        other = [r.value for r, shape in shapes.items() if list(shape) == given and r is not role]
        hint = f"; a {given} tensor fits role {other[0]!r} ({name}={other[0]!r} in the term)" if other else ""
        return ValueError(f"{name}: {problem}{hint} (roles: {Role.summary()})")

    if role is Role.SCALAR:
        if isinstance(x, bool) or not isinstance(x, (int, float)):
            raise fail(f"expected a Python number, got {type(x).__name__}; its role is 'scalar'")
        return float(x)
    if not isinstance(x, torch.Tensor):
        raise fail(f"expected a torch.Tensor, got {type(x).__name__}; its role {role.value!r} takes {role.shape}")
    x = _float_tensor(name, x, device)
    if tuple(x.shape) != shapes[role]:
        expected = list(shapes[role])
        raise fail(f"expected shape {expected} ({role.shape}) for its role {role.value!r}, got {list(x.shape)}")
    return x


def _check_cu_seqlens(cu: torch.Tensor, B: int, T: int, check_values: bool) -> None:
    if cu.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cu_seqlens: expected dtype torch.int32 or torch.int64, got {cu.dtype}")
    if cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(f"cu_seqlens: expected a 1-D tensor [N + 1] with N >= 1, got shape {list(cu.shape)}")
    if B != 1:
        raise ValueError(f"cu_seqlens: packed sequences need batch size 1 in q, k, v; got B = {B}")
    if not check_values:
        return
    vals = cu.tolist()
    if vals[0] != 0:
        raise ValueError(f"cu_seqlens: must start at 0, got {vals[0]}")
    if any(b <= a for a, b in zip(vals, vals[1:])):
        raise ValueError(f"cu_seqlens: must be strictly increasing, got {vals}")
    if vals[-1] != T:
        raise ValueError(f"cu_seqlens: last entry must equal the packed length T = {T}, got {vals[-1]}")


def check_call(
    spec: Spec,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    operands: Mapping[str, object],
    *,
    z: torch.Tensor | None = None,
    D: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    check_values: bool = True,
    warn_layout: bool = False,
) -> Call:
    """Validate a call against ``spec``; raise ValueError naming the first bad argument.

    ``check_values`` also inspects ``cu_seqlens`` values (a host read; the kernels' CUDA
    path turns it off to avoid a device synchronisation). ``warn_layout`` warns (a
    UserWarning, as fla does) when q, without ``cu_seqlens``, has fewer tokens than heads:
    likely head-first ``[B, H, T, K]`` input. Off by default: a decode step has T = 1.
    """
    q = _tensor("q", q)
    device = q.device
    q = _float_tensor("q", q, device)
    k = _float_tensor("k", k, device)
    v = _float_tensor("v", v, device)
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dim() != 4:
            what = "[B, T, H, K]" if name != "v" else "[B, T, HV, V]"
            raise ValueError(f"{name}: expected a 4-D tensor {what}, got shape {list(x.shape)}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one dtype; got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    B, T, H, K = q.shape
    n = spec.householder  # DeltaProduct: n rows of k, v (and β) per token
    if n == 1:
        _shape("k", k, (B, T, H, K), "like q: [B, T, H, K]")
    else:
        _shape("k", k, (B, T * n, H, K), f"[B, T * householder, H, K] with householder = {n}")
    if tuple(v.shape[:2]) != (B, T * n):
        what = "like q" if n == 1 else f"[B, T * householder] with householder = {n}"
        raise ValueError(f"v: expected batch and length {[B, T * n]} ({what}), got shape {list(v.shape)}")
    HV, V = v.shape[2], v.shape[3]
    if H == 0 or HV % H != 0:
        raise ValueError(f"v: its {HV} heads must be a multiple of q/k's {H} heads (each q/k head serves a group)")
    if K == 0 or V == 0:
        raise ValueError(f"head sizes must be positive; got K = {K}, V = {V}")

    # ---- the spec's operands
    expected = {o.name: o for o in spec.operands}
    inputs = spec.correction_inputs
    unknown = sorted(set(operands) - set(expected) - set(inputs))
    if unknown:
        wanted = ", ".join([*expected, *inputs]) or "none"
        raise ValueError(f"unexpected argument(s) {unknown} for spec {spec.name or spec}; its operands: {wanted}")
    missing = sorted((set(expected) | set(inputs)) - set(operands))
    if missing:
        raise ValueError(f"missing argument(s) {missing} required by spec {spec.name or spec}")
    shapes = {Role.TOKEN: (B, T, HV), Role.TOKEN_CHANNEL: (B, T, HV, K), Role.HEAD: (HV,), Role.HEAD_CHANNEL: (HV, K)}
    steps = {**shapes, Role.TOKEN: (B, T * n, HV), Role.TOKEN_CHANNEL: (B, T * n, HV, K)}  # β's with householder
    per_step = {o.name for o in spec.beta.operands} if spec.beta is not None and n > 1 else set()
    values = {name: _check_operand(name, op.role, operands[name], steps if name in per_step else shapes, device)
              for name, op in expected.items()}
    vectors = {}
    for name in inputs:
        x = _float_tensor(name, operands[name], device)
        _shape(name, x, (B, T, H, K), f"like q: [B, T, H, K], the {spec.correction.value} correction's input")
        if x.dtype != q.dtype:
            raise ValueError(f"{name}: expected q's dtype {q.dtype}, got {x.dtype}")
        vectors[name] = x

    # ---- layer-side terms
    if spec.output_gate is OutputGate.SILU:
        if z is None:
            raise ValueError("z: required by the spec's silu(z) output gate")
        z = _float_tensor("z", z, device)
        _shape("z", z, (B, T, HV, V), "like v: [B, T, HV, V]" if n == 1 else "[B, T, HV, V], one row per token")
    elif z is not None:
        raise ValueError("z: given, but the spec has no output gate")
    if spec.skip is not Skip.NONE:
        if D is None:
            raise ValueError("D: required by the spec's D skip")
        D = _float_tensor("D", D, device)
        shape = (HV,) if spec.skip is Skip.HEAD else (HV, V)
        _shape("D", D, shape, "[HV]" if spec.skip is Skip.HEAD else "[HV, V]")
    elif D is not None:
        raise ValueError("D: given, but the spec has no D skip")

    if scale is None:
        scale = spec.scale_for(K)
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale: expected a positive finite number, got {scale!r}")

    if cu_seqlens is not None:
        cu_seqlens = _tensor("cu_seqlens", cu_seqlens)
        if cu_seqlens.device != device:
            raise ValueError(f"cu_seqlens: on {cu_seqlens.device}, but q is on {device}")
        _check_cu_seqlens(cu_seqlens, B, T, check_values)
    elif warn_layout and T < H and HV == H:  # head-first input passed as is has v's heads = q's
        warnings.warn(
            f"q: the layout is [B, T, H, K], but q has T={T} < H={H}: did you pass [B, H, T, K]? "
            "(head-first input needs .transpose(1, 2))",
            UserWarning,
            stacklevel=3,
        )
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    if initial_state is not None:
        initial_state = _float_tensor("initial_state", initial_state, device)
        _shape("initial_state", initial_state, (N, HV, K, V), "[N, HV, K, V], N sequences")

    return Call(spec, q, k, v, values, z, D, float(scale), initial_state, cu_seqlens, vectors)
