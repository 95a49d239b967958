"""The chunkwise form of docs/algorithms.md in plain tensor ops, for every spec.

Each stage the generated kernels run is one function here (gate cumsum, intra-chunk
matrices, triangular solve, W/U, sequential state pass, output), so a kernel stage can
be checked against its counterpart, and ``torch.autograd`` through this module gives
the gradient of every stage. Channel-wise decay uses the sub-chunk reference-point
factorization, as the kernels do, so its numerics (not only its algebra) are tested.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from linattn.inputs import check_call
from linattn.spec import Correction, Decay, Spec
from linattn.steps import interleave
from linattn.torch_terms import finish, prepare, prepare_vectors

__all__ = [
    "chunkwise",
    "ChunkStages",
    "chunk_stages",
    "gate_cumsum",
    "decayed_products",
    "intra_chunk",
    "solve_unit_lower",
    "wy_representation",
    "state_pass",
    "chunk_output",
    "dplr_stages",
    "interleave_steps",
]


# ----------------------------------------------------------------------------- stages
# Chunked layout: [N, HV, NC, C, *] (sequence, value head, chunk, token in chunk, channel).


def gate_cumsum(g: torch.Tensor) -> torch.Tensor:
    """``G``: the cumulative log-decay inside each chunk (``[..., C]`` or ``[..., C, K]``)."""
    return torch.cumsum(g, dim=3)


def decayed_products(
    a: torch.Tensor,
    b: torch.Tensor,
    G: torch.Tensor | None,
    decay: Decay,
    *,
    strict: bool,
    subchunk: int,
    G_rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """``M[r, s] = Σ_c a_rc b_sc exp(G_rc - G_sc)`` for ``s <= r`` (``s < r`` if strict), else 0.

    ``G_rows``: the rows' log-decays if not ``G`` (DPLR reads the state before a token's
    decay: the exclusive cumsum ``G - g``, with ``strict``; every exponent stays <= 0).
    Channel decay: rows of sub-chunk ``I`` against all earlier columns factor around the
    reference point ``G_ref = G`` at the last token before ``I``, so both factors
    ``exp(G_r - G_ref)`` and ``exp(G_ref - G_s)`` are at most 1; diagonal sub-blocks are
    computed pairwise. Nothing overflows whatever the gates.
    """
    C = a.shape[-2]
    mask = torch.ones(C, C, dtype=torch.bool, device=a.device).tril(-1 if strict else 0)
    if decay is Decay.NONE:
        return (a @ b.transpose(-1, -2)) * mask
    R = G if G_rows is None else G_rows
    if decay is Decay.SCALAR:
        diff = R[..., :, None] - G[..., None, :]
        return (a @ b.transpose(-1, -2)) * torch.exp(torch.where(mask, diff, -torch.inf))
    if C % subchunk:
        raise ValueError(f"subchunk size {subchunk} must divide the chunk size {C}")
    rows = []
    for start in range(0, C, subchunk):
        blk = slice(start, start + subchunk)
        a_i, b_i, G_i, R_i = a[..., blk, :], b[..., blk, :], G[..., blk, :], R[..., blk, :]
        diff = R_i[..., :, None, :] - G_i[..., None, :, :]  # [.., r, s, K]
        m = mask[blk, blk]
        diag = torch.einsum("...rc,...sc,...rsc->...rs", a_i, b_i, torch.exp(torch.where(m[..., None], diff, -torch.inf)))
        parts = []
        if start > 0:
            ref = G[..., start - 1 : start, :]
            a_ref = a_i * torch.exp(R_i - ref)
            b_ref = b[..., :start, :] * torch.exp(ref - G[..., :start, :])
            parts.append(a_ref @ b_ref.transpose(-1, -2))
        parts.append(diag)
        if start + subchunk < C:
            parts.append(diag.new_zeros(*diag.shape[:-1], C - start - subchunk))
        rows.append(torch.cat(parts, dim=-1))
    return torch.cat(rows, dim=-2)


@dataclass
class Intra:
    """The per-chunk matrices of the forward."""

    Qg: torch.Tensor  # scale · q ⊙ exp(G)
    Kg: torch.Tensor  # k ⊙ exp(G)
    Kb: torch.Tensor  # k ⊙ exp(G_C - G)
    Aqk: torch.Tensor  # [.., C, C] lower triangular (with diagonal)
    Akk: torch.Tensor | None  # [.., C, C] strictly lower, rows scaled by β (delta only)
    decay_last: torch.Tensor | None  # exp(G_C): [..] (scalar) or [.., K] (channel)


def intra_chunk(
    q: torch.Tensor,
    k: torch.Tensor,
    G: torch.Tensor | None,
    beta: torch.Tensor | None,
    *,
    decay: Decay,
    delta: bool,
    scale: float,
    subchunk: int,
    read: torch.Tensor | None = None,
    G_read: torch.Tensor | None = None,
) -> Intra:
    """Stage 1: everything about a chunk that does not depend on the state. ``read``: the
    key the correction reads the state along (Comba's ``p``; default ``k``); ``G_read``: the
    log-decay its rows see if not ``G`` (``G - g`` when it reads before the decay)."""
    if decay is Decay.NONE:
        Qg, Kg, Kb, decay_last = scale * q, k, k, None
    else:
        Gx = G[..., None] if decay is Decay.SCALAR else G  # broadcast over K
        G_last = Gx[..., -1:, :]
        Qg = scale * q * torch.exp(Gx)
        Kg = k * torch.exp(Gx)
        Kb = k * torch.exp(G_last - Gx)
        decay_last = torch.exp(G[..., -1]) if decay is Decay.SCALAR else torch.exp(G[..., -1, :])
    Aqk = scale * decayed_products(q, k, G, decay, strict=False, subchunk=subchunk)
    Akk = None
    if delta:
        Akk = decayed_products(k if read is None else read, k, G, decay, strict=True, subchunk=subchunk, G_rows=G_read)
        if beta is not None:
            Akk = beta[..., :, None] * Akk
    return Intra(Qg, Kg, Kb, Aqk, Akk, decay_last)


def solve_unit_lower(Akk: torch.Tensor) -> torch.Tensor:
    """``T = (I + Akk)^-1`` for strictly lower triangular ``Akk``."""
    eye = torch.eye(Akk.shape[-1], dtype=Akk.dtype, device=Akk.device)
    return torch.linalg.solve_triangular(eye + Akk, eye.expand_as(Akk), upper=False, unitriangular=True)


def wy_representation(
    T: torch.Tensor, Kg: torch.Tensor, v: torch.Tensor, beta: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``W = T (β ⊙ Kg)``, ``U = T (β ⊙ V)``: the delta rule's chunk in WY form."""
    if beta is not None:
        Kg, v = beta[..., None] * Kg, beta[..., None] * v
    return T @ Kg, T @ v


def state_pass(
    W: torch.Tensor | None,
    U: torch.Tensor,
    Kb: torch.Tensor,
    decay_last: torch.Tensor | None,
    state: torch.Tensor,
    decay: Decay,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stage 2, sequential over chunks: ``Δ = U - W S``, ``S <- exp(G_C) S + Kbᵀ Δ``.

    Without correction pass ``W = None`` and ``U = β ⊙ V`` (then ``Δ = U``). Returns each
    chunk's start state ``[N, HV, NC, K, V]``, ``Δ`` and the final state.
    """
    starts, deltas = [], []
    for c in range(U.shape[2]):
        starts.append(state)
        d = U[:, :, c] if W is None else U[:, :, c] - W[:, :, c] @ state
        deltas.append(d)
        if decay is Decay.SCALAR:
            state = decay_last[:, :, c, None, None] * state
        elif decay is Decay.CHANNEL:
            state = decay_last[:, :, c, :, None] * state
        state = state + Kb[:, :, c].transpose(-1, -2) @ d
    if not starts:
        return state.new_zeros(*state.shape[:2], 0, *state.shape[2:]), U, state
    return torch.stack(starts, dim=2), torch.stack(deltas, dim=2), state


def chunk_output(Qg: torch.Tensor, S: torch.Tensor, Aqk: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Stage 3: ``O = Qg S + Aqk Δ`` per chunk."""
    return Qg @ S + Aqk @ delta


# ----------------------------------------------------------------------------- DPLR
def dplr_stages(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    g: torch.Tensor | None,
    state: torch.Tensor,
    *,
    decay: Decay,
    scale: float,
    chunk_size: int,
    subchunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``S_t = (D_t + b_t a_tᵀ) S_(t-1) + k_t v_tᵀ`` chunk by chunk, on ``[N, L, HV, *]``.

    Per chunk, with ``G`` the inclusive and ``G⁻ = G - g`` the exclusive cumulative
    log-decay, the state reads ``u_t = a_tᵀ S_(t-1)`` solve one unit lower triangular
    system, ``u = (I - Aab)⁻¹ (Â S_0 + Aak V) = W S_0 + U`` with ``Â = a ⊙ exp(G⁻)``,
    ``Aab[t, r] = Σ_c a_tc b_rc exp(G⁻_tc - G_rc)`` and ``Aak`` likewise with ``k``
    (``r < t``); then ``O = Qg S_0 + Aqb u + Aqk V`` and
    ``S_C = exp(G_C) S_0 + Bbᵀ u + Kbᵀ V``. Every exponent is <= 0; ``(I - Aab)`` is unit
    triangular, so the solve always exists (its size is what docs/algorithms.md bounds).
    Returns the outputs ``[N, L, HV, V]`` and the final state.
    """
    L, C = q.shape[1], chunk_size
    qc, kc, vc, ac, bc = (_to_chunks(x, C) for x in (q, k, v, a, b))
    G = Gex = None
    if g is not None:
        gc = _to_chunks(g, C)
        G = gate_cumsum(gc)
        Gex = G - gc
    kw = dict(subchunk=subchunk_size)
    Aab = decayed_products(ac, bc, G, decay, strict=True, G_rows=Gex, **kw)
    Aak = decayed_products(ac, kc, G, decay, strict=True, G_rows=Gex, **kw)
    Aqb = scale * decayed_products(qc, bc, G, decay, strict=False, **kw)
    Aqk = scale * decayed_products(qc, kc, G, decay, strict=False, **kw)

    def e(x):  # the decay factor broadcast over K
        return 1.0 if x is None else torch.exp(x[..., None] if decay is Decay.SCALAR else x)

    last = None if G is None else G[..., -1:] if decay is Decay.SCALAR else G[..., -1:, :]
    Qg, Ahat = scale * qc * e(G), ac * e(Gex)
    Bb, Kb = bc * e(None if G is None else last - G), kc * e(None if G is None else last - G)
    T = solve_unit_lower(-Aab)
    W, U = T @ Ahat, T @ (Aak @ vc)
    outs = []
    for c in range(qc.shape[2]):
        u = U[:, :, c] + W[:, :, c] @ state
        outs.append(Qg[:, :, c] @ state + Aqb[:, :, c] @ u + Aqk[:, :, c] @ vc[:, :, c])
        if decay is Decay.SCALAR:
            state = torch.exp(G[:, :, c, -1])[..., None, None] * state
        elif decay is Decay.CHANNEL:
            state = torch.exp(G[:, :, c, -1])[..., :, None] * state
        state = state + Bb[:, :, c].transpose(-1, -2) @ u + Kb[:, :, c].transpose(-1, -2) @ vc[:, :, c]
    if not outs:
        return v.new_zeros(*q.shape[:3], v.shape[-1]), state
    oc = torch.stack(outs, dim=2)
    return oc.movedim(1, 3).reshape(q.shape[0], -1, q.shape[2], v.shape[-1])[:, :L], state


def interleave_steps(q: torch.Tensor, g: torch.Tensor | None, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """DeltaProduct's ``n`` steps per token as ``n`` delta-rule tokens: the token's decay on
    its first step, its query on its last (zeros elsewhere). ``q`` ``[B, T, H, K]`` and
    ``g`` ``[B, T, HV(, K)]`` become ``T · n`` rows; the outputs are every ``n``-th row from
    ``n - 1``."""
    return interleave(q, n, n - 1), None if g is None else interleave(g, n, 0)


# ----------------------------------------------------------------------------- driver


@dataclass
class ChunkStages:
    """Every intermediate of one run (chunked layout), for stage-by-stage comparison."""

    G: torch.Tensor | None
    intra: Intra
    T: torch.Tensor | None
    W: torch.Tensor | None
    U: torch.Tensor
    starts: torch.Tensor
    delta: torch.Tensor
    o: torch.Tensor  # [N, L, HV, V] before layer-side terms, padding removed
    final_state: torch.Tensor


def _to_chunks(x: torch.Tensor, C: int) -> torch.Tensor:
    """``[N, L, HV, *]`` → ``[N, HV, NC, C, *]``, zero-padding L up to a multiple of C."""
    N, L, HV = x.shape[:3]
    pad = (-L) % C
    if pad:
        widths = [0, 0] * (x.dim() - 2) + [0, pad]
        x = F.pad(x, widths)
    x = x.reshape(N, (L + pad) // C, C, HV, *x.shape[3:])
    return x.movedim(3, 1)


def chunk_stages(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None,
    beta: torch.Tensor | None,
    state: torch.Tensor,
    *,
    decay: Decay,
    delta: bool,
    scale: float,
    chunk_size: int,
    subchunk_size: int,
    read: torch.Tensor | None = None,
    read_before_decay: bool = False,
) -> ChunkStages:
    """Run all stages on ``[N, L, HV, *]`` inputs (one length for all N sequences).

    Padding tokens have k = v = q = 0 and g = 0: they neither write nor decay the state.
    ``read``: Comba's read key ``p`` (the delta rule's W and Akk read along it).
    ``read_before_decay``: the read sees the state before the token's decay (rows at ``G - g``).
    """
    L = q.shape[1]
    C = chunk_size
    qc, kc, vc = _to_chunks(q, C), _to_chunks(k, C), _to_chunks(v, C)
    rc = None if read is None else _to_chunks(read, C)
    bc = None if beta is None else _to_chunks(beta, C)
    G = G_read = None
    if g is not None:
        gc = _to_chunks(g, C)
        G = gate_cumsum(gc)
        G_read = G - gc if read_before_decay else None
    intra = intra_chunk(qc, kc, G, bc, decay=decay, delta=delta, scale=scale, subchunk=subchunk_size, read=rc,
                        G_read=G_read)
    T = W = None
    if delta:
        T = solve_unit_lower(intra.Akk)
        Rg = intra.Kg
        if rc is not None or G_read is not None:
            R, GR = kc if rc is None else rc, G if G_read is None else G_read
            Rg = R if G is None else R * torch.exp(GR[..., None] if decay is Decay.SCALAR else GR)
        W, U = wy_representation(T, Rg, vc, bc)
    else:
        U = vc if bc is None else bc[..., None] * vc
    starts, d, final = state_pass(W, U, intra.Kb, intra.decay_last, state, decay)
    oc = chunk_output(intra.Qg, starts, intra.Aqk, d)  # [N, HV, NC, C, V]
    o = oc.movedim(1, 3).reshape(q.shape[0], -1, q.shape[2], v.shape[-1])[:, :L]
    return ChunkStages(G, intra, T, W, U, starts, d, o, final)


def chunkwise(
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
    chunk_size: int = 64,
    subchunk_size: int = 16,
    **operands: torch.Tensor | float,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The chunkwise form of ``spec``; same arguments and results as :func:`reference.recurrent`.

    Computes in the inputs' dtype, at least fp32. ``chunk_size`` must be a multiple of
    ``subchunk_size`` (the reference-point block of channel decay).
    """
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size: expected a positive int, got {chunk_size!r}")
    if not isinstance(subchunk_size, int) or subchunk_size < 1 or chunk_size % subchunk_size:
        raise ValueError(f"subchunk_size: expected a positive divisor of chunk_size {chunk_size}, got {subchunk_size!r}")
    call = check_call(
        spec, q, k, v, operands, z=z, D=D, scale=scale, initial_state=initial_state, cu_seqlens=cu_seqlens
    )
    dtype = torch.promote_types(q.dtype, torch.float32)
    q, k, v, g, beta = prepare(call, dtype)
    vectors = prepare_vectors(call, dtype)
    steps = spec.householder
    kw = dict(decay=spec.decay, scale=call.scale, chunk_size=chunk_size, subchunk_size=subchunk_size)

    def initial(n0: int, n1: int) -> torch.Tensor:
        if call.initial_state is None:
            return q.new_zeros(n1 - n0, call.HV, call.K, call.V)
        return call.initial_state[n0:n1].to(dtype)

    def run(tok: tuple, rows: tuple, s0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One group of equal-length sequences: ``tok`` slices per-token inputs, ``rows``
        the per-step ones (k, v, β: the same unless DeltaProduct)."""
        gg = None if g is None else g[tok]
        if spec.correction is Correction.DPLR:
            return dplr_stages(q[tok], k[tok], v[tok], vectors["a"][tok], vectors["b"][tok], gg, s0, **kw)
        read = vectors["p"][tok] if spec.correction is Correction.COMBA else None
        qq = q[tok]
        if steps > 1:
            qq, gg = interleave_steps(qq, gg, steps)
        st = chunk_stages(qq, k[rows], v[rows], gg, None if beta is None else beta[rows], s0,
                          delta=spec.correction is not Correction.NONE, read=read,
                          read_before_decay=spec.read_before_decay, **kw)
        return st.o[:, steps - 1 :: steps], st.final_state

    if call.cu_seqlens is None:  # equal lengths: all sequences at once
        o, final = run((slice(None),), (slice(None),), initial(0, call.B))
    else:
        outs, finals = [], []
        for n, (_, start, end) in enumerate(call.segments()):
            o_n, s_n = run((slice(0, 1), slice(start, end)), (slice(0, 1), slice(start * steps, end * steps)),
                           initial(n, n + 1))
            outs.append(o_n)
            finals.append(s_n)
        o, final = torch.cat(outs, dim=1), torch.cat(finals, dim=0)
    o = finish(call, o).to(call.q.dtype)
    return o, (final if output_final_state else None)
