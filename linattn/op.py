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

from . import custom_ops, runtime
from .inputs import check_call
from .spec import Role, Spec

__all__ = ["compile", "CompiledOp"]

log = logging.getLogger("linattn")

_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64"}


def _acc(dtype: torch.dtype) -> torch.dtype:
    """The accumulation and state dtype: fp32, or fp64 for fp64 inputs (interpreter only)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


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


#: chunk tables of equal-length batches by (B, T, C, device): they depend on nothing else,
#: so a model calling the op layer after layer builds them once instead of launching ~25
#: small torch kernels per call (launch overhead dominates short sequences and decoding)
_UNIFORM_TABLES: dict[tuple, tuple] = {}
_UNIFORM_TABLES_MAX = 64


def uniform_tables(B: int, T: int, C: int, device: torch.device) -> tuple:
    """``(cu_seqlens, chunk_t0, chunk_len, chunk_off)`` of B sequences of T tokens (cached)."""
    key = (B, T, C, str(device))
    tables = _UNIFORM_TABLES.get(key)
    if tables is None:
        cu = torch.arange(0, B + 1, device=device, dtype=torch.int32) * T
        tables = (cu, *chunk_tables(cu, B * (-(-T // C)), C))
        # tensors made while a CUDA graph is being captured belong to its memory pool
        if not (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
            if len(_UNIFORM_TABLES) >= _UNIFORM_TABLES_MAX:
                _UNIFORM_TABLES.pop(next(iter(_UNIFORM_TABLES)))
            _UNIFORM_TABLES[key] = tables
    return tables


#: chunk tables of packed batches, keyed by the cu_seqlens tensor itself: the layers of a
#: model share one cu_seqlens per forward, so only the first layer builds them. The entry
#: holds a reference to the tensor, so its memory cannot be reused by another one, and
#: keys on its version counter, which any in-place write bumps.
_PACKED_TABLES: dict[tuple, tuple] = {}
_PACKED_TABLES_MAX = 8


def packed_tables(cu_seqlens: torch.Tensor, n_chunks_max: int, C: int) -> tuple:
    """:func:`chunk_tables` of ``cu_seqlens``, cached while the tensor is unchanged."""
    key = (cu_seqlens.data_ptr(), cu_seqlens.numel(), cu_seqlens._version, str(cu_seqlens.device), n_chunks_max, C)
    entry = _PACKED_TABLES.get(key)
    if entry is not None:
        return entry[1]
    tables = chunk_tables(cu_seqlens, n_chunks_max, C)
    if not (cu_seqlens.device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        if len(_PACKED_TABLES) >= _PACKED_TABLES_MAX:
            _PACKED_TABLES.pop(next(iter(_PACKED_TABLES)))
        _PACKED_TABLES[key] = (cu_seqlens, tables)
    return tables


class CompiledOp:
    """A spec compiled to chunkwise kernels. Call it like :func:`reference.chunkwise`."""

    def __init__(self, spec: Spec, options: Options) -> None:
        self.spec = spec
        self.options = options
        self._modules: dict[tuple[str, int, int], tuple[codegen.module.Module, object]] = {}
        self._last: tuple[str, int, int] | None = None
        self._lock = threading.Lock()
        self.key = custom_ops.register(self)  # how the torch custom op finds this op

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
        # reading cu_seqlens on the host would synchronise CUDA (and break a torch.compile graph)
        check_values = isinstance(q, torch.Tensor) and q.device.type == "cpu" and not torch.compiler.is_compiling()
        call = check_call(
            self.spec, q, k, v, operands, z=z, D=D, scale=scale, initial_state=initial_state,
            cu_seqlens=cu_seqlens, check_values=check_values,
        )
        if q.dtype not in _DTYPE_NAMES:
            raise ValueError(f"q: compiled kernels take bf16, fp16 or fp32 inputs, got {q.dtype}")
        if q.dtype == torch.float64 and q.device.type != "cpu":
            raise ValueError("q: float64 inputs run only through the interpreter (CPU tensors), for gradient checks")
        named = {"q": q, "k": k, "v": v, "z": z, "D": D, "initial_state": initial_state, **operands}
        named = {n: t for n, t in named.items() if isinstance(t, torch.Tensor)}
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in named.values())
        if needs_grad or torch.compiler.is_compiling():
            # the custom op: its registered gradient, and one opaque node for torch.compile
            return custom_ops.forward(self, call, bool(output_final_state))
        return self._forward(call, bool(output_final_state))

    def _geometry(self, call, C: int) -> dict:
        """Sizes, the chunk tables and the flattened q, k, v of a call (shared by forward and backward)."""
        q, k, v = call.q, call.k, call.v
        B, T, H, HV, K, V = call.B, call.T, call.H, call.HV, call.K, call.V
        TT = B * T
        if call.cu_seqlens is None:
            n_chunks = B * (-(-T // C))
            cu, chunk_t0, chunk_len, chunk_off = uniform_tables(B, T, C, q.device)
        else:
            cu = call.cu_seqlens
            n_chunks = -(-TT // C) + call.n_seqs
            chunk_t0, chunk_len, chunk_off = packed_tables(cu, n_chunks, C)
        return {
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
            "MMA": runtime.mma_dtype(q.dtype, q.device),
            "_TT": TT,
            "_N": call.n_seqs,
            "_n_chunks": n_chunks,
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
        plan = gen.plan
        n_chunks, HV, N = env["_n_chunks"], env["HV"], env["_N"]
        grids = {
            "chunks": (n_chunks, HV),
            "chunks_k": (n_chunks, HV, plan.NKB),
            "rows_qk": (-(-env.get("_TT", 0) // codegen.epilogue.NORM_ROWS), env["H"]),
            "chunks_v": (n_chunks, HV, plan.NV),
            "seqs_v": (N, HV, plan.NV),
        }
        for name in names:
            kern = gen.kernel(name)
            args = {p: env[p] for p, _ in kern.params}
            runtime.launch(getattr(mod, kern.name), device, grids[kern.grid], args, kern.num_warps, kern.num_stages)

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
        C = plan.C
        if T == 0:
            o = q.new_zeros(B, 0, HV, V)
            acc = _acc(q.dtype)
            h = call.initial_state.to(acc) if call.initial_state is not None else q.new_zeros(N, HV, K, V, dtype=acc)
            return o, (h.clone() if output_final_state else None)

        env = self._geometry(call, C)
        TT, n_chunks, io = env["_TT"], env["_n_chunks"], q.dtype
        if call.cu_seqlens is not None and device.type == "cuda":
            # the host cannot read cu_seqlens without a synchronisation: check it on the device
            cu = call.cu_seqlens
            torch._assert_async((cu[0] == 0) & (cu[-1] == TT) & (cu[1:] > cu[:-1]).all())
        env["HAS_H0"] = call.initial_state is not None
        env["STORE_HT"] = output_final_state
        env["h0"] = None if call.initial_state is None else call.initial_state.to(_acc(io)).contiguous()
        env.update(self._term_args(call))
        if self.spec.has_decay:
            shape = (TT, HV, K) if plan.channel else (TT, HV)
            env["G"] = _alloc(shape, _acc(io), device)
        if plan.beta:
            if plan.beta_computed:
                env["beta"] = _alloc((TT, HV), _acc(io), device)
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
        env["ht"] = _alloc((N, HV, K, V), _acc(io), device) if output_final_state else None
        self._launch(gen, mod, [f"{stage}_fwd" for stage in plan.stages], env, device)
        if keep is not None:
            # per-token and cheap: the backward reuses them instead of recomputing
            for name in ("G", "beta", "Tm", "Aqk"):
                if name in env:
                    keep[name] = env[name]
        return env["o"].reshape(B, T, HV, V), env["ht"]

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
        sequence n uses row ``state_indices[n]`` (int32 ``[N]``), or row n without a table.
        Returns the outputs ``[B, T, HV, V]``. No autograd (use the op itself to train).
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
        if state_indices is not None:
            if not isinstance(state_indices, torch.Tensor) or state_indices.dtype != torch.int32:
                raise ValueError("state_indices: expected an int32 tensor [N]")
            if tuple(state_indices.shape) != (N,) or state_indices.device != q.device:
                raise ValueError(f"state_indices: expected shape [{N}] on {q.device}, got {list(state_indices.shape)}")
        elif state.shape[0] < N:
            raise ValueError(f"state: {state.shape[0]} rows for {N} sequences (pass state_indices for a pool)")
        gen, mod = self.module(_DTYPE_NAMES[q.dtype], K, V)
        TT = call.B * call.T
        cu = call.cu_seqlens if call.cu_seqlens is not None else uniform_tables(call.B, call.T, gen.plan.C, q.device)[0]
        env = {
            "q": q.reshape(TT, call.H, K).contiguous(), "k": k.reshape(TT, call.H, K).contiguous(),
            "v": v.reshape(TT, HV, V).contiguous(), "state": state, "state_idx": state_indices,
            "HAS_IDX": state_indices is not None, "cu_seqlens": cu, "scale": call.scale,
            "H": call.H, "HV": HV, "GROUP": HV // call.H, "o": _alloc((TT, HV, V), q.dtype, q.device),
            "_n_chunks": 0, "_N": N,
        }
        env.update(self._term_args(call))
        with torch.no_grad():
            self._launch(gen, mod, ["step_fwd"], env, q.device)
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
        outputs = {}
        for o in {o.name: o for _, t in terms for o in t.operands}.values():
            if o.role is Role.SCALAR:
                continue
            if o.role in (Role.HEAD, Role.HEAD_CHANNEL):
                buf = codegen.epilogue.partial_name(o.name)
                cols = (env["_n_chunks"], call.HV) + ((call.K,) if o.role is Role.HEAD_CHANNEL else ())
            else:
                buf = f"d_{o.name}"
                cols = (env["_TT"], call.HV) + ((call.K,) if o.role is Role.TOKEN_CHANNEL else ())
            args[buf] = outputs[o.name] = _alloc(cols, torch.float32, call.q.device)
        self._launch(gen, mod, ["terms_bwd"], args, call.q.device)
        for name, d in outputs.items():
            role = next(o.role for o in spec.operands if o.name == name)
            _add(grads, name, (d.sum(0) if role in (Role.HEAD, Role.HEAD_CHANNEL) else d).reshape(shape(name)))
        return grads

    def core_module(self, dtype: str, K: int, V: int):
        """The module of the spec's core recurrence with its backward kernels (cached)."""
        key = ("bwd", dtype, K, V)
        with self._lock:
            if key not in self._modules:
                plan = codegen.make_plan(codegen.plan.core_spec(self.spec), dtype, K, V, self.options)
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
        C = plan.C
        f32 = _acc(q.dtype)

        core_call = type(call)(plan.spec, q, k, v, {}, None, None, call.scale, call.initial_state, call.cu_seqlens)
        env = self._geometry(core_call, C)
        TT, n_chunks, N, io = env["_TT"], env["_n_chunks"], env["_N"], q.dtype
        if spec.qk_l2norm:  # the core kernels take normalised q, k
            env["qn"], env["kn"] = _alloc((TT, H, K), f32, device), _alloc((TT, H, K), f32, device)
            env["TT"] = TT
            self._launch(fgen, fmod, ["qknorm_fwd"], env, device)
            raw_q, raw_k = env["q"], env["k"]
            env["q"], env["k"] = env["qn"], env["kn"]
        if spec.has_decay:
            env["G"] = saved["G"]
        if plan.beta:  # computed β was kept by the forward; a β operand is the input itself
            beta_t = saved["beta"] if "beta" in saved else call.operands[spec.beta.operands[0].name]
            env["beta"] = beta_t.reshape(TT, HV).to(f32).contiguous()
        if plan.delta:
            env["Tm"] = saved["Tm"]
            env["W"] = _alloc((TT, HV, K), io, device)
            env["U"] = _alloc((TT, HV, V), io, device)
            env["vnew"] = _alloc((TT, HV, V), io, device)
        if plan.aqk_stored:
            env["Aqk"] = saved["Aqk"]
        env.update(HAS_H0=call.initial_state is not None, STORE_HT=False, ht=None)
        env["h0"] = None if call.initial_state is None else call.initial_state.to(f32).contiguous()
        env["hs"] = _alloc((n_chunks, HV, K, V), io, device)
        recompute = (["wu_fwd"] if plan.delta else []) + ["state_fwd"]

        # ---- the output terms: dO of the core from dO of the op
        grads: dict[str, torch.Tensor] = {}
        if spec.skip.value != "none" or spec.output_gate.value != "none":
            env["o"] = _alloc((TT, HV, V), io, device)
            self._launch(gen, mod, recompute + ["output_fwd"], env, device)
            do, grads = finish_vjp(call, env["o"].reshape(B, T, HV, V).to(f32), do.to(f32))
        else:
            self._launch(gen, mod, recompute, env, device)

        # ---- the core backward kernels
        env["dO"] = do.reshape(TT, HV, V).contiguous()
        env["dvl"] = _alloc((TT, HV, V), f32, device)
        env["dvn"] = _alloc((TT, HV, V), f32, device)
        env["dh"] = _alloc((n_chunks, HV, K, V), f32, device)
        env["dht"] = None if dht is None else dht.to(f32).contiguous()
        env["HAS_DHT"] = dht is not None
        env["STORE_DH0"] = call.initial_state is not None
        env["dh0"] = _alloc((N, HV, K, V), f32, device) if call.initial_state is not None else None
        env["dq"] = _alloc((TT, HV, K), f32, device)
        env["dk"] = _alloc((TT, HV, K), f32, device)
        env["dAqk"] = _alloc((TT, HV, C), f32, device)
        if plan.delta:
            env["dW"] = _alloc((TT, HV, K), f32, device)
            env["dAkk"] = _alloc((TT, HV, C), f32, device)
            env["dv"] = _alloc((TT, HV, V), f32, device)
        if plan.beta:
            env["dbeta"] = _alloc((TT, HV), f32, device)
        if spec.has_decay:
            gshape = (TT, HV, K) if plan.channel else (TT, HV)
            env["dG"] = _alloc(gshape, f32, device)
            env["dg"] = _alloc(gshape, f32, device)
        names = [k.name for k in gen.kernels if k.name.endswith("_bwd")]
        self._launch(gen, mod, names, env, device)
        if stages is not None:
            stages.update(env)

        # ---- back through the layer-side terms
        dv = env["dv"] if plan.delta else env["dvn"] * (env["beta"][..., None] if plan.beta else 1.0)
        if plan.beta and not plan.delta:
            env["dbeta"] = (env["dvn"] * env["v"].to(f32)).sum(-1)
        if spec.qk_l2norm:
            env["q"], env["k"] = raw_q, raw_k
            env["dq_out"], env["dk_out"] = _alloc((TT, H, K), f32, device), _alloc((TT, H, K), f32, device)
            self._launch(fgen, fmod, ["qknorm_bwd"], env, device)
            grads["q"], grads["k"] = env["dq_out"].reshape(B, T, H, K), env["dk_out"].reshape(B, T, H, K)
        else:
            grads["q"] = env["dq"].reshape(B, T, H, HV // H, K).sum(3)
            grads["k"] = env["dk"].reshape(B, T, H, HV // H, K).sum(3)
        grads.update(self._term_grads(call, fgen, fmod, env))
        dv = dv.reshape(B, T, HV, V)
        grads["v"] = grads["v"] + dv if "v" in grads else dv
        if call.initial_state is not None:
            grads["initial_state"] = env["dh0"]
        return grads


def _add(grads: dict, name: str, d: torch.Tensor) -> None:
    grads[name] = grads[name] + d if name in grads else d


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
