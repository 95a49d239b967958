"""Drop-in ops with the call signatures of fla 0.6.0 and mamba_ssm 2.3.

Each op is a compiled built-in spec behind the original argument names, layouts, defaults
and return values. Options select the spec (an in-kernel gate, β = sigmoid(b), L2 norms,
``D``, ``silu(z)``, ``dt`` softplus/bias/limit become terms of the generated kernels and
have their gradients); the compiled ops are cached per option set. Arguments we do not
support raise a ValueError naming them; none is silently dropped.

Differences worth knowing: ``cu_seqlens`` may be int32 or int64 (fla passes int64; the
kernels read either); ``cu_seqlens_cpu`` and ``chunk_indices`` are precomputed helpers
these kernels have no use for (they need no host copy of the sequence bounds) and are
only checked for shape; mamba's ``chunk_size`` is validated but the kernels pick their own
chunk (the result is the same recurrence).
"""
from __future__ import annotations

import functools
import math

import torch

from . import custom_ops, gates
from .op import CompiledOp
from .op import compile as compile_spec
from .spec import Spec, term  # noqa: F401 (Spec: the type of what _compiled builds)

__all__ = [
    "chunk_gated_delta_rule",
    "fused_recurrent_gated_delta_rule",
    "chunk_kda",
    "fused_recurrent_kda",
    "chunk_simple_gla",
    "mamba_chunk_scan_combined",
]


def _t(text: str, **roles: str) -> tuple:
    """A term as a hashable description (parsed once, in :func:`_compiled`)."""
    return (text, tuple(sorted(roles.items())))


@functools.lru_cache(maxsize=None)
def _compile_key(
    decay: str, correction: str, gate, beta, l2norm: bool, chunk: int, skip: str = "none", output_gate: str = "none",
    default_scale: float | None = None, name: str = "",
) -> str:
    as_term = lambda t: t if t is None or isinstance(t, bool) else term(t[0], **dict(t[1]))  # noqa: E731
    spec = Spec(
        decay=decay, correction=correction, gate=as_term(gate), beta=as_term(beta), qk_l2norm=l2norm, skip=skip,
        output_gate=output_gate, default_scale=default_scale, name=name,
    )
    return compile_spec(spec, chunk_size=chunk).key


@torch.compiler.assume_constant_result
def _key(*description) -> str:
    """The registry key of an option set's compiled op: built once, a constant to torch.compile
    (which must not trace the spec's symbolic terms)."""
    return _compile_key(*description)


def _compiled(*description) -> CompiledOp:
    """The compiled op of an option set (see :func:`_compile_key` for the description)."""
    return custom_ops.lookup(_key(*description))


def _unexpected(fn: str, kwargs: dict) -> None:
    if kwargs:
        raise ValueError(f"{fn}: unsupported argument(s) {sorted(kwargs)}")


def _cu(cu_seqlens: torch.Tensor | None, cu_seqlens_cpu: torch.Tensor | None = None) -> torch.Tensor | None:
    if cu_seqlens is None:
        if cu_seqlens_cpu is not None:
            raise ValueError("cu_seqlens_cpu: given without cu_seqlens")
        return None
    if not isinstance(cu_seqlens, torch.Tensor):
        raise ValueError(f"cu_seqlens: expected a torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cu_seqlens: expected dtype torch.int32 or torch.int64, got {cu_seqlens.dtype}")
    if cu_seqlens_cpu is not None and tuple(cu_seqlens_cpu.shape) != tuple(cu_seqlens.shape):
        raise ValueError(f"cu_seqlens_cpu: shape {list(cu_seqlens_cpu.shape)} differs from cu_seqlens's")
    return cu_seqlens


def _chunk(fn: str, chunk_size: object, allowed: tuple[int, ...]) -> int:
    if chunk_size not in allowed:
        raise ValueError(f"{fn}: chunk_size must be one of {allowed}, got {chunk_size!r}")
    return int(chunk_size)


def _state_in(h0: torch.Tensor | None, v_first: bool) -> torch.Tensor | None:
    return None if h0 is None or not v_first else h0.transpose(-1, -2)


def _beta_term(use_sigmoid: bool, allow_neg_eigval: bool):
    if allow_neg_eigval and not use_sigmoid:
        raise ValueError("allow_neg_eigval: requires use_beta_sigmoid_in_kernel=True")
    if not use_sigmoid:
        return True
    return _t("2 * sigmoid(b)", b="token") if allow_neg_eigval else _t("sigmoid(b)", b="token")


# ----------------------------------------------------------------------------- fla: GDN
def _gdn_spec(g, gk, beta, use_gate_in_kernel, A_log, dt_bias, use_sigmoid, allow_neg_eigval, l2norm):
    """The spec and operands of fla's gated delta rule options (``gk``: a per-channel decay)."""
    operands: dict = {}
    if use_gate_in_kernel:
        if A_log is None:
            raise ValueError("A_log: required when use_gate_in_kernel=True")
        if g is None:
            raise ValueError("g: the raw gate input is required when use_gate_in_kernel=True")
        if dt_bias is not None:
            gate = _t("-exp(A_log) * softplus(a + dt_bias)", a="token", A_log="head", dt_bias="head")
            operands.update(a=g, A_log=A_log, dt_bias=dt_bias)
        else:
            gate = _t("-exp(A_log) * softplus(a)", a="token", A_log="head")
            operands.update(a=g, A_log=A_log)
    else:
        for name, x in (("A_log", A_log), ("dt_bias", dt_bias)):
            if x is not None:
                raise ValueError(f"{name}: only used with use_gate_in_kernel=True")
        gate = None
        if g is not None:
            operands["g"] = g
    decay = "none" if g is None and gk is None else "scalar"
    if gk is not None:
        decay = "channel"
        if gate is not None:
            raise ValueError("gk: not supported together with use_gate_in_kernel=True")
        if g is not None:
            gate = _t("g + gk", g="token", gk="token_channel")
        operands["gk" if g is not None else "g"] = gk
    b = True
    if beta is None:
        if use_sigmoid:
            raise ValueError("beta: required by use_beta_sigmoid_in_kernel=True")
        b = False
    else:
        b = _beta_term(use_sigmoid, allow_neg_eigval)
        operands["b" if use_sigmoid else "beta"] = beta
    return (decay, "delta", gate, b, l2norm), operands


def chunk_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    use_beta_sigmoid_in_kernel: bool = False,
    allow_neg_eigval: bool = False,
    state_v_first: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    cu_seqlens_cpu: torch.Tensor | None = None,
    chunk_indices: torch.Tensor | None = None,
    cp_context: object | None = None,
    *,
    use_gate_in_kernel: bool = False,
    A_log: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    chunk_size: int = 64,
    **unsupported,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated DeltaNet (fla's ``chunk_gated_delta_rule``): q, k ``[B, T, H, K]``, v
    ``[B, T, HV, V]``, g and beta ``[B, T, HV]``; returns ``(o, final_state)``.

    ``use_gate_in_kernel``: g is raw and the gate ``-exp(A_log)·softplus(g + dt_bias)`` runs
    in the kernel (``A_log``, ``dt_bias`` of shape ``[HV]``).
    """
    _unexpected("chunk_gated_delta_rule", unsupported)
    if cp_context is not None:
        raise ValueError("cp_context: context parallelism is not supported")
    chunk = _chunk("chunk_gated_delta_rule", chunk_size, (16, 32, 64))
    spec, operands = _gdn_spec(g, None, beta, use_gate_in_kernel, A_log, dt_bias, use_beta_sigmoid_in_kernel,
                               allow_neg_eigval, use_qk_l2norm_in_kernel)
    return _run(spec, chunk, q, k, v, scale, initial_state, output_final_state, state_v_first, cu_seqlens,
                cu_seqlens_cpu, operands)


def _run(spec, chunk, q, k, v, scale, initial_state, output_final_state, state_v_first, cu_seqlens, cu_seqlens_cpu,
         operands):
    """Run the op of ``spec`` (the positional description of :func:`_compiled`)."""
    h0 = _state_in(initial_state, state_v_first) if state_v_first else initial_state
    o, ht = _compiled(*spec, chunk)(
        q, k, v, scale=scale, initial_state=h0, output_final_state=output_final_state,
        cu_seqlens=_cu(cu_seqlens, cu_seqlens_cpu), **operands,
    )
    if ht is not None and state_v_first:
        ht = ht.transpose(-1, -2)
    return o, ht


# ----------------------------------------------------------------------------- fla: KDA
def _kda_spec(q, v, g, beta, use_gate_in_kernel, A_log, dt_bias, lower_bound, use_sigmoid, allow_neg_eigval, l2norm):
    """The spec and operands of fla's KDA options."""
    HV, K = v.shape[2], q.shape[-1]
    operands: dict = {}
    if use_gate_in_kernel:
        if A_log is None and lower_bound is None:
            raise ValueError("A_log: required when use_gate_in_kernel=True and lower_bound is not set")
        inner = "a" if dt_bias is None else "(a + dt_bias)"
        roles: dict = {"a": "token_channel"}
        if dt_bias is not None:
            if dt_bias.numel() != HV * K:
                raise ValueError(f"dt_bias: expected {HV * K} elements ([HV * K]), got {list(dt_bias.shape)}")
            operands["dt_bias"] = dt_bias.reshape(HV, K)
            roles["dt_bias"] = "head_channel"
        if A_log is not None:
            operands["A_log"] = A_log
            roles["A_log"] = "head"
        if lower_bound is not None:
            arg = f"exp(A_log) * {inner}" if A_log is not None else inner
            gate = _t(f"lower_bound * sigmoid({arg})", lower_bound="scalar", **roles)
            operands["lower_bound"] = float(lower_bound)
        else:
            gate = _t(f"-exp(A_log) * softplus({inner})", **roles)
        operands["a"] = g
    else:
        for name, x in (("A_log", A_log), ("dt_bias", dt_bias)):
            if x is not None:
                raise ValueError(f"{name}: only used with use_gate_in_kernel=True")
        gate = None
        operands["g"] = g
    b = _beta_term(use_sigmoid, allow_neg_eigval)
    operands["b" if use_sigmoid else "beta"] = beta
    return ("channel", "delta", gate, b, l2norm), operands


def chunk_kda(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    use_gate_in_kernel: bool = False,
    use_beta_sigmoid_in_kernel: bool = False,
    allow_neg_eigval: bool = False,
    safe_gate: bool = False,
    lower_bound: float | None = None,
    disable_recompute: bool = False,
    return_intermediate_states: bool = False,
    state_v_first: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    cu_seqlens_cpu: torch.Tensor | None = None,
    cp_context: object | None = None,
    use_graph: bool = False,
    max_num_seqs: int | None = None,
    *,
    A_log: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    chunk_size: int = 64,
    **unsupported,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Kimi Delta Attention (fla's ``chunk_kda``): g ``[B, T, HV, K]`` per channel.

    ``use_gate_in_kernel``: the gate ``-exp(A_log)·softplus(g + dt_bias)`` (``A_log`` ``[HV]``,
    ``dt_bias`` ``[HV·K]``), or with ``lower_bound`` ``lower_bound·sigmoid(exp(A_log)·(g +
    dt_bias))`` (``A_log`` optional). ``disable_recompute``, ``max_num_seqs`` and
    ``safe_gate`` without the in-kernel gate tune fla's kernels and change no result; they
    are accepted and have no effect here.
    """
    _unexpected("chunk_kda", unsupported)
    if cp_context is not None:
        raise ValueError("cp_context: context parallelism is not supported")
    if return_intermediate_states:
        raise ValueError("return_intermediate_states: not supported")
    if use_graph:
        raise ValueError("use_graph: the NPU graph mode is not supported")
    chunk = _chunk("chunk_kda", chunk_size, (32, 64))
    if safe_gate and use_gate_in_kernel and (lower_bound is None or not -5 <= lower_bound < 0):
        raise ValueError(f"lower_bound: safe_gate needs a lower_bound in [-5, 0), got {lower_bound!r}")
    spec, operands = _kda_spec(q, v, g, beta, use_gate_in_kernel, A_log, dt_bias, lower_bound,
                               use_beta_sigmoid_in_kernel, allow_neg_eigval, use_qk_l2norm_in_kernel)
    return _run(spec, chunk, q, k, v, scale, initial_state, output_final_state, state_v_first, cu_seqlens,
                cu_seqlens_cpu, operands)


def _run_recurrent(spec, q, k, v, scale, initial_state, output_final_state, state_v_first, cu_seqlens, operands):
    """fla's fused_recurrent_*: the step kernel on a copy of the state; under autograd the
    chunk kernels (the same recurrence) so that a recurrent-mode run can be trained."""
    tensors = [q, k, v, initial_state, *operands.values()]
    if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors):
        return _run(spec, 64, q, k, v, scale, initial_state, output_final_state, state_v_first, cu_seqlens, None,
                    operands)
    op = _compiled(*spec, 64)
    cu = _cu(cu_seqlens)
    N = q.shape[0] if cu is None else cu.numel() - 1
    shape = (N, v.shape[2], q.shape[-1], v.shape[-1])
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    if initial_state is None:
        state = torch.zeros(shape, dtype=acc, device=q.device)
    else:
        h0 = initial_state.transpose(-1, -2) if state_v_first else initial_state
        if tuple(h0.shape) != shape:
            raise ValueError(f"initial_state: expected shape {list(shape)}, got {list(initial_state.shape)}")
        state = h0.to(acc).contiguous().clone()
    o = op.step(q, k, v, state, cu_seqlens=cu, scale=scale, **operands)
    if not output_final_state:
        return o, None
    return o, (state.transpose(-1, -2) if state_v_first else state)


def fused_recurrent_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None = None,
    gk: torch.Tensor | None = None,
    gv: torch.Tensor | None = None,
    beta: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    use_gate_in_kernel: bool = False,
    A_log: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    use_beta_sigmoid_in_kernel: bool = False,
    allow_neg_eigval: bool = False,
    state_v_first: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    **unsupported,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fla's ``fused_recurrent_gated_delta_rule``: the token-by-token kernel (decoding);
    ``g`` ``[B, T, HV]`` and/or ``gk`` ``[B, T, HV, K]``, ``beta`` optional (1). Has a
    backward (through the chunk kernels), which fla's lacks."""
    _unexpected("fused_recurrent_gated_delta_rule", unsupported)
    if gv is not None:
        raise ValueError("gv: decay along the value dimension is not supported")
    spec, operands = _gdn_spec(g, gk, beta, use_gate_in_kernel, A_log, dt_bias, use_beta_sigmoid_in_kernel,
                               allow_neg_eigval, use_qk_l2norm_in_kernel)
    return _run_recurrent(spec, q, k, v, scale, initial_state, output_final_state, state_v_first, cu_seqlens, operands)


def fused_recurrent_kda(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    A_log: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    use_gate_in_kernel: bool = False,
    use_beta_sigmoid_in_kernel: bool = False,
    allow_neg_eigval: bool = False,
    lower_bound: float | None = None,
    state_v_first: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    **unsupported,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fla's ``fused_recurrent_kda``: the token-by-token KDA kernel, with a backward."""
    _unexpected("fused_recurrent_kda", unsupported)
    spec, operands = _kda_spec(q, v, g, beta, use_gate_in_kernel, A_log, dt_bias, lower_bound,
                               use_beta_sigmoid_in_kernel, allow_neg_eigval, use_qk_l2norm_in_kernel)
    return _run_recurrent(spec, q, k, v, scale, initial_state, output_final_state, state_v_first, cu_seqlens, operands)


# ----------------------------------------------------------------------------- fla: simple GLA
def chunk_simple_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None = None,
    g_gamma: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    state_v_first: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    cu_seqlens_cpu: torch.Tensor | None = None,
    *,
    chunk_size: int = 64,
    **unsupported,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Simple GLA (fla's ``chunk_simple_gla``): a scalar decay per head and token ``g``
    ``[B, T, H]`` and/or a constant one per head ``g_gamma`` ``[H]``, both in log space."""
    _unexpected("chunk_simple_gla", unsupported)
    chunk = _chunk("chunk_simple_gla", chunk_size, (16, 32, 64))
    operands: dict = {}
    if g is not None and g_gamma is not None:
        spec = ("scalar", "none", _t("g + g_gamma", g="token", g_gamma="head"), False, False)
        operands.update(g=g, g_gamma=g_gamma)
    elif g is not None:
        spec = ("scalar", "none", _t("g", g="token"), False, False)
        operands["g"] = g
    elif g_gamma is not None:
        spec = ("scalar", "none", _t("g_gamma", g_gamma="head"), False, False)
        operands["g_gamma"] = g_gamma
    else:
        spec = ("none", "none", None, False, False)
    return _run(spec, chunk, q, k, v, scale, initial_state, output_final_state, state_v_first, cu_seqlens,
                cu_seqlens_cpu, operands)


# ----------------------------------------------------------------------------- mamba_ssm: SSD
def mamba_chunk_scan_combined(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    initial_states: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = (0.0, float("inf")),
    return_final_states: bool = False,
    return_varlen_states: bool = False,
):
    """Mamba-2's SSD (mamba_ssm's ``mamba_chunk_scan_combined``) as the recurrence
    ``S_t = exp(dt_t A) S_(t-1) + dt_t B_t x_tᵀ``, ``y_t = S_tᵀ C_t (+ D x_t)(· silu(z_t))``.

    x ``[b, l, h, p]``, dt ``[b, l, h]``, A ``[h]``, B and C ``[b, l, g, n]`` (each group
    serves ``h / g`` heads), states ``[b, h, p, n]`` (mamba's layout). Packed sequences:
    ``seq_idx`` ``[1, l]`` with ``cu_seqlens`` ``[N + 1]`` (both, as mamba's varlen path
    uses them); ``initial_states`` then holds the first sequence's state.
    Returns ``out``, then ``final_states`` and ``varlen_states`` as requested.
    """
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size: expected a positive int, got {chunk_size!r}")
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError("x: expected a 4-D tensor [batch, seqlen, nheads, headdim]")
    if not isinstance(A, torch.Tensor) or A.dim() != 1:
        raise ValueError("A: expected a 1-D tensor [nheads]")
    lo, hi = dt_limit
    limit = not (lo == 0.0 and math.isinf(hi) and hi > 0)
    dt_text, dt_roles = gates._dt_text(dt_softplus, dt_bias is not None, limit)
    dt_term, gate_term = _t(dt_text, **dt_roles), _t(f"A * {dt_text}", A="head", **dt_roles)
    operands: dict = {"dt": dt, "A": A}
    if dt_bias is not None:
        operands["dt_bias"] = dt_bias
    if limit:
        operands.update(dt_min=float(lo), dt_max=float(hi))
    skip = "none" if D is None else ("head" if D.dim() == 1 else "channel")
    op = _compiled("scalar", "none", gate_term, dt_term, False, 64, skip, "none" if z is None else "silu", 1.0, "MAMBA2")
    packed = cu_seqlens is not None or seq_idx is not None
    if packed and (cu_seqlens is None or seq_idx is None):
        raise ValueError("seq_idx, cu_seqlens: packed sequences need both (seq_idx for the scan, cu_seqlens for its bounds)")
    if return_varlen_states and cu_seqlens is None:
        raise ValueError("cu_seqlens: required by return_varlen_states=True")
    h0 = None if initial_states is None else initial_states.transpose(-1, -2)  # [b, h, n, p]: our [K, V]
    cu = _cu(cu_seqlens)
    if packed:
        if x.shape[0] != 1:
            raise ValueError(f"seq_idx: packed sequences need batch 1, got {x.shape[0]}")
        if tuple(seq_idx.shape) != tuple(x.shape[:2]):
            raise ValueError(f"seq_idx: expected shape {list(x.shape[:2])}, got {list(seq_idx.shape)}")
        if h0 is not None:  # mamba's initial state is the first sequence's
            rest = h0.new_zeros(cu.numel() - 2, *h0.shape[1:])
            h0 = torch.cat([h0, rest], 0)
    want_state = return_final_states or return_varlen_states
    out, ht = op(
        C, B, x, initial_state=h0, output_final_state=want_state, cu_seqlens=cu, z=z, D=D, **operands
    )
    if not want_state:
        return out
    states = ht.transpose(-1, -2)  # back to mamba's [.., p, n], fp32
    result = [out]
    if return_final_states:
        result.append(states[-1:] if packed else states)
    if return_varlen_states:
        result.append(states)
    return tuple(result)
