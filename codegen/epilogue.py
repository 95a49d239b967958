"""Emitters of the backward's layer-side kernels: the q/k L2 norm and the gate/β terms.

The core backward kernels differentiate the recurrence with respect to normalised q/k
(which they normalise on load), ``g`` and ``β``; what lies between those and the layer's
own arguments is elementwise (an L2 norm per row, the spec's gate and β
parameterizations). Run as torch ops it costs dozens of small launches per call; here it
is two kernels:

- ``qknorm_bwd``: the gradients summed over each q/k head's value heads and taken back
  through the norm, ``r (dy - y (y · dy))`` with ``y = x r``, ``r = 1 / |x|``;
- ``terms_bwd``: every operand's gradient from the terms' symbolic derivatives,
  ``Σ_terms d(term) · ∂term/∂operand``, summed over the axes an operand is broadcast
  along. Per-token operands are written per token; per-head parameters are summed per
  chunk program into a ``[chunks, HV(, K)]`` partial buffer (one torch sum finishes them:
  deterministic, unlike atomics).

The norm kernels take blocks of ``NORM_ROWS`` flattened tokens with whole rows; the terms
kernel walks chunks through the same chunk table as the other kernels (its per-head
partials are per chunk) and key channels in blocks of the backward kernels' width.
"""
from __future__ import annotations

from linattn.spec import Role, Term

from .exprs import assign
from .emit import L2NORM_EPS, Kernel, signature
from .manifest import declare, out, partial_name
from .plan import Plan
from .source import Source

__all__ = ["epilogue_kernels", "derivative_terms", "partial_name"]


def derivative_terms(plan: Plan) -> list[tuple[str, Term]]:
    """``(gradient buffer, term)`` of each term the kernel differentiates (identity terms
    need no kernel: their operand's gradient is the term's). A gate's is ``dG``, the gradient
    of its cumulative sum in the chunk: the kernel takes the reverse cumsum to ``dg`` itself
    (the core's ``dgate`` is left out, and no ``dg`` goes through memory)."""
    spec, out = plan.spec, []
    if spec.has_decay and spec.gate is not None and not spec.gate.is_identity:
        out.append(("dG", spec.gate))
    if plan.beta_computed:
        out.append(("dbeta", spec.beta))
    return out


def epilogue_kernels(plan: Plan) -> list:
    kernels = []
    if plan.spec.qk_l2norm:
        kernels.append(_emit_qknorm_bwd(plan))
    if derivative_terms(plan):
        kernels.append(_emit_terms_bwd(plan))
    return kernels


def _chunk_rows(s: Source) -> None:
    s("i_c = tl.program_id(0)", "i_h = tl.program_id(1)")
    s("t0 = tl.load(chunk_t0 + i_c)", "L = tl.load(chunk_len + i_c)")
    s("r = tl.arange(0, C)", "row_ok = r < L")


# ============================================================================ q/k norm
#: tokens per program of the norm kernels: whole rows of BK channels stay in registers
#: ([16, BK] fp32 tiles: 16 registers a thread at BK = 128 with 4 warps)
NORM_ROWS = 16


def _row_block(s: Source) -> None:
    """``NORM_ROWS`` flattened tokens of one q/k head, whole rows (the norm needs no chunk structure)."""
    s("i_t = tl.program_id(0)", "i_h = tl.program_id(1)")
    s(f"r = i_t * {NORM_ROWS} + tl.arange(0, {NORM_ROWS})", "ck = tl.arange(0, BK)")
    s("m = (r < TT)[:, None] & (ck < K)[None, :]")
    s("rows = r.to(tl.int64) * (H * K) + i_h * K  # 64-bit: B*T*H*K may pass 2^31")


def _emit_qknorm_bwd(plan: Plan) -> Kernel:
    names = ("q", "k", "p") if plan.comba else ("q", "k")  # Comba's read key is normalised too
    params = [*names, *(f"d{x}" for x in names), *(out(f"d{x}_out") for x in names), "TT", "H", "HV", "GROUP"]
    s = Source()
    params = declare(plan, params)
    with s.block(signature("qknorm_bwd", params)):
        s('"""dq, dk of a block of tokens of one q/k head: summed over the value heads it serves,'
          ' then back through the norm."""')
        _row_block(s)
        s("drows = r.to(tl.int64) * (HV * K) + i_h * GROUP * K  # the head's first value head")
        for x in names:
            s(f"b_dy = tl.zeros([{NORM_ROWS}, BK], dtype=tl.float32)")
            with s.block("for g in range(GROUP):"):
                s(f"b_dy += tl.load(d{x} + drows[:, None] + g * K + ck[None, :], mask=m, other=0.0).to(tl.float32)")
            s(f"b_x = tl.load({x} + rows[:, None] + ck[None, :], mask=m, other=0.0).to(tl.float32)")
            s(f"rn = tl.rsqrt(tl.sum(b_x * b_x, 1) + {L2NORM_EPS})")
            s("c3 = rn * rn * rn * tl.sum(b_x * b_dy, 1)  # r³ (x · dy)")
            s("b_dx = rn[:, None] * b_dy - b_x * c3[:, None]")
            s(f"tl.store(d{x}_out + rows[:, None] + ck[None, :], b_dx.to(d{x}_out.dtype.element_ty), mask=m)")
    return Kernel("qknorm_bwd", params, (("TT", NORM_ROWS), "H"), s.text(), 4)


# ============================================================================ terms
def _emit_terms_bwd(plan: Plan) -> Kernel:
    spec, terms = plan.spec, derivative_terms(plan)
    channel = plan.channel
    used = {o.name: o for _, t in terms for o in t.operands}
    grads = [o for o in used.values() if o.role is not Role.SCALAR]
    params = []
    for o in used.values():
        params.append(f"s_{o.name}" if o.role is Role.SCALAR else f"x_{o.name}")
    params += [buf for buf, _ in terms]
    for o in grads:
        params.append(out(partial_name(o.name) if o.role in (Role.HEAD, Role.HEAD_CHANNEL) else f"d_{o.name}"))
    params += ["chunk_t0", "chunk_len", "HV"]

    def name(ctx: str, b: int = 0):
        """Operand variables in a context: ``row`` ([C]) or ``tile`` ([C, KB], key block b)."""

        def f(n: str) -> str:
            role = used[n].role
            if role is Role.SCALAR:
                return f"s_{n}"
            if role is Role.HEAD:
                return f"o_{n}"
            if role is Role.TOKEN:
                return f"o_{n}[:, None]" if ctx == "tile" else f"o_{n}"
            if role is Role.TOKEN_CHANNEL:
                return f"o_{n}_{b}"
            return f"o_{n}_{b}[None, :]"  # HEAD_CHANNEL, tile context only

        return f

    s = Source()
    params = declare(plan, params)
    with s.block(signature("terms_bwd", params)):
        s('"""Gradients of the gate/β terms\' operands for one (chunk, value head); per-head ones as chunk partials."""')
        _chunk_rows(s)
        s("base = t0 * HV + i_h")
        for o in used.values():
            if o.role is Role.TOKEN:
                s(f"o_{o.name} = tl.load(x_{o.name} + base + r * HV, mask=row_ok, other=0.0).to(tl.float32)")
            elif o.role is Role.HEAD:
                s(f"o_{o.name} = tl.load(x_{o.name} + i_h).to(tl.float32)")
        # per-row accumulators of per-token and per-head gradients (a head's are summed at the end)
        for o in grads:
            if o.role in (Role.TOKEN, Role.HEAD):
                s(f"acc_{o.name} = tl.zeros([C], dtype=tl.float32)")
        # per-token terms (β, a scalar gate): [C] rows, their derivatives' shared parts computed once
        rows = [(buf, t) for buf, t in terms if not (channel and buf == "dG")]
        pairs = [(buf, t, o) for buf, t in rows for o in t.operands if o.role is not Role.SCALAR]
        for buf, _ in rows:
            s(f"b_{buf} = tl.load({buf} + base + r * HV, mask=row_ok, other=0.0)")
            if buf == "dG":  # G_t = g_1 + ... + g_t in the chunk: dg is dG's reverse cumsum
                s("b_dG = tl.sum(b_dG, 0) - tl.cumsum(b_dG, 0) + b_dG")
        if pairs:
            s(*assign([(f"{buf}_{o.name}", t.diff(o.name)) for buf, t, o in pairs], name("row"), "t_"))
        for buf, _, o in pairs:
            s(f"acc_{o.name} += tl.where(row_ok, b_{buf} * {buf}_{o.name}, 0.0)")
        # a channel gate: [C, KB] tiles, key block by key block
        if channel and any(buf == "dG" for buf, _ in terms):
            # key blocks of the backward's width: a gate's derivatives hold several [C, kb] tiles
            # (a runtime loop: unrolled, K = 256 held 16 blocks' loads at once and spilled)
            gate, kb, b = spec.gate, plan.KBB, "x"
            with s.block(f"for kb in range({plan.BK // kb}):"):
                s(f"ck = kb * {kb} + tl.arange(0, {kb})", "ck_ok = ck < K", "m = row_ok[:, None] & ck_ok[None, :]")
                for o in gate.operands:
                    if o.role is Role.TOKEN_CHANNEL:
                        s(
                            f"o_{o.name}_{b} = tl.load(x_{o.name} + base * K + r[:, None] * (HV * K) + ck[None, :], "
                            "mask=m, other=0.0).to(tl.float32)"
                        )
                    elif o.role is Role.HEAD_CHANNEL:
                        s(f"o_{o.name}_{b} = tl.load(x_{o.name} + i_h * K + ck, mask=ck_ok, other=0.0).to(tl.float32)")
                s("b_dg = tl.load(dG + base * K + r[:, None] * (HV * K) + ck[None, :], mask=m, other=0.0)")
                s("b_dg = tl.sum(b_dg, 0)[None, :] - tl.cumsum(b_dg, 0) + b_dg  # the reverse cumsum in the chunk")
                wrt = [o for o in gate.operands if o.role is not Role.SCALAR]
                s(*assign([(f"dg_{o.name}", gate.diff(o.name)) for o in wrt], name("tile", b), f"t{b}_"))
                for o in wrt:
                    d = f"tl.where(m, b_dg * dg_{o.name}, 0.0)"
                    if o.role is Role.TOKEN_CHANNEL:
                        s(f"tl.store(d_{o.name} + base * K + r[:, None] * (HV * K) + ck[None, :], {d}, mask=m)")
                    elif o.role is Role.HEAD_CHANNEL:
                        s(f"tl.store({partial_name(o.name)} + (i_c * HV + i_h) * K + ck, tl.sum({d}, 0), mask=ck_ok)")
                    else:  # per token or per head: summed over the channels
                        s(f"acc_{o.name} += tl.sum({d}, 1)")
        for o in grads:
            if o.role is Role.TOKEN:
                s(f"tl.store(d_{o.name} + base + r * HV, acc_{o.name}, mask=row_ok)")
            elif o.role is Role.HEAD:
                s(f"tl.store({partial_name(o.name)} + i_c * HV + i_h, tl.sum(acc_{o.name}, 0))")
    return Kernel("terms_bwd", params, ("NCH", "HV"), s.text(), 4)
