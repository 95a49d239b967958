"""Drop-in ops with the call signatures of fla 0.6.0 and mamba_ssm 2.3.

Each op is a compiled built-in spec behind the original argument names, layouts, defaults
and return values. Options select the spec (an in-kernel gate, β = sigmoid(b), L2 norms,
``D``, ``silu(z)``, ``dt`` softplus/bias/limit become terms of the generated kernels and
have their gradients); the compiled ops are cached per option set. Every op rejects a
keyword it does not know with the same ValueError (``<op>: unsupported argument(s)
[...]``), and a value it does not support with a ValueError naming the argument. The
arguments that tune fla's kernels without changing a result are accepted and have no
effect here; each op's docstring lists them.

Differences worth knowing: ``cu_seqlens`` may be int32 or int64 (fla passes int64; the
kernels read either); ``cu_seqlens_cpu`` and ``chunk_indices`` are precomputed helpers
these kernels have no use for (they need no host copy of the sequence bounds):
``cu_seqlens_cpu`` is only checked for shape, ``chunk_indices`` is not read; mamba's
``chunk_size`` is validated but the kernels pick their own chunk (the result is the same
recurrence).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re

import torch

from . import custom_ops, gates
from .op import CompiledOp
from .op import compile as compile_spec
from .spec import Spec, term

__all__ = [
    "chunk_gated_delta_rule",
    "fused_recurrent_gated_delta_rule",
    "chunk_gated_delta_product",
    "chunk_comba",
    "fused_recurrent_comba",
    "chunk_dplr_delta_rule",
    "chunk_iplr_delta_rule",
    "fused_recurrent_dplr_delta_rule",
    "fused_recurrent_iplr_delta_rule",
    "chunk_rwkv7",
    "fused_recurrent_rwkv7",
    "fused_mul_recurrent_rwkv7",
    "chunk_kda",
    "fused_recurrent_kda",
    "chunk_simple_gla",
    "mamba_chunk_scan_combined",
    "selective_state_update",
]


@dataclasses.dataclass(frozen=True)
class _OpKey:
    """One option set of a drop-in op: the spec it compiles to and the chunk size.

    Plain hashable data (strings, bools, numbers, a tuple of pairs): the ops build it with
    keywords in code that torch.compile traces, and nothing here parses a term until
    :meth:`spec` runs (once per option set, outside the traced code; see :func:`_key`).

    Fields: ``decay``, ``correction``, ``qk_l2norm``, ``skip``, ``output_gate``,
    ``default_scale`` and ``name`` as in :class:`linattn.Spec`; ``gate`` the text of the gate
    term (``None``: the input ``g`` itself, or no gate without decay); ``beta`` the text of
    the β term, ``True`` (the input ``beta``) or ``False`` (no β); ``roles`` the role of each
    operand that ``gate`` and ``beta`` name, as sorted ``(name, role)`` pairs (see
    :func:`_roles`); ``chunk_size`` the compile option; ``householder`` DeltaProduct's steps.
    """

    decay: str = "none"
    correction: str = "none"
    gate: str | None = None
    beta: str | bool = False
    roles: tuple[tuple[str, str], ...] = ()
    qk_l2norm: bool = False
    chunk_size: int = 64
    skip: str = "none"
    output_gate: str = "none"
    default_scale: float | None = None
    householder: int = 1
    name: str = ""

    def _term(self, text: str):
        named = set(re.findall(r"[A-Za-z_]\w*", text))
        return term(text, **{n: role for n, role in self.roles if n in named})

    def spec(self) -> Spec:
        """The spec of this option set (parses the terms)."""
        return Spec(
            decay=self.decay, correction=self.correction,
            gate=None if self.gate is None else self._term(self.gate),
            beta=self.beta if isinstance(self.beta, bool) else self._term(self.beta),
            qk_l2norm=self.qk_l2norm, skip=self.skip, output_gate=self.output_gate,
            default_scale=self.default_scale, householder=self.householder, name=self.name,
        )


_OP_KEY_FIELDS = tuple(f.name for f in dataclasses.fields(_OpKey))


def _roles(**roles: str) -> tuple[tuple[str, str], ...]:
    """Operand roles as the hashable ``roles`` field of :class:`_OpKey`."""
    return tuple(sorted(roles.items()))


@functools.cache
def _registry_key(key: _OpKey) -> str:
    """Compile ``key``'s spec (once per option set); the registry key of the compiled op."""
    return compile_spec(key.spec(), chunk_size=key.chunk_size).key


@torch.compiler.assume_constant_result
def _key(**fields) -> str:
    """The registry key of the option set with these :class:`_OpKey` fields: built once, a
    constant to torch.compile (which must not trace the spec's symbolic terms).

    It takes the fields, not an ``_OpKey``: torch.compile hands an object built in traced
    code to an ``assume_constant_result`` function as an uninitialised instance (its class
    defaults), whereas the fields are constants it passes as they are.
    """
    return _registry_key(_OpKey(**fields))


def _compiled(key: _OpKey) -> CompiledOp:
    """The compiled op of an option set (DeltaProduct's and DPLR's: their rows over the compiled core)."""
    op = custom_ops.lookup(_key(**{name: getattr(key, name) for name in _OP_KEY_FIELDS}))
    return op if key.householder == 1 and key.correction != "dplr" else _steps_op(key, op)


@functools.cache
def _steps_op(key: _OpKey, core: CompiledOp):
    from .steps import DplrOp, StepsOp

    return (DplrOp if key.correction == "dplr" else StepsOp)(key.spec(), core)


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


def _beta_term(use_sigmoid: bool, allow_neg_eigval: bool, roles: dict) -> str | bool:
    """The ``beta`` field of an :class:`_OpKey` for fla's β options (adds ``b``'s role to ``roles``)."""
    if allow_neg_eigval and not use_sigmoid:
        raise ValueError("allow_neg_eigval: requires use_beta_sigmoid_in_kernel=True")
    if not use_sigmoid:
        return True
    roles["b"] = "token"
    return "2 * sigmoid(b)" if allow_neg_eigval else "sigmoid(b)"


# ----------------------------------------------------------------------------- fla: GDN
def _gdn_spec(g, gk, beta, use_gate_in_kernel, A_log, dt_bias, use_sigmoid, allow_neg_eigval, l2norm, chunk_size):
    """The key and operands of fla's gated delta rule options (``gk``: a per-channel decay)."""
    operands: dict = {}
    roles: dict = {}
    if use_gate_in_kernel:
        if A_log is None:
            raise ValueError("A_log: required when use_gate_in_kernel=True")
        if g is None:
            raise ValueError("g: the raw gate input is required when use_gate_in_kernel=True")
        if dt_bias is not None:
            gate = "-exp(A_log) * softplus(a + dt_bias)"
            roles.update(a="token", A_log="head", dt_bias="head")
            operands.update(a=g, A_log=A_log, dt_bias=dt_bias)
        else:
            gate = "-exp(A_log) * softplus(a)"
            roles.update(a="token", A_log="head")
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
            gate = "g + gk"
            roles.update(g="token", gk="token_channel")
        operands["gk" if g is not None else "g"] = gk
    if beta is None:
        if use_sigmoid:
            raise ValueError("beta: required by use_beta_sigmoid_in_kernel=True")
        b = False
    else:
        b = _beta_term(use_sigmoid, allow_neg_eigval, roles)
        operands["b" if use_sigmoid else "beta"] = beta
    key = _OpKey(decay=decay, correction="delta", gate=gate, beta=b, roles=_roles(**roles), qk_l2norm=l2norm,
                 chunk_size=chunk_size)
    return key, operands


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
    cp_group: object | None = None,
    **unsupported,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated DeltaNet over whole sequences, chunk by chunk (fla's ``chunk_gated_delta_rule``).

    Each value head carries a state ``S`` of shape ``[K, V]``; per token::

        S_t = (I - beta_t k_t k_tᵀ) · exp(g_t) · S_(t-1) + beta_t k_t v_tᵀ
        o_t = scale · S_tᵀ q_t

    Sizes: ``B`` batch, ``T`` tokens, ``H`` query/key heads, ``HV`` value heads (a multiple
    of ``H``: value head ``i`` reads query/key head ``i // (HV / H)``), ``K`` and ``V`` the
    key and value head sizes, ``N`` sequences (``B``, or ``len(cu_seqlens) - 1``).

    Args:
        q: Queries ``[B, T, H, K]``, bf16, fp16 or fp32 (fp64 only for CPU tensors, which
            run through Triton's interpreter). ``k`` and ``v`` have the same dtype.
        k: Keys ``[B, T, H, K]``.
        v: Values ``[B, T, HV, V]``.
        g: Log-space decay ``[B, T, HV]`` (expected ``<= 0``: the state is multiplied by
            ``exp(g_t)``), any floating dtype. With ``use_gate_in_kernel=True`` it is the raw
            input ``a`` of the in-kernel gate instead (see there). ``None`` runs without decay.
        beta: Write strengths ``[B, T, HV]``, any floating dtype; logits when
            ``use_beta_sigmoid_in_kernel=True``. ``None`` means ``beta = 1`` (not allowed
            with ``use_beta_sigmoid_in_kernel=True``).
        scale: Positive multiplier of the outputs ``S_tᵀ q_t``. Default ``None``: ``K ** -0.5``.
        initial_state: States before the first token, ``[N, HV, K, V]`` (``[N, HV, V, K]``
            with ``state_v_first=True``), any floating dtype; read, never written.
            Default ``None``: zeros.
        output_final_state: Also return each sequence's state after its last token.
            Default ``False``.
        use_qk_l2norm_in_kernel: L2-normalise ``q`` and ``k`` over ``K`` inside the kernel
            (the gradients include the normalisation). Default ``False``.
        use_beta_sigmoid_in_kernel: ``beta`` holds logits; the kernel applies
            ``sigmoid``. Default ``False``: ``beta`` is used as given.
        allow_neg_eigval: Double the sigmoid, ``beta = 2 · sigmoid(b)`` in ``(0, 2)``, so
            that ``I - beta k kᵀ`` may have negative eigenvalues. Requires
            ``use_beta_sigmoid_in_kernel=True``. Default ``False``.
        state_v_first: ``initial_state`` and the returned state are laid out
            ``[..., V, K]`` instead of ``[..., K, V]``. Default ``False``.
        cu_seqlens: Packed variable-length sequences: with ``B = 1``, sequence ``n`` is
            tokens ``cu_seqlens[n]`` to ``cu_seqlens[n + 1]``. int32 or int64 ``[N + 1]``,
            starting at 0, strictly increasing, ending at ``T`` (values are checked for CPU
            tensors). Default ``None``: each batch row is one sequence.
        cu_seqlens_cpu: fla's host copy of ``cu_seqlens``. Only its shape is checked
            (it must match ``cu_seqlens``, which it needs); the kernels never read it.
            Default ``None``.
        chunk_indices: fla's precomputed chunk list for packed sequences. Accepted and
            not read: the kernels build their chunk tables on the device. Default ``None``.
        cp_context: fla's context-parallel state. Only ``None`` (the default) is accepted;
            context parallelism takes ``cp_group`` (:mod:`linattn.context_parallel`).
        use_gate_in_kernel: Keyword only. Compute the decay in the kernel from the raw ``g``
            as ``-exp(A_log) · softplus(g + dt_bias)`` (with gradients for ``g``, ``A_log``
            and ``dt_bias``). Default ``False``.
        A_log: Keyword only. ``[HV]``, the log of the gate's per-head rate, any floating
            dtype. Required with ``use_gate_in_kernel=True`` and rejected without it.
            Default ``None``.
        dt_bias: Keyword only. ``[HV]``, added to ``g`` inside the softplus, any floating
            dtype. Optional with ``use_gate_in_kernel=True``, rejected without it.
            Default ``None``.
        chunk_size: Keyword only, not an fla argument. Tokens per chunk: 16, 32 or 64; the
            result is the same recurrence. Default 64.
        cp_group: Keyword only, not an fla argument. A ``torch.distributed`` process group
            for context parallelism (:mod:`linattn.context_parallel`): the tensors are this
            rank's share of one packed stream (batch 1), ``cu_seqlens`` the global offsets
            and ``initial_state`` all N states, the same on every rank; returns this rank's
            share of ``o`` and all N final states.
        **unsupported: Any other keyword (fla's ``head_first``, for one) is rejected.

    Returns:
        A tuple ``(o, final_state)``. ``o``: the outputs ``[B, T, HV, V]`` in ``q``'s dtype.
        ``final_state``: ``[N, HV, K, V]`` (``[N, HV, V, K]`` with ``state_v_first=True``)
        in fp32 (fp64 for fp64 inputs) if ``output_final_state``, else ``None``.

    Raises:
        ValueError: An unknown keyword (``chunk_gated_delta_rule: unsupported argument(s)
            [...]``); a ``cp_context``; a ``chunk_size`` outside 16, 32, 64;
            ``use_gate_in_kernel=True`` without ``A_log`` or ``g``; ``A_log`` or ``dt_bias``
            without it; ``allow_neg_eigval`` or a missing ``beta`` with the wrong
            ``use_beta_sigmoid_in_kernel``; ``cu_seqlens_cpu`` without ``cu_seqlens``; and a
            tensor of the wrong shape, dtype or device (the message names it).
    """
    _unexpected("chunk_gated_delta_rule", unsupported)
    if cp_context is not None:
        raise ValueError("cp_context: fla's context object is not taken; pass cp_group= (a torch.distributed process group)")
    chunk = _chunk("chunk_gated_delta_rule", chunk_size, (16, 32, 64))
    key, operands = _gdn_spec(g, None, beta, use_gate_in_kernel, A_log, dt_bias, use_beta_sigmoid_in_kernel,
                              allow_neg_eigval, use_qk_l2norm_in_kernel, chunk)
    return _run(key, q, k, v, scale, initial_state, output_final_state, state_v_first, cu_seqlens, cu_seqlens_cpu,
                operands, cp_group)


def _run(key, q, k, v, scale, initial_state, output_final_state, state_v_first, cu_seqlens, cu_seqlens_cpu,
         operands, cp_group=None):
    """Run the chunk kernels of the option set ``key`` (an :class:`_OpKey`)."""
    h0 = _state_in(initial_state, state_v_first) if state_v_first else initial_state
    o, ht = _compiled(key)(
        q, k, v, scale=scale, initial_state=h0, output_final_state=output_final_state,
        cu_seqlens=_cu(cu_seqlens, cu_seqlens_cpu), cp_group=cp_group, **operands,
    )
    if ht is not None and state_v_first:
        ht = ht.transpose(-1, -2)
    return o, ht


# ----------------------------------------------------------------------------- fla: DeltaProduct
def chunk_gated_delta_product(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    num_householder: int,
    scale: float = None,
    initial_state: torch.Tensor = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    cu_seqlens_cpu: torch.Tensor | None = None,
    cp_context: object | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated DeltaProduct (fla's ``chunk_gated_delta_product``): per token one decay, then
    ``num_householder`` delta-rule steps, each with its own key, value and β::

        S <- exp(g_t) · S
        S <- (I - beta_tj k_tj k_tjᵀ) · S + beta_tj k_tj v_tjᵀ      for j = 0 .. n - 1
        o_t = scale · Sᵀ q_t

    Runs on the delta rule's generated kernels over ``T · n`` rows (:mod:`linattn.steps`),
    forward and backward. Sizes: ``B`` batch, ``T`` tokens, ``n`` = ``num_householder``,
    ``H`` query/key heads, ``HV`` value heads (a multiple of ``H``), ``N`` sequences.

    Args:
        q: Queries ``[B, T, H, K]``, bf16, fp16 or fp32 (fp64 only for CPU tensors, which
            run through Triton's interpreter). ``k`` and ``v`` have the same dtype.
        k: Keys ``[B, T · n, H, K]``: step ``j`` of token ``t`` at row ``t · n + j``.
        v: Values ``[B, T · n, HV, V]``, rows as ``k``.
        g: Log-space decay per head and token ``[B, T, HV]`` (expected ``<= 0``), any
            floating dtype, or ``None`` for no decay.
        beta: Write strengths ``[B, T · n, HV]``, one per step, any floating dtype.
        num_householder: ``n``, a positive int.
        scale: Positive multiplier of the outputs. Default ``None``: ``K ** -0.5``.
        initial_state: States before the first token ``[N, HV, K, V]``, any floating dtype;
            read, never written. Default ``None``: zeros.
        output_final_state: Also return each sequence's final state. Default ``False``.
        use_qk_l2norm_in_kernel: L2-normalise ``q`` and ``k`` over ``K`` inside the kernel.
            Default ``False``.
        cu_seqlens: Packed sequences (``B = 1``): int32 or int64 ``[N + 1]`` token offsets
            (the steps' rows are ``n`` times these), starting at 0, strictly increasing,
            ending at ``T``. Default ``None``.
        cu_seqlens_cpu: fla's host copy of ``cu_seqlens``; only its shape is checked.
        cp_context: fla's context-parallel state. Only ``None`` (the default) is accepted;
            the compiled op (``linattn.compile``) takes ``cp_group=``.

    Returns:
        ``(o, final_state)``: ``o`` ``[B, T, HV, V]`` in ``q``'s dtype; ``final_state``
        ``[N, HV, K, V]`` fp32 (fp64 for fp64 inputs) if ``output_final_state``, else ``None``.

    Raises:
        ValueError: ``num_householder`` not a positive int; a ``cp_context``; a tensor of
            the wrong shape, dtype or device (the message names it). An unknown keyword is
            a TypeError, as in fla (the signature is fla's).
    """
    if cp_context is not None:
        raise ValueError("cp_context: fla's context object is not taken; compile the spec and pass cp_group=")
    n = num_householder
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"num_householder: expected a positive int, got {n!r}")
    decayed = g is not None
    key = _OpKey(decay="scalar" if decayed else "none", correction="delta", beta=True,
                 qk_l2norm=use_qk_l2norm_in_kernel, householder=n, name="GATED_DELTA_PRODUCT")
    operands = {"beta": beta, **({"g": g} if decayed else {})}
    return _run(key, q, k, v, scale, initial_state, output_final_state, False, cu_seqlens, cu_seqlens_cpu, operands)


# ----------------------------------------------------------------------------- fla: Comba
_COMBA_DOC = """

        S_t = (I - beta_t k_t p_tᵀ) · exp(g_t) · S_(t-1) + beta_t k_t v_tᵀ
        o_t = scale · S_tᵀ q_t

    The correction reads the state along ``p`` and writes along ``k`` (with ``p = k`` it is
    the gated delta rule). Sizes: ``B`` batch, ``T`` tokens, ``H`` query/key heads, ``HV``
    value heads (a multiple of ``H``), ``N`` sequences (``B``, or ``len(cu_seqlens) - 1``).

    Args:
        q: Queries ``[B, T, H, K]``, bf16, fp16 or fp32 (fp64 only for CPU tensors, which
            run through Triton's interpreter). ``k``, ``p`` and ``v`` have the same dtype.
        k: Keys ``[B, T, H, K]`` (written along).
        p: Read keys ``[B, T, H, K]``. ``None`` (``chunk_comba`` only, as in fla): ``k``.
        v: Values ``[B, T, HV, V]``.
        g: Log-space decay per head and token ``[B, T, HV]`` (expected ``<= 0``), any
            floating dtype, or ``None`` for no decay.
        beta: Write strengths ``[B, T, HV]``, any floating dtype. Default ``None``: 1.
        scale: Positive multiplier of the outputs. Default ``None``: ``K ** -0.5``.
        initial_state: States before the first token ``[N, HV, K, V]``, any floating dtype;
            read, never written. Default ``None``: zeros.
        output_final_state: Also return each sequence's final state. Default ``False``.
        use_qk_l2norm_in_kernel: L2-normalise ``q``, ``k`` and ``p`` over ``K`` inside the
            kernels. Default ``False``.
        cu_seqlens: Packed sequences (``B = 1``): int32 or int64 ``[N + 1]`` token offsets,
            starting at 0, strictly increasing, ending at ``T``. Default ``None``.
{extra}
    Returns:
        ``(o, final_state)``: ``o`` ``[B, T, HV, V]`` in ``q``'s dtype; ``final_state``
        ``[N, HV, K, V]`` fp32 (fp64 for fp64 inputs) if ``output_final_state``, else ``None``.

    Raises:
        ValueError: a tensor of the wrong shape, dtype or device (the message names it). An
            unknown keyword is a TypeError, as in fla (the signature is fla's).
    """


def _comba(p, k, g, beta, l2norm):
    key = _OpKey(decay="none" if g is None else "scalar", correction="comba", beta=beta is not None,
                 qk_l2norm=l2norm, name="COMBA")
    operands = {"p": k if p is None else p, **({"g": g} if g is not None else {}),
                **({"beta": beta} if beta is not None else {})}
    return key, operands


def chunk_comba(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    p: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor = None,
    scale: float = None,
    initial_state: torch.Tensor = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    cu_seqlens_cpu: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    key, operands = _comba(p, k, g, beta, use_qk_l2norm_in_kernel)
    return _run(key, q, k, v, scale, initial_state, output_final_state, False, cu_seqlens, cu_seqlens_cpu, operands)


def fused_recurrent_comba(
    q: torch.Tensor,
    k: torch.Tensor,
    p: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor = None,
    scale: float = None,
    initial_state: torch.Tensor = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    if p is None:
        raise ValueError("p: required (fused_recurrent_comba reads the state along p)")
    key, operands = _comba(p, k, g, beta, use_qk_l2norm_in_kernel)
    return _run_recurrent(key, q, k, v, scale, initial_state, output_final_state, False, cu_seqlens, operands)


chunk_comba.__doc__ = "Comba (fla's ``chunk_comba``), by the chunk kernels; per token::" + _COMBA_DOC.format(
    extra="        cu_seqlens_cpu: fla's host copy of ``cu_seqlens``; only its shape is checked.\n")
fused_recurrent_comba.__doc__ = (
    "Comba token by token (fla's ``fused_recurrent_comba``; note its argument order ``q, k, p, v``).\n\n"
    "    Without autograd the decode step kernel runs through the tokens; under autograd the chunk\n"
    "    kernels compute the same recurrence, so unlike fla's this op can be trained. Per token::"
    + _COMBA_DOC.format(extra=""))


# ----------------------------------------------------------------------------- fla: DPLR, IPLR, RWKV-7
_DPLR_ARGS = {
    "q": "Queries ``[B, T, H, K]``, bf16, fp16 or fp32 (fp64 only for CPU tensors, which run through "
         "Triton's interpreter). ``k``, ``v``, ``a``, ``b`` have the same dtype.",
    "r": "The receptance ``[B, T, H, K]`` (the query), bf16, fp16 or fp32 (fp64 only for CPU tensors). "
         "``k``, ``v``, ``a``, ``b`` have the same dtype.",
    "k": "Keys ``[B, T, H, K]``: the write ``k_t v_tᵀ``.",
    "v": "Values ``[B, T, HV, V]``.",
    "a": "The low-rank term's read vector ``[B, T, H, K]``: ``u_t = a_tᵀ S_(t-1)``.",
    "b": "The low-rank term's write vector ``[B, T, H, K]``: ``S_t += b_t u_tᵀ``.",
    "kk": "``[B, T, H, K]``: the low-rank term reads along ``-kk``.",
    "gk": "Log-space decay per channel ``[B, T, HV, K]`` (expected ``<= 0``), any floating dtype.",
    "w": "Log-space decay per channel ``[B, T, HV, K]`` (expected ``<= 0``), any floating dtype.",
    "scale": "Positive multiplier of the outputs. ``None``: ``K ** -0.5``.",
    "initial_state": "States before the first token ``[N, HV, K, V]``, any floating dtype; read, never "
                     "written. Default ``None``: zeros.",
    "output_final_state": "Also return each sequence's final state.",
    "reverse": "Run each sequence from its last token to its first. Default ``False``.",
    "cu_seqlens": "Packed sequences (``B = 1``): int32 or int64 ``[N + 1]`` token offsets, starting at 0, "
                  "strictly increasing, ending at ``T``. Default ``None``.",
    "cu_seqlens_cpu": "fla's host copy of ``cu_seqlens``; only its shape is checked.",
    "safe_gate": "fla's promise that the gate lies in about ``[-5, 0)`` (a faster kernel there); no "
                 "effect here, where every gate is exact. Default ``False``.",
    "chunk_size": "fla's chunk; ``None`` or one of 16, 32, 64: the kernels' chunk is 64 either way (the "
                  "same recurrence). Default ``None``.",
    "disable_recompute": "fla's memory option; no effect here. Default ``False``.",
    "cp_context": "fla's context-parallel state. Only ``None`` is accepted; the compiled op "
                  "(``linattn.compile``) takes ``cp_group=``.",
    "lower_bound": "fla's promise that ``lower_bound <= gate < 0``; no effect here. Default ``None``.",
    "**kwargs": "Any other keyword is rejected.",
}


def _dplr_doc(fn, title: str, mode: str, transition: str, extra: str = "", **own: str) -> None:
    """``fn``'s docstring: ``title``, the recurrence, and every argument from :data:`_DPLR_ARGS`
    (or ``own``, where the op gives an argument its own meaning)."""
    import inspect

    names = [("**" if p.kind is p.VAR_KEYWORD else "") + p.name for p in inspect.signature(fn).parameters.values()]
    args = "\n".join(f"        {n}: {own.get(n, _DPLR_ARGS[n])}" for n in names)
    fn.__doc__ = f"""{title}

    {mode} Per token::

        {transition}
        o_t = scale · S_tᵀ {"r_t" if "r" in names else "q_t"}

    The chunk form runs on Comba's generated kernels, two rows per token
    (:class:`linattn.steps.DplrOp`); every input has its gradient.{extra} Sizes: ``B`` batch,
    ``T`` tokens, ``H`` query/key heads, ``HV`` value heads (a multiple of ``H``), ``N``
    sequences (``B``, or ``len(cu_seqlens) - 1``).

    Args:
{args}

    Returns:
        ``(o, final_state)``: ``o`` ``[B, T, HV, V]`` in the query's dtype; ``final_state``
        ``[N, HV, K, V]`` fp32 (fp64 for fp64 inputs) if ``output_final_state``, else ``None``.

    Raises:
        ValueError: a ``cp_context``; a ``chunk_size`` outside ``None``, 16, 32, 64; an unknown
            keyword where fla takes ``**kwargs`` (a TypeError elsewhere, as in fla); a tensor of
            the wrong shape, dtype or device (the message names it).
    """


_CHUNK_MODE = "By the chunk kernels."
_RECURRENT_MODE = ("Token by token: without autograd the decode step kernel runs through the tokens; under "
                   "autograd the chunk kernels compute the same recurrence, so unlike fla's this op can be "
                   "trained.")
_DPLR_T = "S_t = (Diag(exp(gk_t)) + b_t a_tᵀ) · S_(t-1) + k_t v_tᵀ"
_IPLR_T = "S_t = (I + b_t a_tᵀ) · S_(t-1) + k_t v_tᵀ"


def _dplr_key(decayed: bool, name: str) -> _OpKey:
    return _OpKey(decay="channel" if decayed else "none", correction="dplr", name=name)


def _fla_chunk_options(fn: str, chunk_size, cp_context) -> None:
    if cp_context is not None:
        raise ValueError("cp_context: fla's context object is not taken; compile the spec and pass cp_group=")
    if chunk_size is not None:
        _chunk(fn, chunk_size, (16, 32, 64))


def _reversed(x: torch.Tensor, cu: torch.Tensor | None) -> torch.Tensor:
    """``x`` ``[B, T, ...]`` with each sequence's tokens in reverse order (its own inverse)."""
    if cu is None:
        return x.flip(1)
    t = torch.arange(x.shape[1], device=x.device)
    seq = torch.searchsorted(cu.to(torch.int64), t, right=True) - 1  # on the device: no host read
    seq = seq.clamp(0, cu.numel() - 2)
    return x[:, cu[seq] + cu[seq + 1] - 1 - t]


def _dplr_recurrent(key, q, k, v, a, b, g, scale, initial_state, output_final_state, reverse, cu_seqlens):
    operands = {"a": a, "b": b, **({"g": g} if g is not None else {})}
    if reverse:
        cu = _cu(cu_seqlens)
        q, k, v = (_reversed(x, cu) for x in (q, k, v))
        operands = {n: _reversed(x, cu) for n, x in operands.items()}
    o, ht = _run_recurrent(key, q, k, v, scale, initial_state, output_final_state, False, cu_seqlens, operands)
    return (_reversed(o, _cu(cu_seqlens)) if reverse else o), ht


def chunk_dplr_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    gk: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    cu_seqlens_cpu: torch.Tensor | None = None,
    safe_gate: bool = False,
    chunk_size: int | None = None,
    disable_recompute: bool = False,
    cp_context: object | None = None,
    lower_bound: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    _unexpected("chunk_dplr_delta_rule", kwargs)
    _fla_chunk_options("chunk_dplr_delta_rule", chunk_size, cp_context)
    return _run(_dplr_key(True, "DPLR"), q, k, v, scale, initial_state, output_final_state, False, cu_seqlens,
                cu_seqlens_cpu, {"a": a, "b": b, "g": gk})


def chunk_iplr_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    cu_seqlens_cpu: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    _unexpected("chunk_iplr_delta_rule", kwargs)
    return _run(_dplr_key(False, "IPLR"), q, k, v, scale, initial_state, output_final_state, False, cu_seqlens,
                cu_seqlens_cpu, {"a": a, "b": b})


def fused_recurrent_dplr_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    gk: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    reverse: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    return _dplr_recurrent(_dplr_key(True, "DPLR"), q, k, v, a, b, gk, scale, initial_state, output_final_state,
                           reverse, cu_seqlens)


def fused_recurrent_iplr_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    scale: float = None,
    initial_state: torch.Tensor = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    return _dplr_recurrent(_dplr_key(False, "IPLR"), q, k, v, a, b, None, scale, initial_state, output_final_state,
                           False, cu_seqlens)


def chunk_rwkv7(
    r: torch.Tensor,
    w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    scale: float = 1.0,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    cu_seqlens_cpu: torch.Tensor | None = None,
    safe_gate: bool = False,
    chunk_size: int | None = None,
    disable_recompute: bool = False,
    cp_context: object | None = None,
    lower_bound: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    _fla_chunk_options("chunk_rwkv7", chunk_size, cp_context)
    return _run(_dplr_key(True, "RWKV7"), r, k, v, scale, initial_state, output_final_state, False, cu_seqlens,
                cu_seqlens_cpu, {"a": a, "b": b, "g": w})


def fused_recurrent_rwkv7(
    r: torch.Tensor,
    w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = True,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    return _dplr_recurrent(_dplr_key(True, "RWKV7"), r, k, v, a, b, w, scale, initial_state, output_final_state,
                           False, cu_seqlens)


def fused_mul_recurrent_rwkv7(
    r: torch.Tensor,
    w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kk: torch.Tensor,
    a: torch.Tensor,
    scale: float = 1.0,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    reverse: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    return _dplr_recurrent(_dplr_key(True, "RWKV7"), r, k, v, -kk, kk * a, w, scale, initial_state,
                           output_final_state, reverse, cu_seqlens)


_dplr_doc(chunk_dplr_delta_rule, "DPLR delta rule (fla's ``chunk_dplr_delta_rule``).", _CHUNK_MODE, _DPLR_T)
_dplr_doc(chunk_iplr_delta_rule, "IPLR delta rule (fla's ``chunk_iplr_delta_rule``).", _CHUNK_MODE, _IPLR_T,
          " fla's chunk op has no backward; this one has.")
_dplr_doc(fused_recurrent_dplr_delta_rule, "DPLR delta rule token by token (fla's ``fused_recurrent_dplr_delta_rule``).",
          _RECURRENT_MODE, _DPLR_T)
_dplr_doc(fused_recurrent_iplr_delta_rule, "IPLR delta rule token by token (fla's ``fused_recurrent_iplr_delta_rule``).",
          _RECURRENT_MODE, _IPLR_T)
_dplr_doc(chunk_rwkv7, "RWKV-7's time mixing (fla's ``chunk_rwkv7``): DPLR with ``q = r``, ``gk = w``; fla's "
          "default scale 1.", _CHUNK_MODE, _DPLR_T.replace("gk_t", "w_t"))
_dplr_doc(fused_recurrent_rwkv7, "RWKV-7 token by token (fla's ``fused_recurrent_rwkv7``; its default returns "
          "the final state).", _RECURRENT_MODE, _DPLR_T.replace("gk_t", "w_t"))
_dplr_doc(fused_mul_recurrent_rwkv7, "RWKV-7 token by token with the low-rank vectors from ``kk`` and ``a`` (fla's "
          "``fused_mul_recurrent_rwkv7``): the DPLR read vector is ``-kk``, the write vector ``kk ⊙ a``.",
          _RECURRENT_MODE, "S_t = (Diag(exp(w_t)) - (kk_t ⊙ a_t) kk_tᵀ) · S_(t-1) + k_t v_tᵀ",
          a="The in-context rate ``[B, T, H, K]``: the write vector is ``kk ⊙ a``.")


# ----------------------------------------------------------------------------- fla: KDA
def _kda_spec(q, v, g, beta, use_gate_in_kernel, A_log, dt_bias, lower_bound, use_sigmoid, allow_neg_eigval, l2norm,
              chunk_size):
    """The key and operands of fla's KDA options."""
    HV, K = v.shape[2], q.shape[-1]
    operands: dict = {}
    roles: dict = {}
    if use_gate_in_kernel:
        if A_log is None and lower_bound is None:
            raise ValueError("A_log: required when use_gate_in_kernel=True and lower_bound is not set")
        inner = "a" if dt_bias is None else "(a + dt_bias)"
        roles["a"] = "token_channel"
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
            gate = f"lower_bound * sigmoid({arg})"
            roles["lower_bound"] = "scalar"
            operands["lower_bound"] = float(lower_bound)
        else:
            gate = f"-exp(A_log) * softplus({inner})"
        operands["a"] = g
    else:
        for name, x in (("A_log", A_log), ("dt_bias", dt_bias)):
            if x is not None:
                raise ValueError(f"{name}: only used with use_gate_in_kernel=True")
        gate = None
        operands["g"] = g
    b = _beta_term(use_sigmoid, allow_neg_eigval, roles)
    operands["b" if use_sigmoid else "beta"] = beta
    key = _OpKey(decay="channel", correction="delta", gate=gate, beta=b, roles=_roles(**roles), qk_l2norm=l2norm,
                 chunk_size=chunk_size)
    return key, operands


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
    cp_group: object | None = None,
    **unsupported,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Kimi Delta Attention over whole sequences, chunk by chunk (fla's ``chunk_kda``).

    The gated delta rule with a decay per key channel: each value head carries a state
    ``S`` of shape ``[K, V]``; per token::

        S_t = (I - beta_t k_t k_tᵀ) · diag(exp(g_t)) · S_(t-1) + beta_t k_t v_tᵀ
        o_t = scale · S_tᵀ q_t

    Sizes: ``B`` batch, ``T`` tokens, ``H`` query/key heads, ``HV`` value heads (a multiple
    of ``H``: value head ``i`` reads query/key head ``i // (HV / H)``), ``K`` and ``V`` the
    key and value head sizes, ``N`` sequences (``B``, or ``len(cu_seqlens) - 1``).

    Args:
        q: Queries ``[B, T, H, K]``, bf16, fp16 or fp32 (fp64 only for CPU tensors, which
            run through Triton's interpreter). ``k`` and ``v`` have the same dtype.
        k: Keys ``[B, T, H, K]``.
        v: Values ``[B, T, HV, V]``.
        g: Log-space decay per channel ``[B, T, HV, K]`` (expected ``<= 0``), any floating
            dtype. With ``use_gate_in_kernel=True`` it is the raw input of the in-kernel gate
            instead (see there).
        beta: Write strengths ``[B, T, HV]``, any floating dtype; logits when
            ``use_beta_sigmoid_in_kernel=True``. Required.
        scale: Positive multiplier of the outputs ``S_tᵀ q_t``. Default ``None``: ``K ** -0.5``.
        initial_state: States before the first token, ``[N, HV, K, V]`` (``[N, HV, V, K]``
            with ``state_v_first=True``), any floating dtype; read, never written.
            Default ``None``: zeros.
        output_final_state: Also return each sequence's state after its last token.
            Default ``False``.
        use_qk_l2norm_in_kernel: L2-normalise ``q`` and ``k`` over ``K`` inside the kernel
            (the gradients include the normalisation). Default ``False``.
        use_gate_in_kernel: Compute the decay in the kernel from the raw ``g``:
            ``-exp(A_log) · softplus(g + dt_bias)``, or with ``lower_bound``
            ``lower_bound · sigmoid(exp(A_log) · (g + dt_bias))`` (``lower_bound ·
            sigmoid(g + dt_bias)`` when ``A_log`` is ``None``); ``dt_bias`` is optional in
            each. Gradients flow to ``g``, ``A_log`` and ``dt_bias``. Default ``False``.
        use_beta_sigmoid_in_kernel: ``beta`` holds logits; the kernel applies
            ``sigmoid``. Default ``False``: ``beta`` is used as given.
        allow_neg_eigval: ``beta = 2 · sigmoid(b)`` in ``(0, 2)`` instead of
            ``sigmoid(b)``. Requires ``use_beta_sigmoid_in_kernel=True``. Default ``False``.
        safe_gate: fla's switch to kernels for bounded gates. With
            ``use_gate_in_kernel=True`` it requires ``lower_bound`` in ``[-5, 0)``; otherwise
            it has no effect here (the result is the same). Default ``False``.
        lower_bound: A negative float; with ``use_gate_in_kernel=True`` it selects the
            bounded gate above, whose values lie in ``(lower_bound, 0)``. Has no effect
            without ``use_gate_in_kernel``. Default ``None``.
        disable_recompute: A memory/speed trade-off of fla's backward. Accepted; no effect
            here. Default ``False``.
        return_intermediate_states: fla's inference mode returning the per-chunk states.
            Only ``False`` (the default) is accepted.
        state_v_first: ``initial_state`` and the returned state are laid out
            ``[..., V, K]`` instead of ``[..., K, V]``. Default ``False``.
        cu_seqlens: Packed variable-length sequences: with ``B = 1``, sequence ``n`` is
            tokens ``cu_seqlens[n]`` to ``cu_seqlens[n + 1]``. int32 or int64 ``[N + 1]``,
            starting at 0, strictly increasing, ending at ``T`` (values are checked for CPU
            tensors). Default ``None``: each batch row is one sequence.
        cu_seqlens_cpu: fla's host copy of ``cu_seqlens``. Only its shape is checked
            (it must match ``cu_seqlens``, which it needs); the kernels never read it.
            Default ``None``.
        cp_context: fla's context-parallel state. Only ``None`` (the default) is accepted;
            context parallelism takes ``cp_group`` (:mod:`linattn.context_parallel`).
        use_graph: fla's fixed-shape mode for CUDA/NPU graph capture. Only ``False`` (the
            default) is accepted.
        max_num_seqs: fla's sequence bound for ``use_graph``. Accepted; no effect here.
            Default ``None``.
        A_log: Keyword only. ``[HV]``, the log of the gate's per-head rate, any floating
            dtype. Required with ``use_gate_in_kernel=True`` unless ``lower_bound`` is set;
            rejected without ``use_gate_in_kernel``. Default ``None``.
        dt_bias: Keyword only. ``HV * K`` elements (fla passes ``[HV * K]``; read as
            ``[HV, K]``), added to ``g`` inside the gate, any floating dtype. Optional with
            ``use_gate_in_kernel=True``, rejected without it. Default ``None``.
        chunk_size: Keyword only, not an fla argument. Tokens per chunk: 32 or 64; the
            result is the same recurrence. Default 64.
        cp_group: Keyword only, not an fla argument. A ``torch.distributed`` process group
            for context parallelism (:mod:`linattn.context_parallel`): the tensors are this
            rank's share of one packed stream (batch 1), ``cu_seqlens`` the global offsets
            and ``initial_state`` all N states, the same on every rank; returns this rank's
            share of ``o`` and all N final states.
        **unsupported: Any other keyword is rejected.

    Returns:
        A tuple ``(o, final_state)``. ``o``: the outputs ``[B, T, HV, V]`` in ``q``'s dtype.
        ``final_state``: ``[N, HV, K, V]`` (``[N, HV, V, K]`` with ``state_v_first=True``)
        in fp32 (fp64 for fp64 inputs) if ``output_final_state``, else ``None``.

    Raises:
        ValueError: An unknown keyword (``chunk_kda: unsupported argument(s) [...]``); a
            ``cp_context``; ``return_intermediate_states=True``; ``use_graph=True``; a
            ``chunk_size`` outside 32, 64; ``safe_gate`` with the in-kernel gate and no
            ``lower_bound`` in ``[-5, 0)``; the in-kernel gate without ``A_log`` or
            ``lower_bound``; ``A_log`` or ``dt_bias`` without it; ``dt_bias`` without
            ``HV * K`` elements; ``allow_neg_eigval`` without
            ``use_beta_sigmoid_in_kernel``; ``cu_seqlens_cpu`` without ``cu_seqlens``; and a
            tensor of the wrong shape, dtype or device (the message names it).
    """
    _unexpected("chunk_kda", unsupported)
    if cp_context is not None:
        raise ValueError("cp_context: fla's context object is not taken; pass cp_group= (a torch.distributed process group)")
    if return_intermediate_states:
        raise ValueError("return_intermediate_states: not supported")
    if use_graph:
        raise ValueError("use_graph: the NPU graph mode is not supported")
    chunk = _chunk("chunk_kda", chunk_size, (32, 64))
    if safe_gate and use_gate_in_kernel and (lower_bound is None or not -5 <= lower_bound < 0):
        raise ValueError(f"lower_bound: safe_gate needs a lower_bound in [-5, 0), got {lower_bound!r}")
    key, operands = _kda_spec(q, v, g, beta, use_gate_in_kernel, A_log, dt_bias, lower_bound,
                              use_beta_sigmoid_in_kernel, allow_neg_eigval, use_qk_l2norm_in_kernel, chunk)
    return _run(key, q, k, v, scale, initial_state, output_final_state, state_v_first, cu_seqlens, cu_seqlens_cpu,
                operands, cp_group)


def _run_recurrent(key, q, k, v, scale, initial_state, output_final_state, state_v_first, cu_seqlens, operands):
    """fla's fused_recurrent_*: the step kernel on a copy of the state; under autograd the
    chunk kernels (the same recurrence) so that a recurrent-mode run can be trained."""
    tensors = [q, k, v, initial_state, *operands.values()]
    if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors):
        return _run(key, q, k, v, scale, initial_state, output_final_state, state_v_first, cu_seqlens, None,
                    operands)
    op = _compiled(key)
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
    """Gated DeltaNet token by token, for decoding (fla's ``fused_recurrent_gated_delta_rule``).

    Each value head carries a state ``S`` of shape ``[K, V]``; per token, with the decay
    ``d_t = g_t + gk_t`` (either may be absent; ``gk`` is per key channel)::

        S_t = (I - beta_t k_t k_tᵀ) · diag(exp(d_t)) · S_(t-1) + beta_t k_t v_tᵀ
        o_t = scale · S_tᵀ q_t

    Without autograd the step kernel runs through the tokens one at a time. When a
    gradient is needed (grad mode on and an input that requires it) the chunk kernels
    compute the same recurrence instead, so unlike fla's this op can be trained.

    Sizes: ``B`` batch, ``T`` tokens, ``H`` query/key heads, ``HV`` value heads (a multiple
    of ``H``: value head ``i`` reads query/key head ``i // (HV / H)``), ``K`` and ``V`` the
    key and value head sizes, ``N`` sequences (``B``, or ``len(cu_seqlens) - 1``).

    Args:
        q: Queries ``[B, T, H, K]``, bf16, fp16 or fp32 (fp64 only for CPU tensors, which
            run through Triton's interpreter). ``k`` and ``v`` have the same dtype.
        k: Keys ``[B, T, H, K]``.
        v: Values ``[B, T, HV, V]``.
        g: Log-space decay per head ``[B, T, HV]`` (expected ``<= 0``), any floating dtype.
            With ``use_gate_in_kernel=True`` it is the raw input of the in-kernel gate
            instead (see there). Default ``None``: no per-head decay.
        gk: Log-space decay per key channel ``[B, T, HV, K]`` (expected ``<= 0``), added to
            ``g``. Not allowed with ``use_gate_in_kernel=True``. Default ``None``.
        gv: fla's decay per value channel. Only ``None`` (the default) is accepted.
        beta: Write strengths ``[B, T, HV]``, any floating dtype; logits when
            ``use_beta_sigmoid_in_kernel=True``. Default ``None``: ``beta = 1`` (not
            allowed with ``use_beta_sigmoid_in_kernel=True``).
        scale: Positive multiplier of the outputs ``S_tᵀ q_t``. Default ``None``: ``K ** -0.5``.
        initial_state: States before the first token, ``[N, HV, K, V]`` (``[N, HV, V, K]``
            with ``state_v_first=True``), any floating dtype; read, never written (the
            kernel updates a copy). Default ``None``: zeros.
        output_final_state: Also return each sequence's state after its last token.
            Default ``False``.
        use_qk_l2norm_in_kernel: L2-normalise ``q`` and ``k`` over ``K`` inside the kernel.
            Default ``False``.
        use_gate_in_kernel: Compute the per-head decay in the kernel from the raw ``g`` as
            ``-exp(A_log) · softplus(g + dt_bias)``. Requires ``g``. Default ``False``.
        A_log: ``[HV]``, the log of the gate's per-head rate, any floating dtype. Required
            with ``use_gate_in_kernel=True`` and rejected without it. Default ``None``.
        dt_bias: ``[HV]``, added to ``g`` inside the softplus, any floating dtype. Optional
            with ``use_gate_in_kernel=True``, rejected without it. Default ``None``.
        use_beta_sigmoid_in_kernel: ``beta`` holds logits; the kernel applies
            ``sigmoid``. Default ``False``: ``beta`` is used as given.
        allow_neg_eigval: ``beta = 2 · sigmoid(b)`` in ``(0, 2)`` instead of
            ``sigmoid(b)``. Requires ``use_beta_sigmoid_in_kernel=True``. Default ``False``.
        state_v_first: ``initial_state`` and the returned state are laid out
            ``[..., V, K]`` instead of ``[..., K, V]``. Default ``False``.
        cu_seqlens: Packed variable-length sequences: with ``B = 1``, sequence ``n`` is
            tokens ``cu_seqlens[n]`` to ``cu_seqlens[n + 1]``. int32 or int64 ``[N + 1]``,
            starting at 0, strictly increasing, ending at ``T`` (values are checked for CPU
            tensors). Default ``None``: each batch row is one sequence.
        **unsupported: Any other keyword is rejected.

    Returns:
        A tuple ``(o, final_state)``. ``o``: the outputs ``[B, T, HV, V]`` in ``q``'s dtype.
        ``final_state``: ``[N, HV, K, V]`` (``[N, HV, V, K]`` with ``state_v_first=True``)
        in fp32 (fp64 for fp64 inputs) if ``output_final_state``, else ``None``.

    Raises:
        ValueError: An unknown keyword (``fused_recurrent_gated_delta_rule: unsupported
            argument(s) [...]``); a ``gv``; ``gk`` with the in-kernel gate;
            ``use_gate_in_kernel=True`` without ``A_log`` or ``g``; ``A_log`` or ``dt_bias``
            without it; ``allow_neg_eigval`` or a missing ``beta`` with the wrong
            ``use_beta_sigmoid_in_kernel``; and a tensor of the wrong shape, dtype or device
            (the message names it).
    """
    _unexpected("fused_recurrent_gated_delta_rule", unsupported)
    if gv is not None:
        raise ValueError("gv: decay along the value dimension is not supported")
    key, operands = _gdn_spec(g, gk, beta, use_gate_in_kernel, A_log, dt_bias, use_beta_sigmoid_in_kernel,
                              allow_neg_eigval, use_qk_l2norm_in_kernel, 64)
    return _run_recurrent(key, q, k, v, scale, initial_state, output_final_state, state_v_first, cu_seqlens, operands)


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
    """Kimi Delta Attention token by token, for decoding (fla's ``fused_recurrent_kda``).

    The same recurrence as :func:`chunk_kda`: each value head carries a state ``S`` of
    shape ``[K, V]``; per token::

        S_t = (I - beta_t k_t k_tᵀ) · diag(exp(g_t)) · S_(t-1) + beta_t k_t v_tᵀ
        o_t = scale · S_tᵀ q_t

    Without autograd the step kernel runs through the tokens one at a time. When a
    gradient is needed (grad mode on and an input that requires it) the chunk kernels
    compute the same recurrence instead, so unlike fla's this op can be trained.

    Sizes: ``B`` batch, ``T`` tokens, ``H`` query/key heads, ``HV`` value heads (a multiple
    of ``H``: value head ``i`` reads query/key head ``i // (HV / H)``), ``K`` and ``V`` the
    key and value head sizes, ``N`` sequences (``B``, or ``len(cu_seqlens) - 1``).

    Args:
        q: Queries ``[B, T, H, K]``, bf16, fp16 or fp32 (fp64 only for CPU tensors, which
            run through Triton's interpreter). ``k`` and ``v`` have the same dtype.
        k: Keys ``[B, T, H, K]``.
        v: Values ``[B, T, HV, V]``.
        g: Log-space decay per channel ``[B, T, HV, K]`` (expected ``<= 0``), any floating
            dtype. With ``use_gate_in_kernel=True`` it is the raw input of the in-kernel gate
            instead (see there).
        beta: Write strengths ``[B, T, HV]``, any floating dtype; logits when
            ``use_beta_sigmoid_in_kernel=True``. Required.
        A_log: ``[HV]``, the log of the gate's per-head rate, any floating dtype. Required
            with ``use_gate_in_kernel=True`` unless ``lower_bound`` is set; rejected without
            ``use_gate_in_kernel``. Default ``None``.
        dt_bias: ``HV * K`` elements (read as ``[HV, K]``), added to ``g`` inside the gate,
            any floating dtype. Optional with ``use_gate_in_kernel=True``, rejected without
            it. Default ``None``.
        scale: Positive multiplier of the outputs ``S_tᵀ q_t``. Default ``None``: ``K ** -0.5``.
        initial_state: States before the first token, ``[N, HV, K, V]`` (``[N, HV, V, K]``
            with ``state_v_first=True``), any floating dtype; read, never written (the
            kernel updates a copy). Default ``None``: zeros.
        output_final_state: Also return each sequence's state after its last token.
            Default ``False``.
        use_qk_l2norm_in_kernel: L2-normalise ``q`` and ``k`` over ``K`` inside the kernel.
            Default ``False``.
        use_gate_in_kernel: Compute the decay in the kernel from the raw ``g``:
            ``-exp(A_log) · softplus(g + dt_bias)``, or with ``lower_bound``
            ``lower_bound · sigmoid(exp(A_log) · (g + dt_bias))`` (``lower_bound ·
            sigmoid(g + dt_bias)`` when ``A_log`` is ``None``); ``dt_bias`` is optional in
            each. Default ``False``.
        use_beta_sigmoid_in_kernel: ``beta`` holds logits; the kernel applies
            ``sigmoid``. Default ``False``: ``beta`` is used as given.
        allow_neg_eigval: ``beta = 2 · sigmoid(b)`` in ``(0, 2)`` instead of
            ``sigmoid(b)``. Requires ``use_beta_sigmoid_in_kernel=True``. Default ``False``.
        lower_bound: A negative float; with ``use_gate_in_kernel=True`` it selects the
            bounded gate above. Has no effect without ``use_gate_in_kernel``. Default ``None``.
        state_v_first: ``initial_state`` and the returned state are laid out
            ``[..., V, K]`` instead of ``[..., K, V]``. Default ``False``.
        cu_seqlens: Packed variable-length sequences: with ``B = 1``, sequence ``n`` is
            tokens ``cu_seqlens[n]`` to ``cu_seqlens[n + 1]``. int32 or int64 ``[N + 1]``,
            starting at 0, strictly increasing, ending at ``T`` (values are checked for CPU
            tensors). Default ``None``: each batch row is one sequence.
        **unsupported: Any other keyword is rejected.

    Returns:
        A tuple ``(o, final_state)``. ``o``: the outputs ``[B, T, HV, V]`` in ``q``'s dtype.
        ``final_state``: ``[N, HV, K, V]`` (``[N, HV, V, K]`` with ``state_v_first=True``)
        in fp32 (fp64 for fp64 inputs) if ``output_final_state``, else ``None``.

    Raises:
        ValueError: An unknown keyword (``fused_recurrent_kda: unsupported argument(s)
            [...]``); the in-kernel gate without ``A_log`` or ``lower_bound``; ``A_log`` or
            ``dt_bias`` without it; ``dt_bias`` without ``HV * K`` elements;
            ``allow_neg_eigval`` without ``use_beta_sigmoid_in_kernel``; and a tensor of the
            wrong shape, dtype or device (the message names it).
    """
    _unexpected("fused_recurrent_kda", unsupported)
    key, operands = _kda_spec(q, v, g, beta, use_gate_in_kernel, A_log, dt_bias, lower_bound,
                              use_beta_sigmoid_in_kernel, allow_neg_eigval, use_qk_l2norm_in_kernel, 64)
    return _run_recurrent(key, q, k, v, scale, initial_state, output_final_state, state_v_first, cu_seqlens, operands)


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
    cp_group: object | None = None,
    **unsupported,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Linear attention with a scalar decay per head, chunk by chunk (fla's ``chunk_simple_gla``).

    Each value head carries a state ``S`` of shape ``[K, V]``; per token, with the decay
    ``d_t = g_t + g_gamma`` (either may be absent; neither: plain linear attention)::

        S_t = exp(d_t) · S_(t-1) + k_t v_tᵀ
        o_t = scale · S_tᵀ q_t

    Sizes: ``B`` batch, ``T`` tokens, ``H`` query/key heads, ``HV`` value heads (fla has
    ``HV = H``; here any multiple of ``H``, value head ``i`` reading query/key head
    ``i // (HV / H)``), ``K`` and ``V`` the key and value head sizes, ``N`` sequences
    (``B``, or ``len(cu_seqlens) - 1``).

    Args:
        q: Queries ``[B, T, H, K]``, bf16, fp16 or fp32 (fp64 only for CPU tensors, which
            run through Triton's interpreter). ``k`` and ``v`` have the same dtype.
        k: Keys ``[B, T, H, K]``.
        v: Values ``[B, T, HV, V]``.
        g: Log-space decay per head and token ``[B, T, HV]`` (expected ``<= 0``), any
            floating dtype. Default ``None``.
        g_gamma: Constant log-space decay per head ``[HV]`` (expected ``<= 0``), any floating
            dtype; added to ``g`` when both are given. Default ``None``.
        scale: Positive multiplier of the outputs ``S_tᵀ q_t``. Default ``None``: ``K ** -0.5``.
        initial_state: States before the first token, ``[N, HV, K, V]`` (``[N, HV, V, K]``
            with ``state_v_first=True``), any floating dtype; read, never written.
            Default ``None``: zeros.
        output_final_state: Also return each sequence's state after its last token.
            Default ``False``.
        state_v_first: ``initial_state`` and the returned state are laid out
            ``[..., V, K]`` instead of ``[..., K, V]``. Default ``False``.
        cu_seqlens: Packed variable-length sequences: with ``B = 1``, sequence ``n`` is
            tokens ``cu_seqlens[n]`` to ``cu_seqlens[n + 1]``. int32 or int64 ``[N + 1]``,
            starting at 0, strictly increasing, ending at ``T`` (values are checked for CPU
            tensors). Default ``None``: each batch row is one sequence.
        cu_seqlens_cpu: fla's host copy of ``cu_seqlens``. Only its shape is checked
            (it must match ``cu_seqlens``, which it needs); the kernels never read it.
            Default ``None``.
        chunk_size: Keyword only, not an fla argument. Tokens per chunk: 16, 32 or 64; the
            result is the same recurrence. Default 64.
        cp_group: Keyword only, not an fla argument. A ``torch.distributed`` process group
            for context parallelism (:mod:`linattn.context_parallel`): the tensors are this
            rank's share of one packed stream (batch 1), ``cu_seqlens`` the global offsets
            and ``initial_state`` all N states, the same on every rank; returns this rank's
            share of ``o`` and all N final states.
        **unsupported: Any other keyword is rejected.

    Returns:
        A tuple ``(o, final_state)``. ``o``: the outputs ``[B, T, HV, V]`` in ``q``'s dtype.
        ``final_state``: ``[N, HV, K, V]`` (``[N, HV, V, K]`` with ``state_v_first=True``)
        in fp32 (fp64 for fp64 inputs) if ``output_final_state``, else ``None``.

    Raises:
        ValueError: An unknown keyword (``chunk_simple_gla: unsupported argument(s)
            [...]``); a ``chunk_size`` outside 16, 32, 64; ``cu_seqlens_cpu`` without
            ``cu_seqlens``; and a tensor of the wrong shape, dtype or device (the message
            names it).
    """
    _unexpected("chunk_simple_gla", unsupported)
    chunk = _chunk("chunk_simple_gla", chunk_size, (16, 32, 64))
    operands: dict = {}
    if g is not None and g_gamma is not None:
        key = _OpKey(decay="scalar", gate="g + g_gamma", roles=_roles(g="token", g_gamma="head"), chunk_size=chunk)
        operands.update(g=g, g_gamma=g_gamma)
    elif g is not None:
        key = _OpKey(decay="scalar", gate="g", roles=_roles(g="token"), chunk_size=chunk)
        operands["g"] = g
    elif g_gamma is not None:
        key = _OpKey(decay="scalar", gate="g_gamma", roles=_roles(g_gamma="head"), chunk_size=chunk)
        operands["g_gamma"] = g_gamma
    else:
        key = _OpKey(decay="none", chunk_size=chunk)
    return _run(key, q, k, v, scale, initial_state, output_final_state, state_v_first, cu_seqlens, cu_seqlens_cpu,
                operands, cp_group)


# ----------------------------------------------------------------------------- mamba_ssm: SSD
def _ssd(dt, A, D, z, dt_bias, dt_softplus: bool, dt_limit) -> tuple[CompiledOp, dict]:
    """The compiled SSD op of mamba's options and its gate operands (``dt``, ``A`` per head)."""
    lo, hi = dt_limit
    limit = not (lo == 0.0 and math.isinf(hi) and hi > 0)
    dt_text, dt_roles = gates.mamba_dt_text(softplus=dt_softplus, bias=dt_bias is not None, limit=limit)
    operands: dict = {"dt": dt, "A": A}
    if dt_bias is not None:
        operands["dt_bias"] = dt_bias
    if limit:
        operands.update(dt_min=float(lo), dt_max=float(hi))
    skip = "none" if D is None else ("head" if D.dim() == 1 else "channel")
    op = _compiled(_OpKey(
        decay="scalar", gate=f"A * {dt_text}", beta=dt_text, roles=_roles(A="head", **dt_roles), chunk_size=64,
        skip=skip, output_gate="none" if z is None else "silu", default_scale=1.0, name="MAMBA2",
    ))
    return op, operands


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
    cp_group: object | None = None,
    **unsupported,
):
    """Mamba-2's SSD scan (mamba_ssm's ``mamba_chunk_scan_combined``) as a linear recurrence.

    Each head carries a state ``h`` of shape ``[p, n]`` (mamba's layout); per token, with
    the step size ``s_t = clamp(softplus(dt_t + dt_bias), *dt_limit)`` (each part as
    selected by the arguments)::

        h_t = exp(s_t · A) · h_(t-1) + s_t · x_t B_tᵀ
        y_t = (h_t C_t + D · x_t) · silu(z_t)

    There is no ``1 / sqrt(n)`` scale. Sizes: ``b`` batch, ``l`` tokens, ``h`` heads, ``p``
    head size, ``g`` groups of ``B`` and ``C`` (``h`` a multiple of ``g``: head ``i`` reads
    group ``i // (h / g)``), ``n`` state size, ``N`` packed sequences.

    Args:
        x: Inputs ``[b, l, h, p]``, bf16, fp16 or fp32 (fp64 only for CPU tensors, which
            run through Triton's interpreter). ``B`` and ``C`` have the same dtype.
        dt: Step sizes ``[b, l, h]`` before bias, softplus and clamp, any floating dtype.
        A: ``[h]``, the per-head rate, any floating dtype; negative for a decaying state.
        B: Input projections ``[b, l, g, n]`` (what ``x`` is written along).
        C: Output projections ``[b, l, g, n]`` (what the state is read along).
        chunk_size: A positive int, required as in mamba_ssm. Checked, then not used: the
            kernels pick their own chunk (the result is the same recurrence).
        D: Skip weights ``[h]`` or ``[h, p]``, any floating dtype: ``y += D · x``.
            Default ``None``: no skip.
        z: Output gate ``[b, l, h, p]``, any floating dtype: ``y *= silu(z)`` after the
            skip. Default ``None``: no gate.
        dt_bias: ``[h]``, added to ``dt`` before the softplus, any floating dtype.
            Default ``None``: no bias.
        initial_states: States before the first token ``[b, h, p, n]``, any floating dtype;
            read, never written. With packed sequences ``[1, h, p, n]``: the first
            sequence's (the others start from zeros, as in mamba_ssm). Default ``None``: zeros.
        seq_idx: Packed sequences: ``[1, l]``, the sequence of each token. Must come with
            ``cu_seqlens``; only its shape is checked, the kernels take the sequence bounds
            from ``cu_seqlens``. Default ``None``.
        cu_seqlens: Packed sequences: int32 or int64 ``[N + 1]``, sequence ``i`` being tokens
            ``cu_seqlens[i]`` to ``cu_seqlens[i + 1]`` (starting at 0, strictly increasing,
            ending at ``l``; values checked for CPU tensors). Needs ``seq_idx`` and
            ``b = 1``. Default ``None``.
        dt_softplus: Apply ``softplus`` to ``dt + dt_bias``. Default ``False``.
        dt_limit: ``(lo, hi)``: clamp the step size to ``[lo, hi]`` after bias and
            softplus. Default ``(0.0, inf)``: no clamp.
        return_final_states: Also return the states after the last token, ``[b, h, p, n]``;
            with packed sequences ``[1, h, p, n]``, the last sequence's. Default ``False``.
        return_varlen_states: Also return every packed sequence's final state
            ``[N, h, p, n]``. Requires ``cu_seqlens``. Default ``False``.
        cp_group: Not a mamba_ssm argument. A ``torch.distributed`` process group for
            context parallelism (:mod:`linattn.context_parallel`): ``x``, ``dt``, ``B``,
            ``C``, ``z`` and ``seq_idx`` are this rank's share of one packed stream,
            ``cu_seqlens`` the global offsets and ``initial_states`` the same on every
            rank; the varlen states are all N, the same on every rank.
        **unsupported: Any other keyword is rejected.

    Returns:
        ``out`` ``[b, l, h, p]`` in ``x``'s dtype when no state is asked for; otherwise a
        tuple of ``out`` followed by ``final_states`` and then ``varlen_states``, each only
        if requested. States are fp32 (fp64 for fp64 inputs) in mamba's ``[..., p, n]``
        layout.

    Raises:
        ValueError: An unknown keyword (``mamba_chunk_scan_combined: unsupported
            argument(s) [...]``, where mamba_ssm raises a TypeError); a ``chunk_size`` that
            is not a positive int; ``x`` not 4-D or ``A`` not 1-D; only one of ``seq_idx``
            and ``cu_seqlens``; ``return_varlen_states`` without ``cu_seqlens``; packed
            sequences with ``b > 1`` or a ``seq_idx`` that is not ``[1, l]``; and a tensor
            of the wrong shape, dtype or device (the message names it).
    """
    _unexpected("mamba_chunk_scan_combined", unsupported)
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size: expected a positive int, got {chunk_size!r}")
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError("x: expected a 4-D tensor [batch, seqlen, nheads, headdim]")
    if not isinstance(A, torch.Tensor) or A.dim() != 1:
        raise ValueError("A: expected a 1-D tensor [nheads]")
    op, operands = _ssd(dt, A, D, z, dt_bias, dt_softplus, dt_limit)
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
        C, B, x, initial_state=h0, output_final_state=want_state, cu_seqlens=cu, z=z, D=D, cp_group=cp_group, **operands
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


def _tied(t: torch.Tensor, name: str, dims: tuple[int, ...], what: str) -> torch.Tensor:
    """``t`` with ``dims`` reduced to their first entry, after checking that it does not vary
    along them (a stride-0 broadcast, as transformers passes it, is checked for free)."""
    first = t
    for d in dims:
        first = first.narrow(d, 0, 1)
    if all(t.stride(d) == 0 or t.shape[d] == 1 for d in dims) or torch.equal(t, first.expand_as(t)):
        for d in sorted(dims, reverse=True):
            first = first.squeeze(d)
        return first
    raise ValueError(f"{name}: must be the same along {what} (a per-channel step size is not a Mamba-2 recurrence)")


def selective_state_update(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    state_batch_indices: torch.Tensor | None = None,
    **unsupported,
) -> torch.Tensor:
    """One decode step of Mamba-2 (mamba_ssm's ``selective_state_update``), updating ``state``.

    The same recurrence as :func:`mamba_chunk_scan_combined` for one token per sequence,
    in mamba's multi-head layout, where the per-head values arrive broadcast::

        s = softplus(dt + dt_bias)        (each part as selected)
        state = exp(s · A) · state + s · x Bᵀ
        y = (state C + D · x) · silu(z)

    Sizes: ``b`` sequences, ``h`` heads, ``p`` head size, ``g`` groups, ``n`` state size.

    Args:
        state: ``[b, h, p, n]`` (``[S, h, p, n]`` with ``state_batch_indices``), any floating
            dtype; updated in place.
        x: ``[b, h, p]``, bf16, fp16 or fp32 (fp64 only on the CPU); ``B`` and ``C`` have
            the same dtype.
        dt: ``[b, h, p]``, the same for every ``p`` of a head (mamba passes ``[b, h]``
            expanded); any floating dtype.
        A: ``[h, p, n]``, the same for every ``p`` and ``n`` of a head.
        B: ``[b, g, n]``, what ``x`` is written along.
        C: ``[b, g, n]``, what the state is read along.
        D: ``[h, p]`` or ``[h]``. Default ``None``: no skip.
        z: ``[b, h, p]``: ``y *= silu(z)``. Default ``None``.
        dt_bias: ``[h, p]`` (the same along ``p``) or ``[h]``. Default ``None``.
        dt_softplus: Apply softplus to ``dt + dt_bias``. Default ``False``.
        state_batch_indices: int ``[b]``: sequence ``i`` updates row ``state_batch_indices[i]``
            of ``state``. Default ``None``: row ``i``.
        **unsupported: Any other keyword is rejected.

    Returns:
        ``y`` ``[b, h, p]`` in ``x``'s dtype.

    Raises:
        ValueError: An unknown keyword; mamba's head-less layout (a 3-D ``state``: Mamba-1's
            step size per channel is not a Mamba-2 recurrence); ``dt``, ``dt_bias`` or ``A``
            varying inside a head; a tensor of the wrong shape, dtype or device (the
            message names it).
    """
    _unexpected("selective_state_update", unsupported)
    if not isinstance(state, torch.Tensor) or state.dim() != 4:
        raise ValueError("state: expected a 4-D tensor [batch, nheads, headdim, dstate] (Mamba-2's layout)")
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        raise ValueError("x: expected a 3-D tensor [batch, nheads, headdim]")
    b, h, p = x.shape
    n = state.shape[-1]
    if tuple(state.shape[1:]) != (h, p, n):
        raise ValueError(f"state: expected shape [S, {h}, {p}, {n}], got {list(state.shape)}")
    for name, t, shape in (("dt", dt, (b, h, p)), ("A", A, (h, p, n)), ("z", z, (b, h, p))):
        if t is not None and (not isinstance(t, torch.Tensor) or tuple(t.shape) != shape):
            raise ValueError(f"{name}: expected shape {list(shape)}, got {list(getattr(t, 'shape', []))}")
    for name, t in (("B", B), ("C", C)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3 or t.shape[0] != b or t.shape[2] != n:
            raise ValueError(f"{name}: expected shape [{b}, ngroups, {n}], got {list(getattr(t, 'shape', []))}")
    dt1 = _tied(dt, "dt", (2,), "headdim")
    A1 = _tied(A, "A", (1, 2), "headdim and dstate")
    if dt_bias is not None and dt_bias.dim() == 2:
        dt_bias = _tied(dt_bias, "dt_bias", (1,), "headdim")
    if D is not None and D.dim() == 2 and D.stride(1) == 0:
        D = D[:, 0]
    op, operands = _ssd(dt1[:, None], A1, D, z, dt_bias, dt_softplus, (0.0, math.inf))
    rows = state_batch_indices.long() if state_batch_indices is not None else None
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    mine = (state if rows is None else state[rows]).transpose(-1, -2).to(acc).contiguous()  # [b, h, n, p]
    if mine.shape[0] != b:
        raise ValueError(f"state: {mine.shape[0]} rows for {b} sequences")
    y = op.step(C[:, None], B[:, None], x[:, None], mine, z=None if z is None else z[:, None], D=D, **operands)
    new = mine.transpose(-1, -2).to(state.dtype)
    if rows is None:
        state.copy_(new)
    else:
        state[rows] = new
    return y[:, 0]
