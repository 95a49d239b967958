"""Emitters of the backward stages (docs/algorithms.md, "The backward").

The backward runs on the spec's *core* (decay, correction, whether there is a β): the
layer-side terms (gate and β parameterizations, L2 normalisation, D skip, output gate)
are elementwise and are differentiated around it. Stages, for one chunk with start state
S, end-state gradient dS' and ``Δ`` the chunk's pseudo-values:

1. ``dvl``    dΔ_loc = Aqkᵀ dO                                    (parallel per chunk)
2. ``dstate`` reverse over chunks: store dS', dΔ = dΔ_loc + Kb dS',
              dS <- exp(G_C) dS' + Qgᵀ dO - Wᵀ dΔ                (sequential)
3. ``dqk``    dQg = dO Sᵀ, dKb = Δ dS'ᵀ, dW = -dΔ Sᵀ, dAqk = dO Δᵀ, and their gate parts;
              with the delta rule the WY form too: d(βKg) = Tᵀ dW, d(βV) = Tᵀ dΔ,
              dAkk = -Tᵀ dT Tᵀ = -Tᵀ dΔ Δᵀ (dT = dΔ (T⁻¹Δ)ᵀ), dW never leaving the chip
4. ``dprod``  dAqk, dAkk pushed to q, k, β and G through the gated products
              (sub-chunk reference points for channel decay, as in the forward)
5. ``dgate``  dg = the reverse cumsum of dG inside the chunk

With scalar or no decay, 3-4 are one kernel, ``dchunk``: nothing between them goes through
memory. Channel decay keeps 3 and 4 apart: its products kernel works on sub-chunk blocks
with their own reference points.

Recompute vs save: the forward keeps G, β, T and (channel decay) Aqk, which are per
token and cheap; W, U, the chunk start states and Δ are recomputed by re-running the
forward's ``wu`` and ``state`` kernels, because the start states (K·V per chunk and
head) are the largest tensor of the whole computation and one extra sequential pass
costs less than keeping them alive between forward and backward.
"""
from __future__ import annotations

from linattn.spec import Skip

from .emit import Emitter, Kernel, plus, signature
from .manifest import declare, inout, out, partial_name
from .plan import Plan
from .source import Source

__all__ = ["backward_kernels"]

_CHUNK = ["chunk_t0", "chunk_len", "H", "HV", "GROUP"]


class _B(Emitter):
    """Loads and stores of the per-value-head buffers of the backward."""

    def load_cc(self, s: Source, var: str, name: str, mask: str, raw: bool = False) -> None:
        """A chunk's ``[C, C]`` matrix, zero outside ``mask`` (``raw``: in its stored dtype)."""
        s(f"{var} = tl.load(p_{name} + r[:, None] * (HV * C) + r[None, :], mask=row_ok[:, None] & ({mask}), other=0.0)")
        if not raw:
            s(f"{var} = {var}.to(tl.float32)")

    def norms(self, s: Source, rows: str, ok: str, names: tuple[str, ...] | None = None) -> None:
        """Where the spec L2-normalises q and k (and Comba's p), ``b_rn{name}_{rows}`` = 1/|row|
        of ``rows``: the backward reads them as given and normalises them on load (:meth:`qk`)."""
        if self.p.spec.qk_l2norm:
            for name in names or ("q", "k", *(["p"] if self.p.comba else [])):
                self.rnorm(s, f"b_rn{name}_{rows}", name, rows, ok)

    def qk(self, s: Source, var: str, name: str, rows: str, ok: str, b, norm_rows: str | None = None) -> None:
        """Key block ``b`` of q or k rows ``rows`` in fp32, normalised where the spec normalises
        them (by the norms of :meth:`norms` for ``norm_rows``, by default the same rows)."""
        self.load(s, var, name, rows, ok, b)
        if self.p.spec.qk_l2norm:
            s(f"{var} = {var} * b_rn{name}_{norm_rows or rows}[:, None]")

    def load_state(self, s: Source, var: str, name: str, index: str, b) -> None:
        s(
            f"{var} = tl.load({name} + ({index} * HV + i_h) * K * V + ck{b}[:, None] * V + cv[None, :], "
            f"mask=(ck{b} < tl.where(L > 0, K, 0))[:, None] & cv_ok[None, :], other=0.0).to(tl.float32)"
        )

    def gated(self, var: str, G: str, b) -> str:
        """``var ⊙ exp(G)`` broadcast to a ``[rows, KB]`` tile."""
        if self.p.channel:
            return f"{var} * tl.exp({G})"
        if self.p.scalar:
            return f"{var} * tl.exp({G})[:, None]"
        return var

    def kb_factor(self, G: str, b) -> str:
        """``exp(G_C - G)`` broadcast to a ``[rows, KB]`` tile (1 without decay)."""
        if self.p.channel:
            return f" * tl.exp(b_Glast{b}[None, :] - {G})"
        if self.p.scalar:
            return f" * tl.exp(b_Glast - {G})[:, None]"
        return ""


def _delta_param(plan: Plan) -> list[str]:
    return ["vnew"] if plan.delta else (["v"] + (["beta"] if plan.beta else []))


def _load_delta(e: _B, s: Source, var: str, rows: str, ok: str) -> None:
    """Δ of the chunk's rows: stored by the state pass (delta rule) or β ⊙ V."""
    p = e.p
    if p.delta:
        e.load(s, var, "vnew", rows, ok)
    else:
        e.load(s, var, "v", rows, ok)
        if p.beta:
            e.load(s, "b_bt", "beta", rows, ok)
            s(f"{var} = {var} * b_bt[:, None]")


def _causal_A(e: _B, s: Source) -> None:
    """``b_A = Aqk`` of the chunk (loaded for channel decay, recomputed otherwise)."""
    p, causal = e.p, "r[:, None] >= r[None, :]"
    if p.aqk_stored:
        e.load_cc(s, "b_A", "Aqk", causal)
        return
    s("b_A = tl.zeros([C, C], dtype=tl.float32)")
    e.norms(s, "r", "row_ok")
    with e.key_loop(s) as b:
        e.qk(s, "b_q", "q", "r", "row_ok", b)
        e.qk(s, "b_k", "k", "r", "row_ok", b)
        s(f"b_A += {e.dot('b_q', 'tl.trans(b_k)')}")
    decay = ""
    if p.scalar:
        decay = f" * tl.exp(tl.where({causal}, b_G[:, None] - b_G[None, :], 0.0))"
    s(f"b_A = tl.where({causal}, b_A * scale{decay}, 0.0)")


def _skip_params(plan: Plan) -> list:
    """A kernel that writes dv also takes the D skip (see ``plan.skip_in_core``): D, and the
    per-chunk partial sums of dD."""
    return ["D", out(partial_name("D"))] if plan.spec.skip is not Skip.NONE else []


def _skip_begin(e: _B, s: Source) -> None:
    if e.p.spec.skip is Skip.HEAD:
        s("b_D = tl.load(D + i_h).to(tl.float32)", "b_dD = tl.sum(tl.zeros([C], dtype=tl.float32), 0)")


def _skip_tile(e: _B, s: Source) -> str:
    """In a walk over V with ``b_do`` and ``b_v`` loaded: dD's share of the tile; returns
    the skip's term of dv (empty without a skip)."""
    skip, pd = e.p.spec.skip, partial_name("D")
    if skip is Skip.HEAD:
        s("b_dD += tl.sum(tl.sum(b_do * b_v, 1), 0)")
        return " + b_D * b_do"
    if skip is Skip.CHANNEL:
        s("b_D = tl.load(D + i_h * V + cv, mask=cv_ok, other=0.0).to(tl.float32)")
        s(f"tl.store({pd} + (i_c * HV + i_h) * V + cv, tl.sum(b_do * b_v, 0), mask=cv_ok)")
        return " + b_D[None, :] * b_do"
    return ""


def _skip_end(e: _B, s: Source) -> None:
    if e.p.spec.skip is Skip.HEAD:
        s(f"tl.store({partial_name('D')} + i_c * HV + i_h, b_dD)")


def _wy_dv_tile(e: _B, s: Source, bcol: str) -> None:
    """The delta rule's share of a walk over V (``b_d`` = Δ and ``b_do`` loaded, ``b_T`` the
    chunk's T): d(βV) = Tᵀ dΔ gives dv (with the D skip) and dβ's share; dT += dΔ Δᵀ."""
    e.load(s, "b_v", "v", "r", "row_ok")
    e.load(s, "b_dd", "dvn", "r", "row_ok")
    s(f"b_dbv = {e.dot('tl.trans(b_T)', 'b_dd')}")
    e.store(s, "dv", "b_dbv" + bcol + _skip_tile(e, s), "r", "row_ok")
    if bcol:
        s("b_db += tl.sum(b_dbv * b_v, 1)")
    s(f"b_dT += {e.dot('b_dd', 'tl.trans(b_d)')}  # dΔ Δᵀ")


# ============================================================================ 1. dvl
def _emit_dvl(plan: Plan) -> Kernel:
    e = _B(plan)
    params = ["q", "k"] if not plan.aqk_stored else ["Aqk"]
    if plan.scalar:
        params.append("G")
    chunk = [n for n in _CHUNK if n != "H"] if plan.aqk_stored else _CHUNK  # no q/k read: no q/k heads
    params += ["dO", out("dvl"), *([] if plan.aqk_stored else ["scale"]), *chunk, "MMA"]
    # V in tiles of up to 128 columns: one Aqk per chunk (built or loaded once, not per tile
    # of the state's BV) and products N = 64-128 wide on one warpgroup
    bw = min(max(16, 1 << (plan.V - 1).bit_length()), 128)
    s = Source()
    params = declare(plan, params)
    with s.block(signature("dvl_bwd", params)):
        s('"""Per chunk: dΔ_loc = Aqkᵀ dO (the intra-chunk part of the gradient of Δ), V in tiles."""')
        e.chunk_prologue(s)
        e.bases(s, params)
        if plan.scalar:
            e.load_glast(s)
            e.load_G(s, "b_G", "r", "row_ok")
        _causal_A(e, s)
        s("b_At = tl.trans(b_A)", f"cvb = tl.arange(0, {bw})")
        with s.block(f"for i_v in range({-(-plan.V // bw)}):"):
            s(f"cv = i_v * {bw} + cvb", "cv_ok = cv < V")
            e.load(s, "b_do", "dO", "r", "row_ok")
            e.store(s, "dvl", e.dot("b_At", "b_do"), "r", "row_ok")
    return Kernel("dvl_bwd", params, ("NCH", "HV"), s.text(), plan.warps_wide, num_stages=1)


# ============================================================================ 2. dstate
def _emit_dstate(plan: Plan) -> Kernel:
    e = _B(plan)
    params = ["q", "k"]
    if plan.spec.has_decay:
        params.append("G")
    if plan.delta:
        params.append("W")
    params += ["dO", "dvl", out("dvn"), out("dh"), "dht", out("dh0")]
    params += ["scale", "cu_seqlens", "chunk_off", "TT", "H", "HV"]
    params += ["GROUP", "HAS_DHT", "STORE_DH0", "MMA"]
    s = Source()
    params = declare(plan, params)
    with s.block(signature("dstate_bwd", params)):
        s('"""Reverse over one sequence\'s chunks: store dS\' (the end-state gradient), then')
        s("dΔ = dΔ_loc + Kb dS' and dS <- exp(G_C) dS' + Qgᵀ dO" + (" - Wᵀ dΔ" if plan.delta else "") + '."""')
        e.sequence_prologue(s)
        e.state_tiles(s, "b_dS", "HAS_DHT", "dht")
        with s.block("for icr in range(0, NT):"):
            s("ic = NT - 1 - icr", "t0 = bos + ic * C", "L = tl.minimum(eos - t0, C)")
            e.bases(s, params)
            for b in e.blocks:
                s(f"tl.store(dh + ((first + ic) * HV + i_h) * K * V + s_off{b}, b_dS{b}.to(dh.dtype.element_ty), mask=s_mask{b})")
            if plan.spec.has_decay:
                e.load_glast(s)
            with s.block("for j in range(C // RB):"):
                s("rj = j * RB + rb", "okj = rj < L")
                e.load(s, "b_dd", "dvl", "rj", "okj")
                e.norms(s, "rj", "okj", ("k",))
                s("b_acc = tl.zeros([RB, BV], dtype=tl.float32)")
                if plan.scalar:
                    e.load_G(s, "b_G", "rj", "okj")
                for b in e.blocks:
                    e.qk(s, "b_k", "k", "rj", "okj", b)
                    if plan.channel:
                        e.load_G(s, "b_Gb", "rj", "okj", b)
                    kb = "b_k" + (e.kb_factor("b_Gb", b) if plan.channel else "")
                    s(f"b_acc += {e.dot(kb, f'b_dS{b}')}")
                factor = " * tl.exp(b_Glast - b_G)[:, None]" if plan.scalar else ""
                s(f"b_dd += b_acc{factor}")
                e.store(s, "dvn", "b_dd", "rj", "okj")
            s("tl.debug_barrier()  # dΔ written by all threads before it is read back")
            e.decay_state(s, "b_dS")
            with s.block("for j in range(C // RB):"):
                s("rj = j * RB + rb", "okj = rj < L")
                e.load(s, "b_do", "dO", "rj", "okj")
                if plan.delta:
                    e.load(s, "b_dd", "dvn", "rj", "okj")
                if plan.scalar:
                    e.load_G(s, "b_G", "rj", "okj")
                    s("b_do = b_do * tl.exp(b_G)[:, None]")
                e.norms(s, "rj", "okj", ("q",))
                for b in e.blocks:
                    e.qk(s, "b_q", "q", "rj", "okj", b)
                    qg = "b_q * scale"
                    if plan.channel:
                        e.load_G(s, "b_Gb", "rj", "okj", b)
                        qg = "b_q * tl.exp(b_Gb) * scale"
                    s(f"b_dS{b} += {e.dot(f'tl.trans({qg})', 'b_do')}")
                    if plan.delta:
                        s(
                            f"b_w = tl.load(p_W + rj[:, None] * (HV * K) + ck{b}[None, :], "
                            f"mask=okj[:, None] & ck_ok{b}[None, :], other=0.0)"
                        )
                        s(f"b_dS{b} -= {e.dot('tl.trans(b_w)', 'b_dd')}")
        s("if STORE_DH0:")
        for b in e.blocks:
            s(f"    tl.store(dh0 + (i_n * HV + i_h) * K * V + s_off{b}, b_dS{b}, mask=s_mask{b})")
    return Kernel("dstate_bwd", params, ("N*NV", "HV"), s.text(), plan.warps_dstate, num_stages=1)


# ============================================================================ 3. dqk
def _emit_dqk(plan: Plan) -> Kernel:
    """Channel decay, per chunk: the products with the chunk's start state and its gradient
    (dQg = dO Sᵀ, dKb = Δ dS'ᵀ, dAqk = dO Δᵀ) and, with the delta rule, the WY form's backward
    in the same pass (d(βV) = Tᵀ dΔ, d(βKg) = Tᵀ dW with dW = -dΔ Sᵀ kept on chip, dT ->
    dAkk = -Tᵀ dT Tᵀ), so that neither dW nor a partial dk or dG goes through memory. The
    sub-chunk products (dAqk, dAkk to q, k, G) follow in ``dprod``."""
    e = _B(plan, plan.KBB)
    delta, beta = plan.delta, plan.delta and plan.beta
    params = ["q", "k", *(["p"] if plan.comba else []), "G", *(["Gx"] if plan.read_before else []),
              *_delta_param(plan), "hs", "dh", "dO"]
    if delta:
        params += ["v", "Tm", *(["beta"] if beta else []), "dvn", out("dv"), *_skip_params(plan)]
        params += [out("dbeta")] if beta else []
        params += [out("dAkk"), *([out("dp")] if plan.comba else []), *([out("dGx")] if plan.read_before else [])]
    params += [out("dq"), out("dk"), out("dG"), out("dAqk"), "scale", *_CHUNK, "MMA"]
    s = Source()
    causal = "r[:, None] >= r[None, :]"
    params = declare(plan, params)
    with s.block(signature("dqk_bwd", params)):
        s('"""Per chunk: dQg = dO Sᵀ, dKb = Δ dS\'ᵀ, dAqk = dO Δᵀ' + (", the WY form: d(βV) = Tᵀ dΔ, d(βKg) = Tᵀ dW," if delta else ","))
        s(("dAkk = -Tᵀ dT Tᵀ, " if delta else "") + 'and what they give q, k' + (", v, β" if delta else "") + ' and G (S and dS\' are the chunk\'s)."""')
        e.chunk_prologue(s)
        e.bases(s, params)
        e.norms(s, "r", "row_ok")
        # On one warpgroup. Without the delta rule V is walked BVP columns at a time for dAqk
        # (wgmma N = BVP); with it, the [C, C] T and dT beside [C, 64] tiles spill (measured
        # at K = V = 128: 36-64 bytes), so BVN (32 there). The state products walk BVN too
        # beside their [C, KBB] accumulators (N = KBB either way).
        wv, nv = ("BVN", "NVN") if delta else ("BVP", "NVP")
        s(f"cvb = tl.arange(0, {wv})", "cvb0 = tl.arange(0, BVN)")
        bcol = " * b_b[:, None]" if beta else ""
        if delta:
            e.load_cc(s, "b_T", "Tm", causal, raw=True)  # a product operand only
            s("b_dT = tl.zeros([C, C], dtype=tl.float32)")
            if beta:
                e.load(s, "b_b", "beta", "r", "row_ok")
                s("b_db = tl.zeros([C], dtype=tl.float32)")
            _skip_begin(e, s)

        s("", "# ---- over V: dAqk" + ("; d(βV) = Tᵀ dΔ (dv, dβ) and its part of dT" if delta else ""))
        s("b_dA = tl.zeros([C, C], dtype=tl.float32)")
        with s.block(f"for i_v in range({nv}):"):
            s(f"cv = i_v * {wv} + cvb", "cv_ok = cv < V")
            e.load(s, "b_do", "dO", "r", "row_ok")
            _load_delta(e, s, "b_d", "r", "row_ok")
            s(f"b_dA += {e.dot('b_do', 'tl.trans(b_d)')}")
            if delta:
                _wy_dv_tile(e, s, bcol)
        if delta:
            _skip_end(e, s)
        s(
            f"tl.store(p_dAqk + r[:, None] * (HV * C) + r[None, :], tl.where({causal}, b_dA, 0.0), "
            "mask=row_ok[:, None])"
        )

        s("", "# ---- over the key blocks: dq, dk (and dW) from the state products" + (", then the WY form" if delta else ""))
        with e.key_loop(s) as b:
            s(f"b_dq = tl.zeros([C, {e.kb}], dtype=tl.float32)", f"b_dk = tl.zeros([C, {e.kb}], dtype=tl.float32)")
            if delta:
                s(f"b_dw = tl.zeros([C, {e.kb}], dtype=tl.float32)")
            s(f"b_dGC = tl.zeros([{e.kb}], dtype=tl.float32)")
            with s.block("for i_v in range(NVN):"):
                s("cv = i_v * BVN + cvb0", "cv_ok = cv < V")
                e.load_state(s, "b_S", "hs", "i_c", b)
                e.load_state(s, "b_dS", "dh", "i_c", b)
                e.load(s, "b_do", "dO", "r", "row_ok")
                _load_delta(e, s, "b_d", "r", "row_ok")
                s(f"b_dq += {e.dot('b_do', 'tl.trans(b_S)')}")
                s(f"b_dk += {e.dot('b_d', 'tl.trans(b_dS)')}")
                if delta:
                    e.load(s, "b_dd", "dvn", "r", "row_ok")
                    s(f"b_dw -= {e.dot('b_dd', 'tl.trans(b_S)')}")
                s("b_dGC += tl.sum(b_S * b_dS, 1)")
            e.qk(s, "b_q", "q", "r", "row_ok", b)
            e.qk(s, "b_k", "k", "r", "row_ok", b)
            e.load_G(s, "b_Gb", "r", "row_ok", b)
            s(f"b_dq = {e.gated('b_dq', 'b_Gb', b)} * scale")
            s(f"b_dk = b_dk{e.kb_factor('b_Gb', b)}")
            e.store(s, "dq", "b_dq", "r", "row_ok", b)
            # G_C feeds exp(G_C) S and every Kb row: its gradient lands on the chunk's last row
            s(f"b_dGC = b_dGC * tl.exp(b_Glast{b}) + tl.sum(b_k * b_dk, 0)")
            s("b_dG = b_q * b_dq - b_k * b_dk + tl.where(r[:, None] == L - 1, b_dGC[None, :], 0.0)")
            # Comba's WY form adds to dp (and read before the decay, to dGx): dk (and dG) are
            # complete before it, stored first so that they leave the registers
            early = ["dk"] * plan.comba + ["dG"] * (plan.comba and plan.read_before)
            for buf in early:
                e.store(s, buf, f"b_{buf}", "r", "row_ok", b)
            if delta:  # the WY form: d(βKg) = Tᵀ dW (Comba's W reads along p: d(βPg))
                rd = plan.read
                if plan.comba:
                    e.qk(s, "b_p", "p", "r", "row_ok", b)
                gw = "b_Gb"
                if plan.read_before:  # the reads see the state before their token's decay: Gx
                    e.load_G(s, "b_Gxb", "r", "row_ok", b, buf="Gx")
                    gw = "b_Gxb"
                s(f"b_{rd}g = {e.gated(f'b_{rd}', gw, b)}")
                s(f"b_dbk = {e.dot('tl.trans(b_T)', 'b_dw')}")
                if beta:
                    s(f"b_db += tl.sum(b_dbk * b_{rd}g, 1)")
                s(f"b_dkg = b_dbk{bcol}")
                if plan.comba:
                    e.store(s, "dp", e.gated("b_dkg", gw, b), "r", "row_ok", b)
                else:
                    s(f"b_dk += {e.gated('b_dkg', gw, b)}")
                if plan.read_before:
                    e.store(s, "dGx", f"b_dkg * b_{rd}g", "r", "row_ok", b)
                else:
                    s(f"b_dG += b_dkg * b_{rd}g")
            for buf in ("dk", "dG"):
                if buf not in early:
                    e.store(s, buf, f"b_{buf}", "r", "row_ok", b)
        if delta:
            # dT = dW (βKg)ᵀ + dΔ (βV)ᵀ = dΔ (βV - βKg S)ᵀ = dΔ (T⁻¹Δ)ᵀ, so dAkk = -Tᵀ dT Tᵀ = -Tᵀ dΔ Δᵀ
            s(f"b_dAkk = -{e.dot('tl.trans(b_T)', 'b_dT')}")
            s(
                "tl.store(p_dAkk + r[:, None] * (HV * C) + r[None, :], "
                "tl.where(r[:, None] > r[None, :], b_dAkk, 0.0), mask=row_ok[:, None])"
            )
            if beta:
                e.store(s, "dbeta", "b_db", "r", "row_ok")
    return Kernel("dqk_bwd", params, ("NCH", "HV"), s.text(), plan.warps_wide, num_stages=1)


# ============================================================================ 4. dprod
def _dprod_split(plan: Plan) -> bool:
    """Whether channel decay's products take two kernels, dAqk's (``dprod``) and dAkk's
    (``dprodk``): with Comba's read key, whose third operand tile in one kernel spilled on sm_90
    (K = V = 128: 28-40 bytes; the DPLR core's read rows at Gx 28 more)."""
    return plan.channel and plan.delta and plan.comba


def _emit_dprod(plan: Plan, part: str = "both") -> Kernel:
    """Channel decay: the products per sub-chunk block, factored around reference points
    (rows of block i against earlier columns: G at the token before i; columns of block j
    against later rows: G at j's last token), diagonal blocks pairwise. ``part``: "both", or
    with :func:`_dprod_split` "q" (dAqk: dq final, dk's share into ``dkq``) and "k" (dAkk)."""
    e = _B(plan, min(plan.KBI, 16))
    NS, BC = plan.NS, plan.BC
    has_q, has_k = part in ("both", "q"), part in ("both", "k") and plan.delta
    rd = plan.read  # Akk's row operand
    params = ["q"] if has_q else []
    params += ["k", *(["p"] if has_k and plan.comba else []), "G"]
    if has_k and plan.read_before:  # Akk's rows at Gx = G - g
        params.append("Gx")
    if has_k and plan.beta:
        params += ["beta", inout("dbeta")]
    params += (["dAqk"] if has_q else []) + (["dAkk"] if has_k else [])
    if part == "both":
        params += ["dq", "dk", out("dqo"), out("dko")]
    elif part == "q":
        params += ["dq", "dk", out("dqo"), out("dkq")]
    else:
        params += ["dkq", out("dko")]
    params += [inout("dG"), "scale", *_CHUNK, "MMA"]
    if has_k and plan.comba:
        params += ["dp", out("dpo")]
    if has_k and plan.read_before:
        params.append(inout("dGx"))
    dk_in, dk_out = {"both": ("dk", "dko"), "q": ("dk", "dkq"), "k": ("dkq", "dko")}[part]
    # the products: (weights, row operand, column operand, gradient of rows, gradient of columns)
    prods = [("dAqk", "q", "k", "dq", "dk", ">=")] if has_q else []
    if has_k:
        prods.append(("dAkk", rd, "k", f"d{rd}", "dk", ">"))
    name = "dprodk_bwd" if part == "k" else "dprod_bwd"
    s = Source()
    params = declare(plan, params)
    with s.block(signature(name, params)):
        what = " and ".join(w for w, *_ in prods)
        s(f'"""Per chunk: {what} pushed to ' + ", ".join(dict.fromkeys(x for _, a, b, *_ in prods for x in (a, b)))
          + (", β" if has_k and plan.beta else "") + ' and G (channel decay)."""')
        e.chunk_prologue(s)
        e.bases(s, params)
        s("ri = tl.arange(0, BC)")
        if has_k and plan.beta:
            for i in range(NS):
                s(f"b_db{i} = tl.zeros([BC], dtype=tl.float32)")
        operands = tuple(dict.fromkeys(x for _, a, b, *_ in prods for x in (a, b)))
        for i in range(NS):  # the sub-chunks' row norms, for every key block
            if plan.spec.qk_l2norm:
                s(f"ri{i} = {plus(i * BC, 'ri')}", f"ok{i} = ri{i} < L")
            e.norms(s, f"ri{i}", f"ok{i}", operands)
        with e.key_loop(s) as b:
            for i in range(NS):
                s(f"# ---- sub-chunk {i}")
                s(f"ri{i} = {plus(i * BC, 'ri')}", f"ok{i} = ri{i} < L")
                e.load_G(s, "b_Gi", f"ri{i}", f"ok{i}", b)
                if plan.read_before and has_k:
                    e.load_G(s, "b_Gxi", f"ri{i}", f"ok{i}", b, buf="Gx")
                # row-side (dqi, dkri) and column-side (dkci, dkcq) gradients, per product
                for acc, present in (("b_dqi", has_q), ("b_dkri", has_k), ("b_dkci", has_q), ("b_dkcq", has_k)):
                    if present:
                        s(f"{acc} = tl.zeros([BC, {e.kb}], dtype=tl.float32)")
                # rows of block i against columns j < i: reference point before block i
                if i > 0:
                    s(f"ref_ok = {i * BC - 1} < L")
                    e.load_G_row(s, "b_Gref", f"{i * BC - 1}", "ref_ok", b)
                    for j in range(i):
                        s(f"rj = {plus(j * BC, 'ri')}", "okj = rj < L")
                        e.load_G(s, "b_Gj", "rj", "okj", b)
                        e.qk(s, "b_kj", "k", "rj", "okj", b, norm_rows=f"ri{j}")
                        s("b_kb = b_kj * tl.exp(b_Gref[None, :] - b_Gj)")
                        for wname, _a, _b, _ga, _gb, _m in prods:
                            s(
                                f"b_w = tl.load(p_{wname} + ri{i}[:, None] * (HV * C) + rj[None, :], "
                                f"mask=ok{i}[:, None], other=0.0)"
                            )
                            target = "b_dqi" if wname == "dAqk" else "b_dkri"
                            s(f"{target} += {e.dot('b_w', 'b_kb')}")
                    s("b_e = tl.exp(b_Gi - b_Gref[None, :])")
                    if has_q:
                        s("b_dqi = b_dqi * b_e")
                    if has_k:
                        if plan.read_before:
                            s("b_dkri = b_dkri * tl.exp(b_Gxi - b_Gref[None, :])")
                        else:
                            s("b_dkri = b_dkri * b_e")
                # columns of block i against rows j > i: reference point at block i's last token
                if i < NS - 1:
                    last = (i + 1) * BC - 1
                    s(f"ref_ok = {last} < L")
                    e.load_G_row(s, "b_Gref", f"{last}", "ref_ok", b)
                    for j in range(i + 1, NS):
                        s(f"rj = {plus(j * BC, 'ri')}", "okj = rj < L")
                        e.load_G(s, "b_Gj", "rj", "okj", b)
                        if plan.read_before and has_k:
                            e.load_G(s, "b_Gxj", "rj", "okj", b, buf="Gx")
                        for wname, a_name, _b, _ga, _gb, _m in prods:
                            e.qk(s, "b_aj", a_name, "rj", "okj", b, norm_rows=f"ri{j}")
                            gj = "b_Gxj" if wname == "dAkk" and plan.read_before else "b_Gj"
                            s(f"b_aj = b_aj * tl.exp({gj} - b_Gref[None, :])")
                            s(
                                f"b_w = tl.load(p_{wname} + rj[:, None] * (HV * C) + ri{i}[None, :], "
                                f"mask=okj[:, None], other=0.0)"
                            )
                            if wname == "dAkk" and plan.beta:
                                e.load(s, "b_bj", "beta", "rj", "okj")
                                s("b_w = b_w * b_bj[:, None]")
                            target = "b_dkci" if wname == "dAqk" else "b_dkcq"
                            s(f"{target} += {e.dot('tl.trans(b_w)', 'b_aj')}")
                    s("b_e = tl.exp(b_Gref[None, :] - b_Gi)")
                    if has_q:
                        s("b_dkci = b_dkci * b_e")
                    if has_k:
                        s("b_dkcq = b_dkcq * b_e")
                # the diagonal block, pairwise: one column c at a time
                if has_q:
                    e.qk(s, "b_qi", "q", f"ri{i}", f"ok{i}", b)
                e.qk(s, "b_ki", "k", f"ri{i}", f"ok{i}", b)
                if has_k and plan.comba:
                    e.qk(s, "b_pi", "p", f"ri{i}", f"ok{i}", b)
                if has_k and plan.beta:
                    e.load(s, "b_bi", "beta", f"ri{i}", f"ok{i}")
                with s.block("for c in range(BC):"):
                    s(f"rc = {plus(i * BC, 'c')}", "ok_c = rc < L")
                    e.load_qk_row(s, "b_kc", "k", "rc", "ok_c", b)
                    if plan.spec.qk_l2norm:  # row c's norm, from the block's
                        s(f"b_kc = b_kc * tl.sum(tl.where(ri == c, b_rnk_ri{i}, 0.0), 0)")
                    e.load_G_row(s, "b_Gc", "rc", "ok_c", b)
                    if has_q or not plan.read_before:
                        s("b_e = tl.exp(tl.where(ri[:, None] >= c, b_Gi - b_Gc[None, :], 0.0))")
                    if plan.read_before and has_k:
                        s("b_ex = tl.exp(tl.where(ri[:, None] > c, b_Gxi - b_Gc[None, :], 0.0))")
                    for wname, a_name, _b, _ga, _gb, m in prods:
                        s(
                            f"b_wc = tl.load(p_{wname} + ri{i} * (HV * C) + rc, "
                            f"mask=ok{i} & (ri {m} c), other=0.0)  # column c of the block"
                        )
                        a = f"b_{a_name}i"
                        if wname == "dAqk":
                            s("b_dqi += b_wc[:, None] * b_kc[None, :] * b_e")
                            dc = f"tl.sum(b_wc[:, None] * {a} * b_e, 0)"
                            s(f"b_dkci += tl.where(ri[:, None] == c, {dc}[None, :], 0.0)")
                        else:
                            ea = "b_ex" if plan.read_before else "b_e"
                            s(f"b_dkri += b_wc[:, None] * b_kc[None, :] * {ea}")
                            wb = "b_wc * b_bi" if plan.beta else "b_wc"
                            dc = f"tl.sum(({wb})[:, None] * {a} * {ea}, 0)"
                            s(f"b_dkcq += tl.where(ri[:, None] == c, {dc}[None, :], 0.0)")
                # scale, β, and what G gets: a ⊙ da - b ⊙ db
                dG, dk = [], []
                if has_q:
                    s("b_dqi = b_dqi * scale", "b_dkci = b_dkci * scale")
                    dG.append("b_qi * b_dqi - b_ki * b_dkci")
                    dk.append("b_dkci")
                if has_k:
                    if plan.beta:
                        # dβ_s = Σ_c k_sc · (the row gradient without β); summed over key blocks
                        s(f"b_db{i} += tl.sum(b_{rd}i * b_dkri, 1)", "b_dkri = b_dkri * b_bi[:, None]")
                    dG += ([] if plan.read_before else [f"b_{rd}i * b_dkri"]) + ["- b_ki * b_dkcq"]
                    dk += ["b_dkcq"] + ([] if plan.comba else ["b_dkri"])
                    if plan.read_before:  # the rows' share of G is Gx's
                        e.load(s, "b_x", "dGx", f"ri{i}", f"ok{i}", b)
                        e.store(s, "dGx", f"b_x + b_{rd}i * b_dkri", f"ri{i}", f"ok{i}", b)
                if has_k and plan.comba:  # the rows' gradient is p's
                    e.load(s, "b_x", "dp", f"ri{i}", f"ok{i}", b)
                    e.store(s, "dpo", "b_x + b_dkri", f"ri{i}", f"ok{i}", b)
                if has_q:
                    e.load(s, "b_x", "dq", f"ri{i}", f"ok{i}", b)
                    e.store(s, "dqo", "b_x + b_dqi", f"ri{i}", f"ok{i}", b)
                e.load(s, "b_x", dk_in, f"ri{i}", f"ok{i}", b)
                e.store(s, dk_out, "b_x + " + " + ".join(dk), f"ri{i}", f"ok{i}", b)
                e.load(s, "b_x", "dG", f"ri{i}", f"ok{i}", b)
                e.store(s, "dG", "b_x + " + " ".join(x if x.startswith("-") else f"+ {x}" for x in dG).lstrip("+ "),
                        f"ri{i}", f"ok{i}", b)
        if has_k and plan.beta:
            for i in range(NS):
                s(f"ri{i} = {plus(i * BC, 'ri')}", f"ok{i} = ri{i} < L")
                e.load(s, "b_x", "dbeta", f"ri{i}", f"ok{i}")
                e.store(s, "dbeta", f"b_x + b_db{i}", f"ri{i}", f"ok{i}")
    return Kernel(name, params, ("NCH", "HV"), s.text(), plan.warps_intra, num_stages=1)


# ============================================================================ 3-4 fused
def _emit_dchunk(plan: Plan) -> Kernel:
    """Scalar or no decay: ``dqk`` (with the WY form) and ``dprod`` as one pass per chunk, so that no
    partial dq, dk, dW, dAqk or dAkk goes through memory. The [C, C] weights come first (dAqk
    from a walk over V; with the delta rule dT, whose dW part needs a first walk over the key
    blocks, then dAkk); one more walk over the key blocks then finishes dq and dk block by
    block, with dW recomputed from the chunk's (L2-resident) S and dΔ."""
    e = _B(plan, plan.KBD)  # see Plan.KBD
    delta, beta, scalar = plan.delta, plan.delta and plan.beta, plan.scalar
    comba, rd = plan.comba, plan.read
    params = ["q", "k", *(["p"] if comba else [])]
    if scalar:
        params.append("G")
    if plan.read_before:
        params.append("Gx")
    params += _delta_param(plan)
    if delta:
        params += ["v", "Tm"] + (["beta"] if plan.beta else [])
    params += ["hs", "dh", "dO", "dvn", out("dqo"), out("dko"), *([out("dpo")] if comba else []), out("dv"), *_skip_params(plan)]
    if plan.beta:
        params.append(out("dbeta"))
    if scalar:
        params.append(out("dG"))
    if plan.read_before:
        params.append(out("dGx"))
    params += ["scale", *_CHUNK, "MMA"]
    s = Source()
    causal, strict = "r[:, None] >= r[None, :]", "r[:, None] > r[None, :]"
    decay = lambda m: f" * tl.exp(tl.where({m}, b_G[:, None] - b_G[None, :], 0.0))" if scalar else ""  # noqa: E731
    params = declare(plan, params)
    with s.block(signature("dchunk_bwd", params)):
        s('"""Per chunk: dAqk = dO Δᵀ' + (", d(βV) = Tᵀ dΔ, dT, dAkk = -Tᵀ dT Tᵀ" if delta else "") + ", then by key block")
        s("dQg = dO Sᵀ, dKb = Δ dS'ᵀ" + (", dW = -dΔ Sᵀ through the WY form" if delta else ""))
        s('and the weights pushed through the chunk\'s products to q, k' + (", β" if beta else "") + (" and G" if scalar else "") + '."""')
        e.chunk_prologue(s)
        e.bases(s, params)
        e.norms(s, "r", "row_ok")
        s("cvb = tl.arange(0, BVN)")
        if scalar:
            e.load_glast(s)
            e.load_G(s, "b_G", "r", "row_ok")
        if plan.read_before:  # the correction's rows read before their decay: at Gx = G - g
            e.load_G(s, "b_Gx", "r", "row_ok", buf="Gx")
            s("b_dGxr = tl.zeros([C], dtype=tl.float32)")
        if delta:
            e.load_cc(s, "b_T", "Tm", causal, raw=True)  # a product operand only
        if beta:
            e.load(s, "b_b", "beta", "r", "row_ok")
        if plan.beta:
            s("b_db = tl.zeros([C], dtype=tl.float32)")
            if not delta:
                e.load(s, "b_bt", "beta", "r", "row_ok")
        bcol = " * b_b[:, None]" if beta else ""

        s("", "# ---- over V: dAqk" + ("; d(βV) = Tᵀ dΔ (dv, dβ) and its part of dT" if delta else ""))
        s("b_dA = tl.zeros([C, C], dtype=tl.float32)")
        if delta:
            s("b_dT = tl.zeros([C, C], dtype=tl.float32)")
        _skip_begin(e, s)
        with s.block("for i_v in range(NVN):"):
            s("cv = i_v * BVN + cvb", "cv_ok = cv < V")
            e.load(s, "b_do", "dO", "r", "row_ok")
            if delta:
                e.load(s, "b_d", "vnew", "r", "row_ok")
            else:  # Δ = β ⊙ V: dv = β ⊙ dΔ, dβ = Σ dΔ ⊙ v
                e.load(s, "b_v", "v", "r", "row_ok")
                e.load(s, "b_dd", "dvn", "r", "row_ok")
                s("b_d = b_v * b_bt[:, None]" if plan.beta else "b_d = b_v")
                skip = _skip_tile(e, s)
                e.store(s, "dv", ("b_dd * b_bt[:, None]" if plan.beta else "b_dd") + skip, "r", "row_ok")
                if plan.beta:
                    s("b_db += tl.sum(b_dd * b_v, 1)")
            s(f"b_dA += {e.dot('b_do', 'tl.trans(b_d)')}")
            if delta:
                _wy_dv_tile(e, s, bcol)
        _skip_end(e, s)
        if delta:
            # dT = dW (βKg)ᵀ + dΔ (βV)ᵀ = dΔ (βV - βKg S)ᵀ = dΔ (T⁻¹Δ)ᵀ, so dAkk = -Tᵀ dT Tᵀ = -Tᵀ dΔ Δᵀ
            s(f"b_N = -{e.dot('tl.trans(b_T)', 'b_dT')}")
            dn = decay(strict).replace("b_G[:, None]", "b_Gx[:, None]") if plan.read_before else decay(strict)
            s(f"b_N = tl.where({strict}, b_N, 0.0){dn}  # dAkk through the decay")
        s(f"b_M = tl.where({causal}, b_dA, 0.0) * scale{decay(causal)}  # dAqk through scale and decay")
        if scalar:
            s("b_Md = tl.sum(tl.where(r[:, None] == r[None, :], b_M, 0.0), 1)  # the diagonal")
            s("b_M = tl.where(r[:, None] == r[None, :], 0.0, b_M)")
        if e.dt != "tl.float32":  # a product operand only: held as the products round it
            s(f"b_M = b_M.to({e.dt})")
        if delta:
            e.split(s, "b_N", "b_N")
            if beta:
                e.split(s, "b_NB", "b_N * b_b[:, None]")
        if scalar:
            s("b_dGr = tl.zeros([C], dtype=tl.float32)")
            s("b_dGS = tl.sum(tl.zeros([C], dtype=tl.float32), 0)  # Σ S ⊙ dS' (times exp(G_C) at the end)")
            s("b_dGK = tl.sum(tl.zeros([C], dtype=tl.float32), 0)  # Σ k ⊙ dk of the Kb term")

        # the chunk's products: Aqk[r, s] = q_r·k_s (e^{G_r - G_s}), Akk[s, j] = β_s k_s·k_j (...).
        # G's share of them, dG_r += Σ_s P[r, s] - Σ_s P[s, r] with P = dA ⊙ A, is read off the
        # same products (Σ_s P[r, s] = q_r·(M k)_r, with q, k rounded as the products see them so
        # that both sums add the same P); the diagonal, which does not depend on G, is left out
        # of them and added exactly in fp32. dq and dk take a walk each (fewer live weights).
        s("", "# ---- over the key blocks: dq = dO Sᵀ (gated) + dAqk k")
        with e.key_loop(s) as b:
            s(f"b_dq = tl.zeros([C, {e.kb}], dtype=tl.float32)")
            with s.block("for i_v in range(NVN):"):
                s("cv = i_v * BVN + cvb", "cv_ok = cv < V")
                e.load_state(s, "b_S", "hs", "i_c", b)
                e.load(s, "b_do", "dO", "r", "row_ok")
                s(f"b_dq += {e.dot('b_do', 'tl.trans(b_S)')}")
            e.qk(s, "b_q", "q", "r", "row_ok", b)
            e.qk(s, "b_k", "k", "r", "row_ok", b)
            s(f"b_dq = {e.gated('b_dq', 'b_G', b)} * scale")
            s(f"b_dqa = {e.dot('b_M', 'b_k')}")
            if scalar:
                s("b_dGr += tl.sum(b_q * b_dq, 1)")
                s(f"b_dGr += tl.sum(b_q.to({e.dt}).to(tl.float32) * b_dqa, 1)")
                s("b_dqa += b_Md[:, None] * b_k")
            e.store(s, "dqo", "b_dq + b_dqa", "r", "row_ok", b)

        # The delta rule's WY form and Akk's rows (both along k) join the dk walk; Comba's (along
        # p) take a walk of their own for dp, which keeps the live weights of each walk fewer.
        wy = delta and not comba
        s("", "# ---- over the key blocks: dk = Δ dS'ᵀ (gated)" + (" + the WY form's Tᵀ dW" if wy else "") + " + dAqkᵀ q" + (" + dAkk's" if delta else ""))
        with e.key_loop(s) as b:
            s(f"b_dk = tl.zeros([C, {e.kb}], dtype=tl.float32)")
            if wy:
                s(f"b_dw = tl.zeros([C, {e.kb}], dtype=tl.float32)")
            with s.block("for i_v in range(NVN):"):
                s("cv = i_v * BVN + cvb", "cv_ok = cv < V")
                if wy or scalar:
                    e.load_state(s, "b_S", "hs", "i_c", b)
                e.load_state(s, "b_dS", "dh", "i_c", b)
                _load_delta(e, s, "b_d", "r", "row_ok")
                s(f"b_dk += {e.dot('b_d', 'tl.trans(b_dS)')}")
                if wy:
                    _dw_tile(e, s)
                if scalar:
                    s("b_dGS += tl.sum(tl.sum(b_S * b_dS, 1), 0)")
            e.qk(s, "b_q", "q", "r", "row_ok", b)
            e.qk(s, "b_k", "k", "r", "row_ok", b)
            if comba:
                e.qk(s, "b_p", "p", "r", "row_ok", b)
            if e.kb_factor("b_G", b):
                s(f"b_dk = b_dk{e.kb_factor('b_G', b)}")
            if scalar:
                s("b_dGr -= tl.sum(b_k * b_dk, 1)")
                s("b_dGK += tl.sum(tl.sum(b_k * b_dk, 1), 0)")
            if wy:
                _dchunk_wy(e, s, "b_k", "b_dk", b)
            s(f"b_dka = {e.dot('tl.trans(b_M)', 'b_q')}")
            if scalar or beta:
                s(f"b_km = b_k.to({e.dt}).to(tl.float32)")
            if scalar:
                s("b_dGr -= tl.sum(b_km * b_dka, 1)")
                s("b_dka += b_Md[:, None] * b_q")
            s("b_dk += b_dka")
            if delta:  # Akk[s, r] = β_s x_s·k_r (x the read key: k, or Comba's p): r's column
                s(f"b_dkc = {e.dot_split('b_NB' if beta else 'b_N', f'b_{rd}', trans=True)}  # Σ_s β_s N[s, r] x_s")
                if scalar:
                    s("b_dGr -= tl.sum(b_km * b_dkc, 1)")
                s("b_dk += b_dkc")
            if wy:
                _dchunk_rows(e, s, "b_k", "b_dk", b)
            e.store(s, "dko", "b_dk", "r", "row_ok", b)
        if comba:
            s("", "# ---- over the key blocks: dp = the WY form's Tᵀ dW (gated) + dAkk's rows")
            with e.key_loop(s) as b:
                s(f"b_dw = tl.zeros([C, {e.kb}], dtype=tl.float32)")
                with s.block("for i_v in range(NVN):"):
                    s("cv = i_v * BVN + cvb", "cv_ok = cv < V")
                    e.load_state(s, "b_S", "hs", "i_c", b)
                    _dw_tile(e, s)
                e.qk(s, "b_k", "k", "r", "row_ok", b)
                e.qk(s, "b_p", "p", "r", "row_ok", b)
                s(f"b_dp = tl.zeros([C, {e.kb}], dtype=tl.float32)")
                _dchunk_wy(e, s, "b_p", "b_dp", b)
                _dchunk_rows(e, s, "b_p", "b_dp", b)
                e.store(s, "dpo", "b_dp", "r", "row_ok", b)
        if plan.beta:
            e.store(s, "dbeta", "b_db", "r", "row_ok")
        if scalar:
            s("b_dGr += tl.where(r == L - 1, b_dGS * tl.exp(b_Glast) + b_dGK, 0.0)")
            e.store(s, "dG", "b_dGr", "r", "row_ok")
        if plan.read_before:
            e.store(s, "dGx", "b_dGxr", "r", "row_ok")
    return Kernel("dchunk_bwd", params, ("NCH", "HV"), s.text(), plan.warps_dchunk, num_stages=1)


def _dw_tile(e: _B, s: Source) -> None:
    """In a walk over V with ``b_S`` loaded: dW -= dΔ Sᵀ (dW = -dΔ Sᵀ never leaves the chip)."""
    e.load(s, "b_dd", "dvn", "r", "row_ok")
    s(f"b_dw -= {e.dot('b_dd', 'tl.trans(b_S)')}")


def _dchunk_wy(e: _B, s: Source, x: str, dx: str, b) -> None:
    """dchunk's WY form for read key tile ``x``: d(β Xg) = Tᵀ dW into ``dx`` (gated), dβ and G's share."""
    p, bcol = e.p, " * b_b[:, None]" if e.p.beta else ""
    G, dG = ("b_Gx", "b_dGxr") if p.read_before else ("b_G", "b_dGr")  # where the rows read
    xg = f"{x}g" if p.scalar else x  # the read key ⊙ exp(G)
    if p.scalar:
        s(f"{xg} = {e.gated(x, G, b)}")
    s(f"b_dbk = {e.dot('tl.trans(b_T)', 'b_dw')}")
    if p.beta:
        s(f"b_db += tl.sum(b_dbk * {xg}, 1)")
    s(f"b_dkg = b_dbk{bcol}")
    s(f"{dx} += {e.gated('b_dkg', G, b)}")
    if p.scalar:
        s(f"{dG} += tl.sum(b_dkg * {xg}, 1)")


def _dchunk_rows(e: _B, s: Source, x: str, dx: str, b) -> None:
    """Akk's rows, Akk[r, j] = β_r x_r·k_j (``x`` the read key tile, ``b_k`` the keys): into ``dx``,
    dβ and G's share."""
    p, bcol = e.p, " * b_b[:, None]" if e.p.beta else ""
    s(f"b_dkr = {e.dot_split('b_N', 'b_k')}  # Σ_j N[r, j] k_j")
    if p.beta or p.scalar:
        xm = "b_km" if x == "b_k" else f"{x}.to({e.dt}).to(tl.float32)"  # x as the products round it
        s(f"b_kr = tl.sum({xm} * b_dkr, 1)  # Σ_j N[r, j] x_r·k_j")
    if p.beta:
        s("b_db += b_kr")
    if p.scalar:
        s(f"{'b_dGxr' if p.read_before else 'b_dGr'} += {'b_b * ' if p.beta else ''}b_kr")
    s(f"{dx} += b_dkr{bcol}")


# ============================================================================ 5. dgate
def _emit_dgate(plan: Plan) -> Kernel:
    params = ["dG", *(["dGx"] if plan.read_before else []), out("dg"), "chunk_t0", "chunk_len", "HV"]
    s = Source()
    params = declare(plan, params)
    with s.block(signature("dgate_bwd", params)):
        s('"""dg = the reverse cumsum of dG inside the chunk (G_t = g_1 + ... + g_t)' + (
            ", and of dGx without the diagonal (Gx_t = g_1 + ... + g_(t-1))" if plan.read_before else "") + '."""')
        s("i_c = tl.program_id(0)", "i_h = tl.program_id(1)", "i_k = tl.program_id(2)")
        s("t0 = tl.load(chunk_t0 + i_c)", "L = tl.load(chunk_len + i_c)")
        s("r = tl.arange(0, C)", "row_ok = r < L", "base = t0 * HV + i_h")
        if plan.channel:
            s("ck = i_k * KB + tl.arange(0, KB)", "ck_ok = ck < K")
            s("offs = base * K + r[:, None] * (HV * K) + ck[None, :]", "mask = row_ok[:, None] & ck_ok[None, :]")
        else:
            s("offs = base + r * HV", "mask = row_ok")
        s("b_dG = tl.load(dG + offs, mask=mask, other=0.0)")
        s("b_dg = tl.sum(b_dG, 0)" + ("[None, :]" if plan.channel else "") + " - tl.cumsum(b_dG, 0) + b_dG")
        if plan.read_before:
            s("b_dGx = tl.load(dGx + offs, mask=mask, other=0.0)")
            s("b_dg += tl.sum(b_dGx, 0)" + ("[None, :]" if plan.channel else "") + " - tl.cumsum(b_dGx, 0)")
        s("tl.store(dg + offs, b_dg, mask=mask)")
    return Kernel("dgate_bwd", params, ("NCH", "HV", "NKB") if plan.channel else ("NCH", "HV"), s.text(), plan.warps_gates)


def backward_kernels(plan: Plan) -> list[Kernel]:
    """The backward kernels of a core plan, in launch order."""
    out = [_emit_dvl(plan), _emit_dstate(plan)]
    if plan.channel:  # the sub-chunk factorization keeps its own products kernel
        out.append(_emit_dqk(plan))
        out += [_emit_dprod(plan, "q"), _emit_dprod(plan, "k")] if _dprod_split(plan) else [_emit_dprod(plan)]
    else:
        out.append(_emit_dchunk(plan))
    if plan.spec.has_decay:
        out.append(_emit_dgate(plan))
    return out
