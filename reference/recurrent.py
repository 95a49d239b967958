"""The token-by-token recurrence: the oracle every kernel is checked against.

It is the mathematics of docs/algorithms.md read literally, one token at a time, in whatever
dtype it is given (float64 for the oracle). Slow and obviously right is the point.
"""
from __future__ import annotations

import torch

from linattn.inputs import check_call
from linattn.spec import Correction, Decay, Spec
from linattn.torch_terms import finish, prepare, prepare_vectors

__all__ = ["recurrent", "recurrent_scan"]


def recurrent_scan(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None,
    beta: torch.Tensor | None,
    state: torch.Tensor,
    *,
    decay: Decay,
    correction: Correction,
    scale: float,
    vectors: dict[str, torch.Tensor] | None = None,
    householder: int = 1,
    read_before_decay: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the recurrence over ``[N, L, HV, *]`` inputs from ``state`` ``[N, HV, K, V]``.

    ``vectors``: the correction's inputs ``[N, L, HV, K]`` (``p``; ``a``, ``b``). With
    ``householder = n`` (the delta rule's steps per token) ``k``, ``v`` and ``beta`` hold
    ``L · n`` rows, step ``j`` of token ``t`` at row ``t · n + j``. ``read_before_decay``: the
    delta rule's or Comba's read sees the state before the token's decay.
    Returns the outputs ``[N, L, HV, V]`` (before layer-side terms) and the final state.
    """
    vectors = vectors or {}
    n = householder
    outs = []
    for t in range(q.shape[1]):
        if correction is Correction.DPLR:  # the rank-1 term reads the state before the decay
            low = torch.einsum("nhkv,nhk->nhv", state, vectors["a"][:, t])
        if read_before_decay:  # one row per token: its read before the decay
            r_t = k[:, t] if correction is Correction.DELTA else vectors["p"][:, t]
            early = torch.einsum("nhkv,nhk->nhv", state, r_t)
        if decay is Decay.SCALAR:
            state = state * torch.exp(g[:, t])[..., None, None]
        elif decay is Decay.CHANNEL:
            state = state * torch.exp(g[:, t])[..., :, None]
        if correction is Correction.DPLR:  # (D + b aᵀ) S + k vᵀ
            state = state + vectors["b"][:, t, :, :, None] * low[:, :, None, :]
        for row in range(t * n, (t + 1) * n):
            k_t, v_t = k[:, row], v[:, row]
            if read_before_decay:
                v_t = v_t - early
            elif correction is Correction.DELTA:  # S - β k kᵀ S + β k vᵀ = S + k (β (v - Sᵀ k))ᵀ
                v_t = v_t - torch.einsum("nhkv,nhk->nhv", state, k_t)
            elif correction is Correction.COMBA:  # S - β k pᵀ S + β k vᵀ: read along p, write along k
                v_t = v_t - torch.einsum("nhkv,nhk->nhv", state, vectors["p"][:, t])
            if beta is not None:
                v_t = beta[:, row, :, None] * v_t
            state = state + k_t[..., :, None] * v_t[..., None, :]
        outs.append(scale * torch.einsum("nhkv,nhk->nhv", state, q[:, t]))
    if not outs:
        return v.new_zeros(*q.shape[:3], v.shape[-1]), state
    return torch.stack(outs, dim=1), state


def recurrent(
    spec: Spec,
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
    """The recurrence of ``spec``, token by token, computed in the inputs' dtype (at least fp32).

    ``q, k``: ``[B, T, H, K]``; ``v``: ``[B, T, HV, V]`` with ``HV`` a multiple of ``H``;
    the spec's operands by name (``g``, ``beta``, ``A_log``, ..., and the correction's ``p`` or ``a``,
    ``b`` ``[B, T, H, K]``; with DeltaProduct's steps ``k``, ``v``, ``beta`` have ``T · householder``
    rows). With ``cu_seqlens``
    (int32 ``[N + 1]``, B = 1) the sequences are independent, each with its own state.
    Returns ``(o, final_state)``: ``o`` in q's dtype, ``final_state`` ``[N, HV, K, V]``
    (or None unless ``output_final_state``).
    """
    call = check_call(
        spec, q, k, v, operands, z=z, D=D, scale=scale, initial_state=initial_state, cu_seqlens=cu_seqlens
    )
    dtype = torch.promote_types(q.dtype, torch.float32)
    q, k, v, g, beta = prepare(call, dtype)
    vectors = prepare_vectors(call, dtype)
    steps = spec.householder
    outs, finals = [], []
    for n, (b, start, end) in enumerate(call.segments()):
        sl = (slice(b, b + 1), slice(start, end))
        rows = (slice(b, b + 1), slice(start * steps, end * steps))  # k, v, β: householder rows per token
        if call.initial_state is not None:
            s0 = call.initial_state[n : n + 1].to(dtype)
        else:
            s0 = q.new_zeros(1, call.HV, call.K, call.V)
        o, s = recurrent_scan(
            q[sl],
            k[rows],
            v[rows],
            None if g is None else g[sl],
            None if beta is None else beta[rows],
            s0,
            decay=spec.decay,
            correction=spec.correction,
            scale=call.scale,
            vectors={name: x[sl] for name, x in vectors.items()},
            householder=steps,
            read_before_decay=spec.read_before_decay,
        )
        outs.append(o)
        finals.append(s)
    o = torch.cat(outs, dim=0 if call.cu_seqlens is None else 1)
    o = finish(call, o).to(call.q.dtype)
    return o, (torch.cat(finals, dim=0) if output_final_state else None)
