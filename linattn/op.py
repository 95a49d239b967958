"""``linattn.compile``: a spec in, a callable op out, running the generated kernels.

The op owns one generated module per (dtype, K, V); everything else (B, T, head counts,
number of sequences, scale, parameter values) is a runtime argument, so nothing is
regenerated or recompiled when they change.
"""
from __future__ import annotations

import dataclasses
import difflib
import logging
import threading
from typing import TYPE_CHECKING

import torch

from linattn import codegen
from linattn.codegen import manifest
from linattn.codegen.plan import Options, Plan

from . import custom_ops, runtime
from .inputs import check_call
from .spec import Correction, OutputGate, Role, Skip, Spec

if TYPE_CHECKING:
    from .steps import DplrOp, StepsOp

__all__ = ["compile", "CompiledOp"]

log = logging.getLogger("linattn")

_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64"}


def _acc(dtype: torch.dtype) -> torch.dtype:
    """The accumulation and state dtype: fp32, or fp64 for fp64 inputs (interpreter only)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _alloc(shape, dtype, device) -> torch.Tensor:
    """Every kernel output and scratch buffer comes from here (tests poison it)."""
    return torch.empty(shape, dtype=dtype, device=device)


#: torch dtypes of the manifest's dtype names (``index`` tensors are given, never allocated)
TORCH_DTYPES = {
    "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64,
    "int32": torch.int32, "int64": torch.int64,
}  # fmt: skip


#: ``cu_seqlens`` of equal-length batches by (B, T, device): a function of those alone, made
#: by us and never handed out, so it cannot go stale
_UNIFORM_CU: dict[tuple, torch.Tensor] = {}
#: the chunk tables of equal-length batches by (B, T, C, device), for the same reason
_UNIFORM_TABLES: dict[tuple, tuple] = {}
_UNIFORM_MAX = 64


def _capturing(device: torch.device) -> bool:
    """Tensors made while a CUDA graph is being captured belong to its memory pool: never cache them."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _remember(cache: dict, key: tuple, value, device: torch.device):
    if not _capturing(device):
        if len(cache) >= _UNIFORM_MAX:
            cache.pop(next(iter(cache)))
        cache[key] = value
    return value


def uniform_cu(B: int, T: int, device: torch.device) -> torch.Tensor:
    """``cu_seqlens`` (int32) of B sequences of T tokens (cached)."""
    key = (B, T, str(device))
    cu = _UNIFORM_CU.get(key)
    if cu is None:
        cu = _remember(_UNIFORM_CU, key, torch.arange(0, B + 1, device=device, dtype=torch.int32) * T, device)
    return cu


def chunk_tables(gen, mod, cu_seqlens: torch.Tensor, TT: int, n_chunks: int, check: bool) -> tuple:
    """``(chunk_t0, chunk_len, chunk_off)`` of a packed batch: one launch of the generated
    ``chunk_table`` kernel (see :mod:`codegen.table`), on every call, without a host read.

    ``check``: on CUDA, also assert on the device that ``cu_seqlens`` is valid (the error
    surfaces at the next synchronisation; the kernels never leave the tensors meanwhile).
    """
    device = cu_seqlens.device
    env = {"cu_seqlens": cu_seqlens, "N": cu_seqlens.numel() - 1, "TT": TT, "NCH": n_chunks}
    CompiledOp._launch(gen, mod, ["chunk_table"], env, device)
    if check and device.type == "cuda":
        torch._assert_async(env["cu_ok"], "cu_seqlens: must start at 0, end at the packed length and increase")
    return env["chunk_t0"], env["chunk_len"], env["chunk_off"]


def saved_buffers(gen) -> list[str]:
    """Which of ``custom_ops.SAVED`` the forward kernels of ``gen`` write (what the backward reuses)."""
    written = {p.name for stage in gen.plan.stages for p in gen.kernel(f"{stage}_fwd").params if p.written}
    return [n for n in custom_ops.SAVED if n in written]


def uniform_tables(gen, mod, B: int, T: int, device: torch.device) -> tuple:
    """``(cu_seqlens, chunk_t0, chunk_len, chunk_off)`` of B sequences of T tokens (cached)."""
    C = gen.plan.C
    key = (B, T, C, str(device))
    tables = _UNIFORM_TABLES.get(key)
    if tables is None:
        cu = uniform_cu(B, T, device)
        tables = _remember(_UNIFORM_TABLES, key, (cu, *chunk_tables(gen, mod, cu, B * T, B * (-(-T // C)), False)), device)
    return tables


class CompiledOp:
    """A spec compiled to chunkwise kernels. Call it like :func:`reference.chunkwise`."""

    def __init__(self, spec: Spec, options: Options, explicit: frozenset[str] = frozenset()) -> None:
        self.spec = spec
        self.options = options
        self.explicit = explicit  # the options the caller passed (tuned values never replace them)
        self._resolved: dict[tuple[str, int, int], Options] = {}
        self._modules: dict[tuple[str, int, int], tuple[codegen.module.Module, object]] = {}
        self._last: tuple[str, int, int] | None = None
        self._lock = threading.Lock()
        self._transition: CompiledOp | None = None  # see transition_op
        self.key = custom_ops.register(self)  # how the torch custom op finds this op

    # ------------------------------------------------------------------ generation
    def plan(self, dtype: str = "bf16", K: int = 128, V: int = 128) -> Plan:
        return codegen.make_plan(self.spec, dtype, K, V, self.options_for(dtype, K, V))

    def options_for(self, dtype: str, K: int, V: int) -> Options:
        """The options of the plans at ``dtype``, ``K``, ``V``: the caller's, and where the caller
        passed none, the CUDA device's tuned values (:mod:`codegen.tuning`), else the defaults."""
        key = (dtype, K, V)
        if key not in self._resolved:
            tuned = codegen.tuning.tuned_options(self.spec.name, dtype, K, V, codegen.tuning.device_name())
            tuned = {n: value for n, value in tuned.items() if n not in self.explicit}
            try:
                self._resolved[key] = dataclasses.replace(self.options, **tuned)
            except ValueError as err:
                log.warning("tuned options %s for %s: %s; using the defaults", tuned, self.spec.name, err)
                self._resolved[key] = self.options
            if tuned:
                log.info("%s at %s: tuned options %s", self.spec.name, key, tuned)
        return self._resolved[key]

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
        cp_group: "torch.distributed.ProcessGroup | None" = None,
        **operands: torch.Tensor | float,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run the recurrence; returns ``(o [B, T, HV, V], final_state [N, HV, K, V] fp32 or None)``.

        ``cp_group``: context parallelism (:mod:`linattn.context_parallel`): q, k, v and the
        per-token operands are this rank's share of one packed stream (batch 1) split over
        the group's ranks in order, ``cu_seqlens`` the global offsets (the same on every
        rank); returns this rank's share of o and every sequence's final state."""
        # reading cu_seqlens on the host would synchronise CUDA (and break a torch.compile graph)
        check_values = isinstance(q, torch.Tensor) and q.device.type == "cpu" and not torch.compiler.is_compiling()
        check_values = check_values and cp_group is None  # global offsets: checked against every share
        call = check_call(
            self.spec, q, k, v, operands, z=z, D=D, scale=scale, initial_state=initial_state,
            cu_seqlens=cu_seqlens, check_values=check_values, warn_layout=True,
        )
        if q.dtype not in _DTYPE_NAMES:
            raise ValueError(f"q: compiled kernels take bf16, fp16 or fp32 inputs, got {q.dtype}")
        if q.dtype == torch.float64 and q.device.type != "cpu":
            raise ValueError("q: float64 inputs run only through the interpreter (CPU tensors), for gradient checks")
        if cp_group is not None:
            from . import context_parallel

            return context_parallel.forward(self, call, bool(output_final_state), cp_group)
        named = {"q": q, "k": k, "v": v, "z": z, "D": D, "initial_state": initial_state, **operands}
        named = {n: t for n, t in named.items() if isinstance(t, torch.Tensor)}
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in named.values())
        if needs_grad or torch.compiler.is_compiling():
            # the custom op: its registered gradient, and one opaque node for torch.compile
            return custom_ops.forward(self, call, bool(output_final_state))
        return self._forward(call, bool(output_final_state))

    def transition_op(self) -> CompiledOp:
        """The op of this spec without its output-side terms, same options: what context
        parallelism computes a share's transitions with."""
        with self._lock:
            if self._transition is None:
                from .context_parallel import transition_spec

                self._transition = CompiledOp(transition_spec(self.spec), self.options, self.explicit)
            return self._transition

    def _geometry(self, call, gen, mod) -> dict:
        """Sizes, the chunk tables and the flattened q, k, v of a call (shared by forward and backward)."""
        q, k, v = call.q, call.k, call.v
        B, T, H, HV, K, V = call.B, call.T, call.H, call.HV, call.K, call.V
        C = gen.plan.C
        TT = B * T
        if call.cu_seqlens is None:
            n_chunks = B * (-(-T // C))
            cu, chunk_t0, chunk_len, chunk_off = uniform_tables(gen, mod, B, T, q.device)
        else:
            cu = call.cu_seqlens
            n_chunks = -(-TT // C) + call.n_seqs
            chunk_t0, chunk_len, chunk_off = chunk_tables(gen, mod, cu, TT, n_chunks, check=True)
        return {
            "q": q.reshape(TT, H, K).contiguous(),
            "k": k.reshape(TT, H, K).contiguous(),
            "v": v.reshape(TT, HV, V).contiguous(),
            **{name: x.reshape(TT, H, K).contiguous() for name, x in call.vectors.items()},  # Comba's p
            "cu_seqlens": cu,
            "chunk_t0": chunk_t0,
            "chunk_len": chunk_len,
            "chunk_off": chunk_off,
            "TT": TT,
            "H": H,
            "HV": HV,
            "GROUP": HV // H,
            "scale": call.scale,
            "MMA": runtime.mma_dtype(gen.plan.mma, q.device),
            "N": call.n_seqs,
            "NCH": n_chunks,
        }

    def _term_args(self, call) -> dict:
        """The kernel arguments of the spec's terms: operands (``x_*`` tensors, ``s_*`` scalars), z, D."""
        args: dict = {}
        for op in self.spec.operands:
            x = call.operands[op.name]
            args[f"s_{op.name}" if op.role is Role.SCALAR else f"x_{op.name}"] = (
                x if op.role is Role.SCALAR else x.contiguous()
            )
        if call.z is not None:
            args["z"] = call.z.reshape(call.B * call.T, call.HV, call.V).contiguous()
        if call.D is not None:
            args["D"] = call.D.contiguous()
        return args

    @staticmethod
    def _launch(gen, mod, names, env: dict, device) -> None:
        """Launch the kernels ``names`` of ``gen`` in order, on the buffers and sizes in ``env``.

        Each kernel's manifest drives it: a buffer it writes that ``env`` does not hold yet is
        allocated (shape and dtype from the manifest; None where its flag is off) and left in
        ``env`` for the kernels after it; the grid is resolved from the sizes.
        """
        sizes = {**manifest.constants(gen.plan), **{n: env[n] for n in manifest.SIZES if n in env}}
        for name in names:
            kern = gen.kernel(name)
            for p in kern.params:
                if p.name in env:
                    continue
                if p.flag is not None and not env.get(p.flag):
                    env[p.name] = None
                elif p.tensor and p.access == "w":
                    env[p.name] = _alloc(manifest.resolve(p.shape, sizes), TORCH_DTYPES[p.dtype], device)
                else:
                    raise RuntimeError(f"{kern.symbol}: no value for its parameter {p.name!r} (nothing before it provides one)")
            args = {p.name: env[p.name] for p in kern.params}
            grid = manifest.resolve(kern.grid, sizes)
            runtime.launch(getattr(mod, kern.symbol), device, grid, args, kern.num_warps, kern.num_stages, kernel=kern, sizes=sizes)

    def _forward(self, call, output_final_state: bool, keep: dict | None = None):
        """Run the forward kernels; with ``keep`` (a dict) also hand back what the backward needs."""
        q = call.q
        device = q.device
        B, T, HV, K, V = call.B, call.T, call.HV, call.K, call.V
        N = call.n_seqs
        key = (_DTYPE_NAMES[q.dtype], K, V)
        gen, mod = self.module(*key)
        self._last = key
        plan = gen.plan
        if T == 0:
            o = q.new_zeros(B, 0, HV, V)
            acc = _acc(q.dtype)
            h = call.initial_state.to(acc) if call.initial_state is not None else q.new_zeros(N, HV, K, V, dtype=acc)
            return o, (h.clone() if output_final_state else None)

        env = self._geometry(call, gen, mod)
        env["HAS_H0"] = call.initial_state is not None
        env["STORE_HT"] = output_final_state
        env["h0"] = None if call.initial_state is None else call.initial_state.to(_acc(q.dtype)).contiguous()
        env.update(self._term_args(call))
        if plan.beta and not plan.beta_computed:  # a β operand is the kernels' β as it is
            env["beta"] = env[f"x_{self.spec.beta.operands[0].name}"]
        stages = plan.forward_stages(self._fused_output(plan, env["N"] * plan.NVS * HV, device))
        self._launch(gen, mod, [f"{stage}_fwd" for stage in stages], env, device)
        if keep is not None:
            # per-token and cheap: the backward reuses them instead of recomputing
            keep.update((n, env[n]) for n in saved_buffers(gen))
        return env["o"].reshape(B, T, HV, V), env["ht"]

    def _fused_output(self, plan: Plan, programs: int, device: torch.device) -> bool:
        """Whether the forward's state pass writes the output too (see ``Options.fused_output``).
        By default where Aqk is stored (the scan then loads it; computing q·kᵀ beside the state
        spills on sm_90) and the pass's ``programs`` cover every SM (always in the interpreter).
        The scan takes a sub-chunk's output rows at a time (at K = 256 with channel decay also
        8 warps and a sub-chunk's update rows), which keeps it free of spills on sm_90."""
        fused = self.options_for(plan.dtype, plan.K, plan.V).fused_output
        if fused is not None:
            return fused
        sms = runtime.sm_count(device)
        return plan.aqk_stored and (sms is None or programs >= sms)

    # ------------------------------------------------------------------ decoding
    def step(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        state: torch.Tensor,
        *,
        state_indices: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        scale: float | None = None,
        z: torch.Tensor | None = None,
        D: torch.Tensor | None = None,
        **operands: torch.Tensor | float,
    ) -> torch.Tensor:
        """Decode: run new tokens through the recurrence, updating ``state`` in place.

        ``q, k`` ``[B, T, H, K]``, ``v`` ``[B, T, HV, V]``: T new tokens for each of B
        sequences (or packed with ``cu_seqlens``, B = 1). ``state`` fp32 ``[S, HV, K, V]``:
        sequence n uses row ``state_indices[n]`` (int32 or int64 ``[N]``), or row n without
        a table. Returns the outputs ``[B, T, HV, V]``. No autograd (use the op itself to train).

        The pool's contract, as in serving engines: slot ``-1`` is padding, its sequence is
        skipped (zero outputs, no state row touched). Any other slot outside ``[0, S)`` is an
        error: a ValueError on CPU; on CUDA the kernel masks it (nothing outside the pool is
        read or written, its outputs are zeros) and ``torch._assert_async`` reports it at
        the next synchronisation, without a host read.
        """
        on_cpu = isinstance(q, torch.Tensor) and q.device.type == "cpu"
        call = check_call(self.spec, q, k, v, operands, z=z, D=D, scale=scale, cu_seqlens=cu_seqlens, check_values=on_cpu)
        if q.dtype not in _DTYPE_NAMES:
            raise ValueError(f"q: compiled kernels take bf16, fp16 or fp32 inputs, got {q.dtype}")
        if not isinstance(state, torch.Tensor) or state.dtype != _acc(q.dtype):
            raise ValueError(f"state: expected a {_acc(q.dtype)} tensor (updated in place)")
        if state.device != q.device:
            raise ValueError(f"state: on {state.device}, but q is on {q.device}")
        N, HV, K, V = call.n_seqs, call.HV, call.K, call.V
        if state.dim() != 4 or tuple(state.shape[1:]) != (HV, K, V) or not state.is_contiguous():
            raise ValueError(f"state: expected a contiguous [S, {HV}, {K}, {V}] tensor, got {list(state.shape)}")
        S = state.shape[0]
        if state_indices is not None:
            _check_state_indices(state_indices, N, S, q.device)
        elif S < N:
            raise ValueError(f"state: {S} rows for {N} sequences (pass state_indices for a pool)")
        gen, mod = self.module(_DTYPE_NAMES[q.dtype], K, V)
        TT = call.B * call.T
        cu = call.cu_seqlens if call.cu_seqlens is not None else uniform_cu(call.B, call.T, q.device)
        pooled_cuda = state_indices is not None and q.device.type == "cuda"
        env = {
            "q": q.reshape(TT, call.H, K).contiguous(), "k": k.reshape(TT, call.H, K).contiguous(),
            "v": v.reshape(TT, HV, V).contiguous(), "state": state, "state_idx": state_indices,
            **{name: x.reshape(TT, call.H, K).contiguous() for name, x in call.vectors.items()},  # Comba's p
            # written only for a slot outside the pool; read only on CUDA (the CPU checked on the host)
            "pool_err": torch.zeros(1, dtype=torch.int32, device=q.device) if pooled_cuda else _alloc((1,), torch.int32, q.device),
            "HAS_IDX": state_indices is not None, "cu_seqlens": cu, "scale": call.scale, "NSLOT": S, "TT": TT,
            "H": call.H, "HV": HV, "GROUP": HV // call.H, "N": N,
        }
        env.update(self._term_args(call))
        with torch.no_grad():
            self._launch(gen, mod, ["step_fwd"], env, q.device)
            if pooled_cuda:
                torch._assert_async(env["pool_err"] == 0, "state_indices: a slot outside the state pool (not -1)")
        return env["o"].reshape(call.B, call.T, HV, V)

    # ------------------------------------------------------------------ backward
    def _term_grads(self, call, gen, mod, env: dict) -> dict[str, torch.Tensor]:
        """Gradients of the gate/β operands from ``dg``/``dbeta``: identity terms pass theirs
        through; the others run the generated ``terms_bwd`` kernel (per-head operands come
        back as per-chunk partial sums, finished here)."""
        spec, plan, grads = self.spec, gen.plan, {}
        shape = lambda n: call.operands[n].shape  # noqa: E731
        if spec.has_decay and spec.gate is not None and spec.gate.is_identity:
            _add(grads, spec.gate.operands[0].name, env["dg"].reshape(shape(spec.gate.operands[0].name)))
        if plan.beta and not plan.beta_computed:
            _add(grads, spec.beta.operands[0].name, env["dbeta"].reshape(shape(spec.beta.operands[0].name)))
        terms = codegen.epilogue.derivative_terms(plan)
        if not terms:
            return grads
        args = dict(env)
        args.update(self._term_args(call))
        for o in {o.name: o for _, t in terms for o in t.operands}.values():
            if o.role in (Role.TOKEN, Role.TOKEN_CHANNEL):  # per-token gradients in the operand's dtype (no cast after)
                x = call.operands[o.name]
                args[f"d_{o.name}"] = _alloc(tuple(x.shape), x.dtype, x.device)
        self._launch(gen, mod, ["terms_bwd"], args, call.q.device)
        for o in {o.name: o for _, t in terms for o in t.operands}.values():
            if o.role in (Role.HEAD, Role.HEAD_CHANNEL):  # per-chunk partial sums
                _add(grads, o.name, args[manifest.partial_name(o.name)].sum(0).reshape(shape(o.name)))
            elif o.role is not Role.SCALAR:
                _add(grads, o.name, args[f"d_{o.name}"].reshape(shape(o.name)))
        return grads

    def core_module(self, dtype: str, K: int, V: int):
        """The module of the spec's core recurrence with its backward kernels (cached)."""
        key = ("bwd", dtype, K, V)
        with self._lock:
            if key not in self._modules:
                plan = codegen.make_plan(codegen.plan.core_spec(self.spec), dtype, K, V, self.options_for(dtype, K, V))
                gen = codegen.generate(plan, backward=True)
                mod, _ = codegen.load(gen)
                self._modules[key] = (gen, mod)
            return self._modules[key]

    def _backward(self, call, saved: dict, do: torch.Tensor, dht: torch.Tensor | None, stages: dict | None = None):
        """Gradients of every tensor argument of ``call`` (a dict by name).

        ``stages`` (a dict) receives the buffers of every backward stage, for tests.
        """
        from .torch_terms import finish_vjp

        spec = self.spec
        q, k, v = call.q, call.k, call.v
        device = q.device
        B, T, H, HV, K, V = call.B, call.T, call.H, call.HV, call.K, call.V
        gen, mod = self.core_module(_DTYPE_NAMES[q.dtype], K, V)
        # the layer-side kernels (q/k norm, the terms' derivatives) live in the spec's own module
        fgen, fmod = self.module(_DTYPE_NAMES[q.dtype], K, V)
        plan = gen.plan
        f32 = _acc(q.dtype)

        core_call = dataclasses.replace(call, spec=plan.spec, operands={}, z=None, D=None)
        env = self._geometry(core_call, gen, mod)
        TT = env["TT"]
        if spec.has_decay:
            env["G"] = saved["G"]
            if plan.read_before:  # where the correction's reads see the state: G - g
                env["Gx"] = saved["Gx"]
        if plan.beta:  # computed β was kept by the forward; a β operand is the input itself
            beta_t = saved["beta"] if "beta" in saved else call.operands[spec.beta.operands[0].name]
            env["beta"] = beta_t.reshape(TT, HV).contiguous()  # the kernels load it in fp32
        if plan.delta:
            env["Tm"] = saved["Tm"]
        if plan.aqk_stored:
            env["Aqk"] = saved["Aqk"]
        env.update(HAS_H0=call.initial_state is not None, STORE_HT=False)
        env["h0"] = None if call.initial_state is None else call.initial_state.to(f32).contiguous()
        recompute = (["wu_fwd"] if plan.delta else []) + ["state_fwd"]

        # ---- the output terms: dO of the core from dO of the op (the core's output is
        # recomputed only for an output gate; a skip alone leaves dO as it is)
        grads: dict[str, torch.Tensor] = {}
        skip_core = codegen.plan.skip_in_core(spec)  # the kernel writing dv takes the D skip
        if skip_core:
            env["D"] = call.D.contiguous()
        if spec.output_gate is not OutputGate.NONE:
            self._launch(gen, mod, recompute + ["output_fwd"], env, device)
            do, grads = finish_vjp(call, env["o"].reshape(B, T, HV, V).to(f32), do.to(f32), skip=not skip_core)
        else:
            self._launch(gen, mod, recompute, env, device)
            if spec.skip is not Skip.NONE and not skip_core:
                do, grads = finish_vjp(call, None, do)

        # ---- the core backward kernels
        env["dO"] = do.reshape(TT, HV, V).contiguous()
        env["dht"] = None if dht is None else dht.to(f32).contiguous()
        env["HAS_DHT"] = dht is not None
        env["STORE_DH0"] = call.initial_state is not None
        keys = ("q", "k", *call.vectors)  # the key-shaped inputs: q, k and Comba's p
        if spec.qk_l2norm or HV != H:  # the final dq, dk feed the norm or a sum over a group: fp32
            env.update((f"d{x}o", _alloc((TT, HV, K), f32, device)) for x in keys)
        names = [k.name for k in gen.kernels if k.name.endswith("_bwd")]
        if any(buf == "dG" for buf, _ in codegen.epilogue.derivative_terms(fgen.plan)):
            names.remove("dgate_bwd")  # the gate's derivative kernel takes dG's reverse cumsum itself
        writes_dv = any(p.name == "dv" and p.written for n in names for p in gen.kernel(n).params)
        if writes_dv and "v" in grads:  # v's share of a skip is added to the kernels' dv: keep that in fp32
            env["dv"] = _alloc((TT, HV, V), f32, device)
        if spec.has_decay and spec.gate is not None and spec.gate.is_identity:
            # g is an input as it is: the gate kernel writes its gradient in g's dtype (no cast after)
            g_in = call.operands[spec.gate.operands[0].name]
            env["dg"] = _alloc((TT, HV, K) if plan.channel else (TT, HV), g_in.dtype, device)
        self._launch(gen, mod, names, env, device)
        env.update((f"d{x}", env[f"d{x}o"]) for x in keys)  # complete
        if stages is not None:
            stages.update(env)

        # ---- back through the layer-side terms
        if writes_dv:  # the delta rule's WY form, or dΔ through β ⊙ V in the chunk kernel
            dv = env["dv"]
        else:  # channel decay without the delta rule: Δ = β ⊙ V by hand
            dv = env["dvn"] * env["beta"][..., None] if plan.beta else env["dvn"]
            if plan.beta:
                env["dbeta"] = (env["dvn"] * env["v"].to(f32)).sum(-1)
        if spec.qk_l2norm:  # the core kernels gave the gradients of the normalised q, k (p)
            self._launch(fgen, fmod, ["qknorm_bwd"], env, device)
            grads.update((x, env[f"d{x}_out"].reshape(B, T, H, K)) for x in keys)
        elif HV == H:  # one value head per q/k head: the gradients as they are
            grads.update((x, env[f"d{x}"].reshape(B, T, H, K)) for x in keys)
        else:  # summed over the value heads each q/k head serves
            grads.update((x, env[f"d{x}"].reshape(B, T, H, HV // H, K).sum(3)) for x in keys)
        grads.update(self._term_grads(call, fgen, fmod, env))
        dv = dv.reshape(B, T, HV, V)
        grads["v"] = dv.add_(grads["v"]) if "v" in grads else dv  # dv is this call's own buffer
        if skip_core:  # per-chunk partial sums of dD
            grads["D"] = env[manifest.partial_name("D")].sum(0).reshape(call.D.shape)
        if call.initial_state is not None:
            grads["initial_state"] = env["dh0"]
        return grads


def _check_state_indices(idx: object, N: int, S: int, device: torch.device) -> None:
    """``state_indices``: int32/int64 ``[N]`` on ``device``; on CPU also its values (-1 or a row of the pool)."""
    if not isinstance(idx, torch.Tensor) or idx.dtype not in (torch.int32, torch.int64):
        raise ValueError("state_indices: expected an int32 or int64 tensor [N]")
    if tuple(idx.shape) != (N,) or idx.device != device:
        raise ValueError(f"state_indices: expected shape [{N}] on {device}, got {list(idx.shape)} on {idx.device}")
    if device.type == "cpu":
        bad = [(n, slot) for n, slot in enumerate(idx.tolist()) if slot != -1 and not 0 <= slot < S]
        if bad:
            shown = ", ".join(f"[{n}] = {slot}" for n, slot in bad[:4]) + (", ..." if len(bad) > 4 else "")
            raise ValueError(f"state_indices: {shown} outside the state pool of {S} rows (use -1 to skip a sequence)")


def _add(grads: dict, name: str, d: torch.Tensor) -> None:
    grads[name] = grads[name] + d if name in grads else d


def compile(spec: Spec, **options) -> "CompiledOp | StepsOp | DplrOp":  # noqa: A001 (the name users expect)
    """Compile ``spec`` to chunkwise kernels.

    Options (all compile-time): ``chunk_size`` (64), ``subchunk_size`` (16), ``block_v``, ``product_block_v``,
    ``precision`` ("ieee" or "tf32" for fp32 inputs), ``num_warps``. Kernels are
    generated on the first call for each input dtype and head sizes, and cached on disk.
    """
    if not isinstance(spec, Spec):
        raise ValueError(f"spec: expected a linattn.Spec, got {type(spec).__name__}")
    valid = [f.name for f in dataclasses.fields(Options)]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        hints = [f" (did you mean {close[0]!r}?)" if (close := difflib.get_close_matches(u, valid, 1)) else "" for u in unknown]
        named = ", ".join(f"{u!r}{h}" for u, h in zip(unknown, hints))
        raise ValueError(f"compile: unknown option(s) {named}; valid options: {', '.join(valid)}")
    if spec.correction is Correction.DPLR:
        from .steps import DplrOp, dplr_core

        return DplrOp(spec, CompiledOp(dplr_core(spec), Options(**options), frozenset(options)))
    if spec.householder > 1:
        from .steps import StepsOp, core_of

        return StepsOp(spec, CompiledOp(core_of(spec)[0], Options(**options), frozenset(options)))
    return CompiledOp(spec, Options(**options), frozenset(options))
