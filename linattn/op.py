"""``linattn.compile``: a spec in, a callable op out, running the generated kernels.

The op owns one generated module per (dtype, K, V); everything else (B, T, head counts,
number of sequences, scale, parameter values) is a runtime argument, so nothing is
regenerated or recompiled when they change.
"""
from __future__ import annotations

import logging
import threading

import torch

import codegen
from codegen.plan import Options, Plan

from . import runtime
from .inputs import check_call
from .spec import Role, Spec

__all__ = ["compile", "CompiledOp"]

log = logging.getLogger("linattn")

_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def _alloc(shape, dtype, device) -> torch.Tensor:
    """Every kernel output and scratch buffer comes from here (tests poison it)."""
    return torch.empty(shape, dtype=dtype, device=device)


def chunk_tables(cu_seqlens: torch.Tensor, n_chunks_max: int, C: int):
    """The (sequence, chunk) grid of a packed batch, built on the device without a host read.

    Program ``p`` of a chunk-parallel kernel handles chunk ``p`` in sequence order; the
    grid is an upper bound (``ceil(total / C) + N``), spare programs get length 0.
    Returns ``chunk_t0`` (int64 first token), ``chunk_len`` (int32) and ``chunk_off``
    (int32 ``[N + 1]``: index of each sequence's first chunk).
    """
    cu = cu_seqlens.to(torch.int64)
    lens = cu[1:] - cu[:-1]
    off = torch.zeros_like(cu)
    off[1:] = torch.cumsum((lens + C - 1) // C, 0)
    p = torch.arange(n_chunks_max, device=cu.device)
    seq = torch.searchsorted(off[1:], p, right=True).clamp_(max=lens.numel() - 1)
    t0 = cu[seq] + (p - off[seq]) * C
    length = torch.where(p < off[-1], torch.clamp(cu[seq + 1] - t0, max=C), 0)
    return t0, length.to(torch.int32), off.to(torch.int32)


class CompiledOp:
    """A spec compiled to chunkwise kernels. Call it like :func:`reference.chunkwise`."""

    def __init__(self, spec: Spec, options: Options) -> None:
        self.spec = spec
        self.options = options
        self._modules: dict[tuple[str, int, int], tuple[codegen.module.Module, object]] = {}
        self._last: tuple[str, int, int] | None = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ generation
    def plan(self, dtype: str = "bf16", K: int = 128, V: int = 128) -> Plan:
        return codegen.make_plan(self.spec, dtype, K, V, self.options)

    def module(self, dtype: str = "bf16", K: int = 128, V: int = 128):
        """The generated module for inputs of ``dtype`` and head sizes ``K``, ``V`` (cached)."""
        key = (dtype, K, V)
        with self._lock:
            if key not in self._modules:
                gen = codegen.generate(self.plan(dtype, K, V))
                mod, path = codegen.load(gen)
                log.debug("compiled %s for %s: %s", self.spec.name or "spec", key, path)
                self._modules[key] = (gen, mod)
            return self._modules[key]

    @property
    def source(self) -> str:
        """The generated source of the last call (or of bf16, K = V = 128 before any call)."""
        return self.module(*(self._last or ("bf16", 128, 128)))[0].source

    def __repr__(self) -> str:
        return f"CompiledOp({self.spec!r}, {self.options})"

    # ------------------------------------------------------------------ call
    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        scale: float | None = None,
        initial_state: torch.Tensor | None = None,
        output_final_state: bool = False,
        cu_seqlens: torch.Tensor | None = None,
        z: torch.Tensor | None = None,
        D: torch.Tensor | None = None,
        **operands: torch.Tensor | float,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run the recurrence; returns ``(o [B, T, HV, V], final_state [N, HV, K, V] fp32 or None)``."""
        on_cpu = isinstance(q, torch.Tensor) and q.device.type == "cpu"
        call = check_call(
            self.spec, q, k, v, operands, z=z, D=D, scale=scale, initial_state=initial_state,
            cu_seqlens=cu_seqlens, check_values=on_cpu,  # a host read would synchronise CUDA
        )
        if q.dtype not in _DTYPE_NAMES:
            raise ValueError(f"q: compiled kernels take bf16, fp16 or fp32 inputs, got {q.dtype} (use reference for fp64)")
        if torch.is_grad_enabled() and any(
            isinstance(t, torch.Tensor) and t.requires_grad
            for t in (q, k, v, z, D, initial_state, *operands.values())
        ):
            raise RuntimeError(
                "linattn.compile: this op has forward kernels only; call it under torch.no_grad() "
                "or without tensors that require grad (reference.chunkwise is differentiable)"
            )
        return self._forward(call, bool(output_final_state))

    def _forward(self, call, output_final_state: bool):
        q, k, v = call.q, call.k, call.v
        device = q.device
        B, T, H, HV, K, V = call.B, call.T, call.H, call.HV, call.K, call.V
        N = call.n_seqs
        key = (_DTYPE_NAMES[q.dtype], K, V)
        gen, mod = self.module(*key)
        self._last = key
        plan = gen.plan
        C = plan.C
        if T == 0:
            o = q.new_zeros(B, 0, HV, V)
            h = call.initial_state.float() if call.initial_state is not None else q.new_zeros(N, HV, K, V, dtype=torch.float32)
            return o, (h.clone() if output_final_state else None)

        TT = B * T
        if call.cu_seqlens is None:
            cu = torch.arange(0, B + 1, device=device, dtype=torch.int32) * T
            n_chunks = B * (-(-T // C))
        else:
            cu = call.cu_seqlens
            n_chunks = -(-TT // C) + N
        chunk_t0, chunk_len, chunk_off = chunk_tables(cu, n_chunks, C)

        io = q.dtype
        env: dict[str, object] = {
            "q": q.reshape(TT, H, K).contiguous(),
            "k": k.reshape(TT, H, K).contiguous(),
            "v": v.reshape(TT, HV, V).contiguous(),
            "cu_seqlens": cu,
            "chunk_t0": chunk_t0,
            "chunk_len": chunk_len,
            "chunk_off": chunk_off,
            "H": H,
            "HV": HV,
            "GROUP": HV // H,
            "scale": call.scale,
            "HAS_H0": call.initial_state is not None,
            "STORE_HT": output_final_state,
            "h0": None if call.initial_state is None else call.initial_state.float().contiguous(),
            "MMA": runtime.mma_dtype(io, device),
        }
        for op in self.spec.operands:
            x = call.operands[op.name]
            if op.role is Role.SCALAR:
                env[f"s_{op.name}"] = x
            else:
                env[f"x_{op.name}"] = x.contiguous()
        if call.z is not None:
            env["z"] = call.z.reshape(TT, HV, V).contiguous()
        if call.D is not None:
            env["D"] = call.D.contiguous()
        if self.spec.has_decay:
            shape = (TT, HV, K) if plan.channel else (TT, HV)
            env["G"] = _alloc(shape, torch.float32, device)
        if plan.beta:
            if plan.beta_computed:
                env["beta"] = _alloc((TT, HV), torch.float32, device)
            else:
                env["beta"] = env[f"x_{self.spec.beta.operands[0].name}"]
        if "intra" in plan.stages:
            if plan.delta:
                env["Tm"] = _alloc((TT, HV, C), io, device)
                env["W"] = _alloc((TT, HV, K), io, device)
                env["U"] = _alloc((TT, HV, V), io, device)
            if plan.aqk_stored:
                env["Aqk"] = _alloc((TT, HV, C), io, device)
        if plan.delta:
            env["vnew"] = _alloc((TT, HV, V), io, device)
        env["hs"] = _alloc((n_chunks, HV, K, V), io, device)
        env["o"] = _alloc((TT, HV, V), io, device)
        env["ht"] = _alloc((N, HV, K, V), torch.float32, device) if output_final_state else None

        grids = {"chunks": (n_chunks, HV), "chunks_k": (n_chunks, HV, plan.NKB), "chunks_v": (n_chunks, HV, plan.NV), "seqs_v": (N, HV, plan.NV)}
        for kern in gen.kernels:
            args = {name: env[name] for name, _ in kern.params}
            runtime.launch(getattr(mod, kern.name), device, grids[kern.grid], args, kern.num_warps)
        o = env["o"].reshape(B, T, HV, V)
        return o, env["ht"]


def compile(spec: Spec, **options) -> CompiledOp:  # noqa: A001 (the name users expect)
    """Compile ``spec`` to chunkwise kernels.

    Options (all compile-time): ``chunk_size`` (64), ``subchunk_size`` (16), ``block_v``,
    ``precision`` ("ieee" or "tf32" for fp32 inputs), ``num_warps``. Kernels are
    generated on the first call for each input dtype and head sizes, and cached on disk.
    """
    if not isinstance(spec, Spec):
        raise ValueError(f"spec: expected a linattn.Spec, got {type(spec).__name__}")
    try:
        opts = Options(**options)
    except TypeError as err:
        raise ValueError(f"compile: {err}") from None
    return CompiledOp(spec, opts)
