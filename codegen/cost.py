"""The cost model of a plan: FLOPs of the chunk algorithm and the minimal HBM bytes of a call.

FLOPs count the matrix products the plan's stages perform, full tiles (triangular masks are
not discounted), so they compare implementations of the same algorithm; elementwise work
is left out. Minimal bytes are what any implementation must move: read every input once,
write every output once (states included), nothing else; a call at the roofline moves
exactly this.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from linattn.spec import OutputGate, Role, Skip

from .manifest import Kernel, resolve
from .plan import Plan

__all__ = ["Cost", "cost", "kernel_bytes", "hbm_bytes"]

_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4, "fp64": 8, "int32": 4, "int64": 8, "index": 4}


@dataclass(frozen=True)
class Cost:
    flops: float
    bytes: float


def _forward_flops_per_token_head(p: Plan) -> float:
    C, K, V = p.C, p.K, p.V
    f = 2 * K * V  # state update Kbᵀ Δ
    f += 2 * K * V + 2 * C * K + 2 * C * V  # output: Qg S, Aqk, Aqk Δ
    if p.delta:
        f += 2 * C * K  # Akk
        f += 2 * C * C / 3 + 2 * C * K + 2 * C * V  # solve, W = T βKg, U = T βV
        f += 2 * K * V  # W S
    return f


def _backward_flops_per_token_head(p: Plan) -> float:
    C, K, V = p.C, p.K, p.V
    f = 2 * K * V  # recomputed state pass: update
    f += 2 * C * V + (0 if p.aqk_stored else 2 * C * K)  # dvl: Aqkᵀ dO (Aqk recomputed)
    f += 2 * K * V + 2 * K * V  # dstate: Kb dS', Qgᵀ dO
    f += 2 * C * V + 2 * K * V + 2 * K * V  # dAqk = dO Δᵀ, dO Sᵀ, Δ dS'ᵀ
    f += 2 * C * K + 2 * C * K  # dAqk pushed to q and k
    if p.channel:
        f += 2 * C * K  # the products for dG
    if p.delta:
        f += 2 * C * K + 2 * C * V + 2 * K * V  # recomputed W, U, W S
        f += 2 * K * V + 2 * K * V  # dstate: Wᵀ dΔ; dW = -dΔ Sᵀ
        if p.channel:
            f += 6 * C * K  # dprod: dAkk k, dAkkᵀ k, k kᵀ
        f += 4 * C * V + 2 * C + 2 * C * K  # Tᵀ dΔ, dΔ Δᵀ, dAkk = -Tᵀ dΔ Δᵀ, Tᵀ dW
        if not p.channel:
            f += 8 * C * K  # dAkk pushed to k by rows and columns, each as a high and a low part
    return f


def cost(plan: Plan, *, B: int, T: int, H: int, HV: int, mode: str = "forward", initial_state: bool = False) -> Cost:
    """FLOPs and minimal bytes of one call. ``mode``: ``forward``, ``forward_backward`` or ``step``
    (one new token per sequence: B sequences, ``T`` ignored, states read and written)."""
    b = _BYTES[plan.dtype]
    K, V, spec = plan.K, plan.V, plan.spec
    tokens = B * (1 if mode == "step" else T)
    per_token = H * 2 * K * b + HV * V * b  # q, k, v
    for o in spec.operands:
        if o.role is Role.TOKEN:
            per_token += HV * b
        elif o.role is Role.TOKEN_CHANNEL:
            per_token += HV * K * b
    if spec.output_gate is OutputGate.SILU:
        per_token += HV * V * b
    per_token += HV * V * b  # o
    params = sum(HV * (K if o.role is Role.HEAD_CHANNEL else 1) * 4 for o in spec.operands if o.role.value.startswith("head"))
    if spec.skip is not Skip.NONE:
        params += HV * (V if spec.skip is Skip.CHANNEL else 1) * 4
    state = B * HV * K * V * 4
    if mode == "step":
        # the recurrence itself: decay, Sᵀk, the write and Sᵀq, each ~2KV per token and head
        flops = tokens * HV * (8 if plan.delta else 6) * K * V
        return Cost(flops, tokens * per_token + params + 2 * state)
    flops = tokens * HV * _forward_flops_per_token_head(plan)
    moved = tokens * per_token + params + (state if initial_state else 0)
    if mode == "forward_backward":
        flops += tokens * HV * _backward_flops_per_token_head(plan)
        # the inputs read again with dO, and a gradient written for each input
        moved = 3 * moved
    elif mode != "forward":
        raise ValueError(f"mode: expected 'forward', 'forward_backward' or 'step', got {mode!r}")
    return Cost(flops, moved)


def kernel_bytes(
    kernel: Kernel, sizes: dict[str, int], present: set[str] | None = None, itemsizes: dict[str, int] | None = None
) -> tuple[int, int]:
    """``(read, written)``: the bytes of the tensors one launch of ``kernel`` reads and writes,
    each counted once, from its manifest (``sizes``: the runtime and compile-time sizes;
    ``present``: the tensors passed, where optional ones may be None; ``itemsizes``: the
    element sizes of the tensors passed, where they differ from the manifest's dtype, as the
    fp32 computed β a core backward kernel reads). What it re-reads through its grid is
    not counted: this is the kernel's unique traffic."""
    return hbm_bytes(kernel, sizes, math.inf, present, itemsizes)  # as if every program were resident at once


#: the tensor dimensions each grid dimension walks (a program of the grid owns a slice of them;
#: a q/k head's program owns the rows of the value heads it serves)
_WALKS = {"NCH": {"TT", "NCH"}, "N": {"TT", "N", "N+1"}, "HV": {"HV", "H"}, "H": {"H", "HV"}, "NV": {"V"}, "NVS": {"V"}, "NVP": {"V"}, "NVN": {"V"}, "NKB": {"K"}}


def _walks(dim) -> set[str]:
    return {dim[0]} if isinstance(dim, tuple) else _WALKS.get(dim, set())


def hbm_bytes(
    kernel: Kernel, sizes: dict[str, int], resident: float, present: set[str] | None = None,
    itemsizes: dict[str, int] | None = None,
) -> tuple[int, int]:
    """``(read, written)``: the bytes one launch of ``kernel`` likely moves to and from HBM,
    counting the re-reads its grid makes (from its manifest).

    A tensor is read once per program along every grid dimension that does not walk it
    (q, k in a kernel tiled over V: once per V tile; a q/k head once per value head it
    serves). Programs launch in grid order, dimension 0 fastest; the copies a re-read
    needs are served by L2 when the programs sharing a slice are launched within
    ``resident`` programs of each other (those that fit on the GPU at once), else each
    comes from HBM again. Written tensors are written once.
    """
    # the grid as simple dimensions, fastest first ("A*B" enumerates B fastest)
    axes = []
    for dim in kernel.grid:
        parts = dim.split("*")[::-1] if isinstance(dim, str) and "*" in dim else [dim]
        axes += [(part, resolve((part,), sizes)[0]) for part in parts]
    read = written = 0
    for p in kernel.params:
        if not p.tensor or (present is not None and p.name not in present):
            continue
        n = math.prod(resolve(p.shape, sizes)) * (itemsizes or {}).get(p.name, _BYTES[p.dtype])
        dims = {d for d in p.shape if isinstance(d, str)}
        factor, stride = 1, 1
        for dim, extent in axes:
            walked = _walks(dim) & dims
            copies = extent if not walked else (sizes["HV"] // sizes["H"] if walked == {"H"} and dim == "HV" else 1)
            if copies > 1 and stride * copies > resident:  # the sharing programs are not resident together
                factor *= copies
            stride *= extent
        read += n * factor if "r" in p.access else 0
        written += n if p.written else 0
    return read, written
