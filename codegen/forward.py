"""Emitters of the forward stages: gate cumsum, intra-chunk matrices, state pass, output.

Each function turns a :class:`~codegen.plan.Plan` into the source of one Triton kernel
that holds only the spec's own terms: no decay, no ``exp``; no correction, no solve;
scalar decay, plain matrix products with a ``[C, C]`` decay mask; channel decay, the
sub-chunk reference-point factorization. Layout everywhere: tokens flattened over the
batch (``[B*T, heads, dim]``), chunks found through a device-built chunk table, so
fixed-length and packed batches run the same code. The shared pieces of kernel text are
in :mod:`.emit`.

Register budget: every kernel walks the key dimension in blocks of ``KB`` channels
(unrolled in the text), so no tile wider than ``[C, KB]`` is live (the state pass also
walks the chunk in row blocks of ``RB``); the L2 normalisation
of q/k is applied as row scales of the products (``diag(1/|q|) q kᵀ diag(1/|k|)``), so
it never needs a whole row in registers.
"""
from __future__ import annotations


from linattn.spec import OutputGate, Role, Skip

from .emit import L2NORM_EPS, Emitter, Kernel, operand_params, plus, signature
from .manifest import declare, out
from .exprs import assign
from .plan import GATE_FLOOR, Plan
from .source import Source

__all__ = ["Kernel", "forward_kernels"]


# ============================================================================ gates
def _emit_gates(plan: Plan) -> Kernel:
    spec = plan.spec
    used = {o.name: o for t in (spec.gate, spec.beta if plan.beta_computed else None) if t for o in t.operands}
    params = [n for n in operand_params(plan) if n[2:] in used]
    if spec.has_decay:
        params.append(out("G"))
    if plan.read_before:
        params.append(out("Gx"))
    if plan.beta_computed:
        params.append(out("beta"))
    params += ["chunk_t0", "chunk_len", "HV"]
    s = Source()
    params = declare(plan, params)
    with s.block(signature("gates_fwd", params)):
        s('"""Evaluate the gate (and β) terms per token; G = their cumsum inside each chunk, in fp32."""')
        s("i_c = tl.program_id(0)", "i_h = tl.program_id(1)", "i_k = tl.program_id(2)")
        s("t0 = tl.load(chunk_t0 + i_c)", "L = tl.load(chunk_len + i_c)")
        s("r = tl.arange(0, C)", "row_ok = r < L")
        s("base = t0 * HV + i_h  # (token, head) index of the chunk's first row")
        if plan.channel:
            s("ck = i_k * KB + tl.arange(0, KB)", "ck_ok = ck < K")
        for o in used.values():
            n = o.name
            if o.role is Role.TOKEN:
                s(f"o_{n} = tl.load(x_{n} + base + r * HV, mask=row_ok, other=0.0).to(tl.float32)")
            elif o.role is Role.TOKEN_CHANNEL:
                s(
                    f"o_{n} = tl.load(x_{n} + base * K + r[:, None] * (HV * K) + ck[None, :], "
                    "mask=row_ok[:, None] & ck_ok[None, :], other=0.0).to(tl.float32)"
                )
            elif o.role is Role.HEAD:
                s(f"o_{n} = tl.load(x_{n} + i_h).to(tl.float32)")
            elif o.role is Role.HEAD_CHANNEL:
                s(f"o_{n} = tl.load(x_{n} + i_h * K + ck, mask=ck_ok, other=0.0).to(tl.float32)")

        def name(channel: bool):
            def f(n: str) -> str:
                role = used[n].role
                if role is Role.SCALAR:
                    return f"s_{n}"
                if channel and role is Role.TOKEN:
                    return f"o_{n}[:, None]"
                if channel and role is Role.HEAD_CHANNEL:
                    return f"o_{n}[None, :]"
                return f"o_{n}"

            return f

        rows = "{} + tl.zeros([C], dtype=tl.float32)"  # a term of per-head operands alone is a scalar
        terms = []
        if spec.has_decay:
            tile = "{} + tl.zeros([C, KB], dtype=tl.float32)" if plan.channel else rows
            terms.append(("g", [("b_g", spec.gate.expr, tile)], name(plan.channel)))
        if plan.beta_computed:
            beta = ("b_beta", spec.beta.expr, rows)
            if terms and not plan.channel:  # same rows: subexpressions shared with the gate (Mamba's dt) once
                terms[0][1].append(beta)
            else:
                terms.append(("b", [beta], name(False)))
        for prefix, targets, names in terms:
            s(*assign(targets, names, f"{prefix}_"))
        if spec.has_decay:
            mask = "row_ok[:, None] & ck_ok[None, :]" if plan.channel else "row_ok"
            s(f"b_g = tl.where(b_g < {GATE_FLOOR}, {GATE_FLOOR}, b_g)  # exp(g) = 0 below: an exact reset, finite G")
            s(f"b_g = tl.where({mask}, b_g, 0.0)")
            s("b_G = tl.cumsum(b_g, 0)")
            stores = [("G", "b_G")] + ([("Gx", "b_G - b_g")] if plan.read_before else [])  # Gx: before the decay
            for buf, val in stores:
                if plan.channel:
                    s(f"tl.store({buf} + base * K + r[:, None] * (HV * K) + ck[None, :], {val}, mask=row_ok[:, None] & ck_ok[None, :])")
                else:
                    s(f"tl.store({buf} + base + r * HV, {val}, mask=row_ok)")
        if plan.beta_computed:
            s("tl.store(beta + base + r * HV, b_beta, mask=r < tl.where(i_k == 0, L, 0))  # once per chunk")
    grid = ("NCH", "HV", "NKB") if plan.channel else ("NCH", "HV")
    return Kernel("gates_fwd", params, grid, s.text(), plan.warps_gates)


# ============================================================================ intra
def _norms_stored(plan: Plan) -> bool:
    """Whether intra stores the rows' L2 norms (``rq``, ``rk``) for the scan: with channel
    decay, whose scan cannot also hold the tiles that recompute them (sm_90, K = V = 128, 2
    warps: 242 registers with them stored, 8 bytes spilled without). Scalar decay's scan
    recomputes them (168 registers on 4 warps; 171 with them stored)."""
    return plan.spec.qk_l2norm and plan.aqk_stored and plan.channel


def _emit_intra(plan: Plan) -> Kernel:
    e = Emitter(plan, plan.KBI)
    NS, BC, l2 = plan.NS, plan.BC, plan.spec.qk_l2norm
    rd = plan.read  # Akk's rows: the key the correction reads along (Comba's p)
    gr = "b_Gxi" if plan.read_before else "b_Gi"  # the G Akk's rows see (channel decay's key block)
    params = ["k", *(["p"] if plan.comba else [])]
    if plan.aqk_stored:
        params.append("q")
    if plan.spec.has_decay:
        params.append("G")
    if plan.read_before and plan.delta:
        params.append("Gx")
    if plan.delta and plan.beta:
        params.append("beta")
    if plan.delta:
        params.append(out("Tm"))
    if plan.aqk_stored:
        params += [out("Aqk"), "scale"]
        if _norms_stored(plan):
            params += [out("rq"), out("rk")]
    params += ["chunk_t0", "chunk_len", "H", "HV", "GROUP"]
    params.append("MMA")

    s = Source()
    params = declare(plan, params)
    with s.block(signature("intra_fwd", params)):
        what = []
        if plan.delta:
            what.append("Akk -> T = (I + Akk)^-1")
        if plan.aqk_stored:
            what.append("Aqk")
        s(f'"""Per chunk: {"; ".join(what)}."""')
        e.chunk_prologue(s)
        e.bases(s, params)
        if plan.scalar:
            e.load_glast(s)
        s("ri = tl.arange(0, BC)")
        strict, causal = "ri[:, None] > ri[None, :]", "ri[:, None] >= ri[None, :]"
        zero = "tl.zeros([BC, BC], dtype=tl.float32)"

        for i in range(NS):
            s("", f"# ---- rows of sub-chunk {i}")
            s(f"r{i} = {plus(i * BC, 'ri')}", f"ok{i} = r{i} < L")
            if l2:
                e.rnorm(s, f"rk{i}", "k", f"r{i}", f"ok{i}")
                if plan.comba:
                    e.rnorm(s, f"rp{i}", "p", f"r{i}", f"ok{i}")
                if plan.aqk_stored:
                    e.rnorm(s, f"rq{i}", "q", f"r{i}", f"ok{i}")
                if _norms_stored(plan):
                    e.store(s, "rq", f"rq{i}", f"r{i}", f"ok{i}")
                    e.store(s, "rk", f"rk{i}", f"r{i}", f"ok{i}")
            if plan.scalar:
                e.load_G(s, f"b_G{i}", f"r{i}", f"ok{i}")
                if plan.read_before and plan.delta:  # Akk's rows read before their token's decay
                    e.load_G(s, f"b_Gx{i}", f"r{i}", f"ok{i}", buf="Gx")
            for j in range(i + 1):
                if plan.delta:
                    s(f"b_A{i}{j} = {zero}")
                if plan.aqk_stored:
                    s(f"b_Q{i}{j} = {zero}")
            if plan.channel and i > 0:
                s(f"ref_ok = {i * BC - 1} < L  # reference point: the last token before sub-chunk {i}")
            with e.key_loop(s) as b:
                e.load(s, "b_ki", "k", f"r{i}", f"ok{i}", b)
                if plan.comba and plan.delta:
                    e.load(s, "b_pi", "p", f"r{i}", f"ok{i}", b)
                if plan.aqk_stored:
                    e.load(s, "b_qi", "q", f"r{i}", f"ok{i}", b)
                if plan.channel:
                    e.load_G(s, "b_Gi", f"r{i}", f"ok{i}", b)
                    if plan.read_before and plan.delta:
                        e.load_G(s, "b_Gxi", f"r{i}", f"ok{i}", b, buf="Gx")
                    if i > 0:
                        # G_ref >= G of this sub-chunk's rows, <= G of every earlier row: factors <= 1
                        e.load_G_row(s, "b_Gref", f"{i * BC - 1}", "ref_ok", b)
                        if plan.delta:
                            s(f"b_ka = b_{rd}i * tl.exp({gr} - b_Gref[None, :])")
                        if plan.aqk_stored:
                            s("b_qa = b_qi * tl.exp(b_Gi - b_Gref[None, :])")
                for j in range(i):
                    s(f"rj = {plus(j * BC, 'ri')}", "okj = rj < L")
                    e.load(s, "b_kj", "k", "rj", "okj", b)
                    if plan.channel:
                        e.load_G(s, "b_Gj", "rj", "okj", b)
                        s("b_kb = b_kj * tl.exp(b_Gref[None, :] - b_Gj)")
                        if plan.delta:
                            s(f"b_A{i}{j} += {e.dot('b_ka', 'tl.trans(b_kb)')}")
                        if plan.aqk_stored:
                            s(f"b_Q{i}{j} += {e.dot('b_qa', 'tl.trans(b_kb)')}")
                    else:
                        if plan.delta:
                            s(f"b_A{i}{j} += {e.dot(f'b_{rd}i', 'tl.trans(b_kj)')}")
                        if plan.aqk_stored:
                            s(f"b_Q{i}{j} += {e.dot('b_qi', 'tl.trans(b_kj)')}")
                # diagonal block
                if plan.channel:
                    # pairwise, one column at a time: exp(G_r - G_c) only where c <= r
                    with s.block("for c in range(BC):"):
                        s(f"rc = {plus(i * BC, 'c')}", "ok_c = rc < L")
                        e.load_qk_row(s, "b_kc", "k", "rc", "ok_c", b)
                        e.load_G_row(s, "b_Gc", "rc", "ok_c", b)
                        s("b_e = tl.exp(tl.where(ri[:, None] >= c, b_Gi - b_Gc[None, :], 0.0))")
                        if plan.delta:
                            ea = "b_e"
                            if plan.read_before:
                                s("b_ex = tl.exp(tl.where(ri[:, None] > c, b_Gxi - b_Gc[None, :], 0.0))")
                                ea = "b_ex"
                            s(f"col = tl.sum(tl.where(ri[:, None] > c, b_{rd}i * b_kc[None, :] * {ea}, 0.0), 1)")
                            s(f"b_A{i}{i} += tl.where(ri[None, :] == c, col[:, None], 0.0)")
                        if plan.aqk_stored:
                            s("col = tl.sum(tl.where(ri[:, None] >= c, b_qi * b_kc[None, :] * b_e, 0.0), 1)")
                            s(f"b_Q{i}{i} += tl.where(ri[None, :] == c, col[:, None], 0.0)")
                else:
                    if plan.delta:
                        s(f"b_A{i}{i} += {e.dot(f'b_{rd}i', 'tl.trans(b_ki)')}")
                    if plan.aqk_stored:
                        s(f"b_Q{i}{i} += {e.dot('b_qi', 'tl.trans(b_ki)')}")

            # row/column scales: decay (scalar), L2 norms, β, scale
            for j in range(i + 1):
                if plan.delta:
                    f = f"b_A{i}{j}"
                    if plan.scalar:
                        gi = f"b_Gx{i}" if plan.read_before else f"b_G{i}"  # Akk's rows
                        if j < i:
                            s(f"rj = {plus(j * BC, 'ri')}", "okj = rj < L")
                            e.load_G(s, "b_Gj", "rj", "okj")
                            s(f"{f} = {f} * tl.exp({gi}[:, None] - b_Gj[None, :])")
                        else:
                            s(f"{f} = {f} * tl.exp(tl.where({strict}, {gi}[:, None] - b_G{i}[None, :], 0.0))")
                    if l2:
                        s(f"{f} = {f} * r{rd}{i}[:, None] * rk{j}[None, :]")
                    if plan.beta:
                        if j == 0:
                            e.load(s, f"b_b{i}", "beta", f"r{i}", f"ok{i}")
                        s(f"{f} = {f} * b_b{i}[:, None]")
                    if j == i:  # the select comes last: a later token's column scale is never multiplied in
                        s(f"{f} = tl.where({strict}, {f}, 0.0)")
                if plan.aqk_stored:
                    f = f"b_Q{i}{j}"
                    scale = f" * rq{i}[:, None] * rk{j}[None, :]" if l2 else ""
                    if plan.scalar:  # G of row block j: loaded above for the delta rule's A
                        if j < i and not plan.delta:
                            s(f"rj = {plus(j * BC, 'ri')}", "okj = rj < L")
                            e.load_G(s, "b_Gj", "rj", "okj")
                        diff = f"b_G{i}[:, None] - {'b_Gj' if j < i else f'b_G{i}'}[None, :]"
                        scale += f" * tl.exp({diff})" if j < i else f" * tl.exp(tl.where({causal}, {diff}, 0.0))"
                    s(f"{f} = {f} * scale{scale}")
                    if j == i:
                        s(f"{f} = tl.where({causal}, {f}, 0.0)")
                    s(
                        f"tl.store(p_Aqk + r{i}[:, None] * (HV * C) + {plus(j * BC, 'ri')}[None, :], "
                        f"{f}.to(Aqk.dtype.element_ty), mask=ok{i}[:, None])"
                    )

            if plan.delta:
                # ---- block row i of T = (I + Akk)^-1, as soon as row i of Akk is known
                s(f"# T_{i}{i} = (I + A_{i}{i})^-1 by forward substitution")
                s(f"b_T{i}{i} = tl.where(ri[:, None] == ri[None, :], 1.0, 0.0)")
                with s.block("for rr in range(1, BC):"):
                    s(f"a_row = tl.sum(tl.where(ri[:, None] == rr, b_A{i}{i}, 0.0), 0)")
                    s(f"new = tl.where(ri == rr, 1.0, 0.0) - tl.sum(a_row[:, None] * b_T{i}{i}, 0)")
                    s(f"b_T{i}{i} = tl.where(ri[:, None] == rr, new[None, :], b_T{i}{i})")
                for j in range(i - 1, -1, -1):
                    # T_ij = -T_ii · sum_{j <= m < i} A_im T_mj
                    terms = " + ".join(e.dot32(f"b_A{i}{m}", f"b_T{m}{j}") for m in range(j, i))
                    e.causal_dot(s, f"b_T{i}{j}", f"b_T{i}{i}", f"({terms})", row="ri", exact=True)
                    s(f"b_T{i}{j} = -b_T{i}{j}")
                for j in range(i + 1):
                    s(
                        f"tl.store(p_Tm + r{i}[:, None] * (HV * C) + {plus(j * BC, 'ri')}[None, :], "
                        f"b_T{i}{j}.to(Tm.dtype.element_ty), mask=ok{i}[:, None])"
                    )

    return Kernel("intra_fwd", params, ("NCH", "HV"), s.text(), plan.warps_intra)


# ============================================================================ wu
def _emit_wu(plan: Plan) -> Kernel:
    e, l2, rd = Emitter(plan), plan.spec.qk_l2norm, plan.read
    params = [rd, "v"]
    if plan.spec.has_decay:
        params.append("G")
    if plan.read_before:
        params.append("Gx")
    if plan.beta:
        params.append("beta")
    params += ["Tm", out("W"), out("U")]
    params += ["chunk_t0", "chunk_len", "H", "HV", "GROUP"]
    params.append("MMA")
    s = Source()
    params = declare(plan, params)
    with s.block(signature("wu_fwd", params)):
        what = "Pg" if plan.comba else "Kg"
        s(f'"""Per chunk: W = T (β ⊙ {what}), U = T (β ⊙ V), so that the state pass needs Δ = U - W S only."""')
        e.chunk_prologue(s)
        e.bases(s, params)
        gbuf = "Gx" if plan.read_before else "G"  # W's rows: where the read sees the state
        if plan.spec.has_decay:
            e.load_glast(s)
            if plan.scalar:
                e.load_G(s, "b_G", "r", "row_ok", buf=gbuf)
        s(
            "b_T = tl.load(p_Tm + r[:, None] * (HV * C) + r[None, :], "
            "mask=row_ok[:, None] & (r[:, None] >= r[None, :]), other=0.0)"
        )
        rows = []
        if plan.beta:
            e.load(s, "b_b", "beta", "r", "row_ok")
            rows.append("b_b")
        if plan.scalar:
            rows.append("tl.exp(b_G)")
        if l2:
            e.rnorm(s, "b_rk", rd, "r", "row_ok")
            rows.append("b_rk")
        scale = f" * ({' * '.join(rows)})[:, None]" if rows else ""
        for b in e.blocks:
            e.load(s, "b_k", rd, "r", "row_ok", b)
            kg = "b_k"
            if plan.channel:
                e.load_G(s, "b_Gb", "r", "row_ok", b, buf=gbuf)
                kg = "b_k * tl.exp(b_Gb)"
            e.causal_dot(s, "b_w", "b_T", kg + scale)
            s(
                f"tl.store(p_W + r[:, None] * (HV * K) + ck{b}[None, :], b_w.to(W.dtype.element_ty), "
                f"mask=row_ok[:, None] & ck_ok{b}[None, :])"
            )
        vb = " * b_b[:, None]" if plan.beta else ""
        # V in tiles of the product's width (BVP, not the state's BV): wgmma N = 64 on one warpgroup
        s("cvb = tl.arange(0, BVP)")
        with s.block("for i_v in range(NVP):"):
            s("cv = i_v * BVP + cvb", "cv_ok = cv < V")
            e.load(s, "b_v", "v", "r", "row_ok")
            e.causal_dot(s, "b_u", "b_T", "b_v" + vb)
            e.store(s, "U", "b_u", "r", "row_ok")
    return Kernel("wu_fwd", params, ("NCH", "HV"), s.text(), plan.warps_wide)


# ============================================================================ state
def _emit_state(plan: Plan) -> Kernel:
    e = Emitter(plan)
    params = ["k"]
    if plan.spec.has_decay:
        params.append("G")
    if plan.delta:
        params += ["W", "U", out("vnew")]
    else:
        params.append("v")
        if plan.beta:
            params.append("beta")
    params += [out("hs"), "h0", out("ht"), "cu_seqlens", "chunk_off"]
    params += ["TT", "H", "HV", "GROUP", "HAS_H0", "STORE_HT"]
    params.append("MMA")
    s = Source()
    params = declare(plan, params)
    with s.block(signature("state_fwd", params)):
        s('"""Sequential over one sequence\'s chunks: store each start state S, then')
        if plan.delta:
            s("Δ = U - W S (stored: the output and the backward read it), and")
        s("S <- exp(G_C) S + Kbᵀ Δ. The state is held as key blocks S_b [KB, BV]; a chunk is")
        s('applied RB rows at a time, every Δ from the old S before S changes."""')
        e.sequence_prologue(s)
        e.state_tiles(s, "b_S", "HAS_H0", "h0")
        with s.block("for ic in range(0, NT):"):
            s("t0 = bos + ic * C", "L = tl.minimum(eos - t0, C)")
            e.bases(s, params)
            for b in e.blocks:
                s(
                    f"tl.store(hs + ((first + ic) * HV + i_h) * K * V + s_off{b}, "
                    f"b_S{b}.to(hs.dtype.element_ty), mask=s_mask{b})"
                )
            if plan.spec.has_decay:
                e.load_glast(s)
            if plan.delta:
                # Δ of every row block, from the chunk's start state
                with s.block("for j in range(C // RB):"):
                    s("rj = j * RB + rb", "okj = rj < L")
                    e.load(s, "b_d", "U", "rj", "okj")
                    for b in e.blocks:
                        s(
                            f"b_w = tl.load(p_W + rj[:, None] * (HV * K) + ck{b}[None, :], "
                            f"mask=okj[:, None] & ck_ok{b}[None, :], other=0.0)"
                        )
                        s(f"b_d -= {e.dot('b_w', f'b_S{b}')}")
                    e.store(s, "vnew", "b_d", "rj", "okj")
                s("tl.debug_barrier()  # Δ written by all threads before it is read back")
            def delta(s: Source) -> None:
                if plan.delta:
                    e.load(s, "b_d", "vnew", "rj", "okj")
                else:
                    e.load(s, "b_d", "v", "rj", "okj")
                    if plan.beta:
                        e.load(s, "b_b", "beta", "rj", "okj")
                        s("b_d = b_d * b_b[:, None]")

            _update_state(e, s, delta)
        s("if STORE_HT:")
        for b in e.blocks:
            s(f"    tl.store(ht + (i_n * HV + i_h) * K * V + s_off{b}, b_S{b}, mask=s_mask{b})")
    return Kernel("state_fwd", params, ("N*NV", "HV"), s.text(), plan.warps_state)


def _update_state(e: Emitter, s: Source, load_delta, rows: str = "RB", stored_rk: bool = False) -> None:
    """S_b <- exp(G_C) S_b + Σ_rows (k ⊙ exp(G_C - G))ᵀ Δ, ``rows`` (RB or BC) rows at a time
    (``load_delta`` emits ``b_d``, Δ of rows ``rj``); the row scales of Kb (scalar decay, L2
    norm: loaded from ``rk`` where ``stored_rk``, else from the rows of k) go on Δ."""
    plan = e.p
    e.decay_state(s, "b_S")
    with s.block(f"for j in range(C // {rows}):"):
        s(f"rj = j * {rows} + tl.arange(0, {rows})" if rows != "RB" else "rj = j * RB + rb", "okj = rj < L")
        load_delta(s)
        factors = []
        if plan.scalar:
            e.load_G(s, "b_Gj", "rj", "okj")
            factors.append("tl.exp(b_Glast - b_Gj)[:, None]")
        if plan.spec.qk_l2norm:
            if stored_rk:
                e.load(s, "b_rkj", "rk", "rj", "okj")
            else:
                e.rnorm(s, "b_rkj", "k", "rj", "okj")
            factors.append("b_rkj[:, None]")
        if factors:
            s(f"b_d = b_d * {' * '.join(factors)}")
        for b in e.blocks:
            e.load(s, "b_k", "k", "rj", "okj", b, raw=not plan.channel)
            if plan.channel:
                e.load_G(s, "b_Gb", "rj", "okj", b)
                s(f"b_k = b_k * tl.exp(b_Glast{b}[None, :] - b_Gb)")
            s(f"b_S{b} += {e.dot('tl.trans(b_k)', 'b_d')}")


# ============================================================================ output
def _emit_output(plan: Plan) -> Kernel:
    e, spec, l2 = Emitter(plan), plan.spec, plan.spec.qk_l2norm
    params = ["q"]
    if not plan.aqk_stored:
        params.append("k")
    if spec.has_decay:
        params.append("G")
    if plan.aqk_stored:
        params.append("Aqk")
    if plan.delta:
        params.append("vnew")
    need_v = not plan.delta or spec.skip is not Skip.NONE
    if need_v:
        params.append("v")
    if not plan.delta and plan.beta:
        params.append("beta")
    if spec.skip is not Skip.NONE:
        params.append("D")
    if spec.output_gate is OutputGate.SILU:
        params.append("z")
    params += ["hs", out("o"), "scale"]
    params += ["chunk_t0", "chunk_len", "H", "HV", "GROUP"]
    params.append("MMA")
    s = Source()
    params = declare(plan, params)
    with s.block(signature("output_fwd", params)):
        s('"""Per chunk and V tile (BVP wide): O = Qg S + Aqk Δ, then the layer-side output terms."""')
        e.chunk_prologue(s, v_tile="BVP")
        e.bases(s, params)
        if spec.has_decay:
            e.load_glast(s)
            if plan.scalar:
                e.load_G(s, "b_G", "r", "row_ok")
        s("b_o = tl.zeros([C, BVP], dtype=tl.float32)")
        if not plan.aqk_stored:
            s("b_A = tl.zeros([C, C], dtype=tl.float32)")
        if l2:
            s("b_nq = tl.zeros([C], dtype=tl.float32)")
            if not plan.aqk_stored:
                s("b_nk = tl.zeros([C], dtype=tl.float32)")
        for b in e.blocks:
            e.load(s, "b_q", "q", "r", "row_ok", b)
            if l2:
                s("b_nq += tl.sum(b_q * b_q, 1)")
            # spare programs (L = 0) must not read the never-written state of a chunk that does not exist
            s(
                f"b_S = tl.load(hs + (i_c * HV + i_h) * K * V + ck{b}[:, None] * V + cv[None, :], "
                f"mask=(ck{b} < tl.where(L > 0, K, 0))[:, None] & cv_ok[None, :], other=0.0)"
            )
            s(f"b_o += {e.dot(_gated_q(e, s, 'b_q', 'b_Gb', 'r', 'row_ok', b), 'b_S')}")
            if not plan.aqk_stored:
                e.load(s, "b_k", "k", "r", "row_ok", b)
                if l2:
                    s("b_nk += tl.sum(b_k * b_k, 1)")
                s(f"b_A += {e.dot('b_q', 'tl.trans(b_k)')}")
        if l2:
            s(f"b_rq = tl.rsqrt(b_nq + {L2NORM_EPS})")
            if not plan.aqk_stored:
                s(f"b_rk = tl.rsqrt(b_nk + {L2NORM_EPS})")
        _scale_output(e, s, "r", "row_ok", "b_G", "b_G", "r[:, None] >= r[None, :]")
        if need_v:
            e.load(s, "b_v", "v", "r", "row_ok")
        if plan.delta:
            e.load(s, "b_d", "vnew", "r", "row_ok")
        delta = "b_d" if plan.delta else "b_v"  # Δ: stored by the state pass, or V (times β)
        if not plan.delta and plan.beta:
            e.load(s, "b_b", "beta", "r", "row_ok")
            delta = "b_v * b_b[:, None]"
        e.causal_dot(s, "b_ad", "b_A", delta)
        s("b_o += b_ad")
        _output_terms(e, s, "b_o", "b_v", "r", "row_ok")
    return Kernel("output_fwd", params, ("NCH*NVP", "HV"), s.text(), plan.warps_wide)


def _gated_q(e: Emitter, s: Source, q: str, G: str, rows: str, ok: str, b) -> str:
    """Key block ``b`` of Qg: ``q`` itself, or with channel decay ``q ⊙ exp(G)`` (G loaded as ``G``)."""
    if not e.p.channel:
        return q
    e.load_G(s, G, rows, ok, b)
    return f"{q} * tl.exp({G})"


def _scale_output(e: Emitter, s: Source, rows: str, ok: str, g_rows: str, g_cols: str, causal: str) -> None:
    """The row scales of ``b_o`` = Qg S (scale, scalar decay's exp(G), 1/|q| as ``b_rq``) and
    ``b_A`` = Aqk of rows ``rows``: loaded where stored, else ``b_A`` = q·kᵀ scaled in place
    (1/|k| as ``b_rk``; decay exp(G_r - G_c) from ``g_rows``, ``g_cols``) and masked by ``causal``."""
    plan, l2 = e.p, e.p.spec.qk_l2norm
    row_scale = ["scale"]
    if plan.scalar:
        row_scale.append(f"tl.exp({g_rows})[:, None]")
    if l2:
        row_scale.append("b_rq[:, None]")
    s(f"b_o = b_o * {' * '.join(row_scale)}")
    if plan.aqk_stored:
        s(f"b_A = tl.load(p_Aqk + {rows}[:, None] * (HV * C) + r[None, :], mask={ok}[:, None] & ({causal}), other=0.0)")
        return
    scales = ["scale"]
    if l2:
        scales.append("b_rq[:, None] * b_rk[None, :]")
    if plan.scalar:
        scales.append(f"tl.exp(tl.where({causal}, {g_rows}[:, None] - {g_cols}[None, :], 0.0))")
    s(f"b_A = tl.where({causal}, b_A * {' * '.join(scales)}, 0.0)")


def _output_params(plan: Plan) -> list:
    """What the layer-side output terms read beyond Δ's inputs: v for a skip, D, z."""
    spec, params = plan.spec, []
    if spec.skip is not Skip.NONE:
        params += (["v"] if plan.delta else []) + ["D"]
    if spec.output_gate is OutputGate.SILU:
        params.append("z")
    return params


def _output_terms(e: Emitter, s: Source, o: str, v: str, rows: str, ok: str) -> None:
    """The layer-side output terms on rows ``rows`` of ``o`` (D skip on ``v``, the SiLU output
    gate), then the store."""
    spec = e.p.spec
    if spec.skip is Skip.HEAD:
        s(f"{o} += tl.load(D + i_h).to(tl.float32) * {v}")
    elif spec.skip is Skip.CHANNEL:
        s(f"{o} += tl.load(D + i_h * V + cv, mask=cv_ok, other=0.0).to(tl.float32)[None, :] * {v}")
    if spec.output_gate is OutputGate.SILU:
        e.load(s, "b_z", "z", rows, ok)
        s(f"{o} = {o} * b_z / (1.0 + tl.exp(-b_z))")
    e.store(s, "o", o, rows, ok)


# ============================================================================ scan
def _emit_scan(plan: Plan) -> Kernel:
    """The state pass that also writes each chunk's output, so that neither the chunk start
    states nor Δ reach memory (the backward recomputes them with ``state_fwd``)."""
    e, spec, l2 = Emitter(plan), plan.spec, plan.spec.qk_l2norm
    params = ["q", "k"]
    if spec.has_decay:
        params.append("G")
    if plan.aqk_stored:
        params += ["Aqk", *(["rq", "rk"] if _norms_stored(plan) else [])]
    if plan.delta:
        params += ["W", "U"]
    else:
        params.append("v")
        if plan.beta:
            params.append("beta")
    params += _output_params(plan)
    params += [out("o"), out("dtile"), "scale", "h0", out("ht"), "cu_seqlens", "chunk_off"]
    params += ["TT", "H", "HV", "GROUP", "HAS_H0", "STORE_HT"]
    params.append("MMA")
    s = Source()
    params = declare(plan, params)
    causal = "ro[:, None] >= r[None, :]"
    with s.block(signature("scan_fwd", params)):
        s('"""Sequential over one sequence\'s chunks: Δ = U - W S (or β ⊙ V) into this program\'s')
        s("[C, BVS] tile of ``dtile`` (rewritten every chunk, so it stays in L2), O = Qg S + Aqk Δ")
        s('with the output terms a sub-chunk at a time, then S <- exp(G_C) S + Kbᵀ Δ."""')
        e.sequence_prologue(s, "BVS")
        s("r = tl.arange(0, C)")
        s("p_dtile = dtile + (i_n * HV + i_h) * C * V  # this program's Δ tile")
        e.state_tiles(s, "b_S", "HAS_H0", "h0", "BVS")
        with s.block("for ic in range(0, NT):"):
            s("t0 = bos + ic * C", "L = tl.minimum(eos - t0, C)", "row_ok = r < L")
            e.bases(s, params)
            if spec.has_decay:
                e.load_glast(s)
            if not plan.aqk_stored:  # what q·kᵀ's scales need
                if plan.scalar:
                    e.load_G(s, "b_G", "r", "row_ok")
                if l2:
                    e.rnorm(s, "b_rk", "k", "r", "row_ok")
            # Δ of every row block, from the chunk's start state
            with s.block("for j in range(C // RB):"):
                s("rj = j * RB + rb", "okj = rj < L")
                if plan.delta:
                    e.load(s, "b_d", "U", "rj", "okj")
                    for b in e.blocks:
                        e.load(s, "b_w", "W", "rj", "okj", b, raw=True)
                        s(f"b_d -= {e.dot('b_w', f'b_S{b}')}")
                else:
                    e.load(s, "b_d", "v", "rj", "okj")
                    if plan.beta:
                        e.load(s, "b_b", "beta", "rj", "okj")
                        s("b_d = b_d * b_b[:, None]")
                s("tl.store(p_dtile + rj[:, None] * V + cv[None, :], b_d, mask=cv_ok[None, :])")
            s("tl.debug_barrier()  # Δ written by all threads before it is read back")
            s("b_D = tl.load(p_dtile + r[:, None] * V + cv[None, :], mask=cv_ok[None, :], other=0.0)")
            # O = Qg S + Aqk Δ, a sub-chunk's BC rows at a time: the output tiles beside the state
            # stay small enough for three programs an SM (sm_90, K = V = 128: 168 registers on 4
            # warps without channel decay, where the whole chunk at once took 213-236)
            with s.block("for j in range(C // BC):"):
                s("ro = j * BC + tl.arange(0, BC)", "oko = ro < L")
                s("b_o = tl.zeros([BC, BVS], dtype=tl.float32)")
                if not plan.aqk_stored:
                    s("b_A = tl.zeros([BC, C], dtype=tl.float32)")
                if l2 and not _norms_stored(plan):  # |q| from the tiles the products load
                    s("b_rq = tl.zeros([BC], dtype=tl.float32)")
                for b in e.blocks:
                    e.load(s, "b_qo", "q", "ro", "oko", b, raw=not (plan.channel or l2))
                    if l2 and not _norms_stored(plan):
                        s("b_rq += tl.sum(b_qo * b_qo, 1)")
                    s(f"b_o += {e.dot(_gated_q(e, s, 'b_qo', 'b_Gob', 'ro', 'oko', b), f'b_S{b}')}")
                    if not plan.aqk_stored:
                        e.load(s, "b_kc", "k", "r", "row_ok", b, raw=True)
                        s(f"b_A += {e.dot('b_qo', 'tl.trans(b_kc)')}")
                if _norms_stored(plan):
                    e.load(s, "b_rq", "rq", "ro", "oko")
                elif l2:
                    s(f"b_rq = tl.rsqrt(b_rq + {L2NORM_EPS})")
                if plan.scalar:
                    e.load_G(s, "b_Go", "ro", "oko")
                _scale_output(e, s, "ro", "oko", "b_Go", "b_G", causal)
                e.causal_dot(s, "b_ad", "b_A", "b_D", row="r", out_row="ro")
                s("b_o += b_ad")
                if spec.skip is not Skip.NONE:
                    e.load(s, "b_v", "v", "ro", "oko")
                _output_terms(e, s, "b_o", "b_v", "ro", "oko")
            # channel decay's gated key tiles beside four state blocks (K = 256) take BC rows
            _update_state(e, s, lambda s: s("b_d = tl.load(p_dtile + rj[:, None] * V + cv[None, :], mask=cv_ok[None, :], other=0.0)"),
                          rows="BC" if plan.channel and plan.BK > 128 else "RB", stored_rk=_norms_stored(plan))
            s("tl.debug_barrier()  # every thread done with Δ before the next chunk's")
        s("if STORE_HT:")
        for b in e.blocks:
            s(f"    tl.store(ht + (i_n * HV + i_h) * K * V + s_off{b}, b_S{b}, mask=s_mask{b})")
    return Kernel("scan_fwd", params, ("N*NVS", "HV"), s.text(), plan.warps_scan, num_stages=1)


_EMITTERS = {
    "gates": _emit_gates,
    "intra": _emit_intra,
    "wu": _emit_wu,
    "state": _emit_state,
    "output": _emit_output,
    "scan": _emit_scan,
}


def forward_kernels(plan: Plan) -> list[Kernel]:
    """The forward kernels of ``plan``, in launch order."""
    return [_EMITTERS[stage](plan) for stage in (*plan.stages, "scan")]
