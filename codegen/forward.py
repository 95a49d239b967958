"""Emitters of the forward stages: gate cumsum, intra-chunk matrices, state pass, output.

Each function turns a :class:`~codegen.plan.Plan` into the source of one Triton kernel
that holds only the spec's own terms: no decay, no ``exp``; no correction, no solve;
scalar decay, plain matrix products with a ``[C, C]`` decay mask; channel decay, the
sub-chunk reference-point factorization. Layout everywhere: tokens flattened over the
batch (``[B*T, heads, dim]``), chunks found through a device-built chunk table, so
fixed-length and packed batches run the same code.
"""
from __future__ import annotations

from dataclasses import dataclass

from linattn.spec import OutputGate, Role, Skip

from .exprs import to_triton
from .plan import Plan
from .source import Source

__all__ = ["Kernel", "forward_kernels"]


@dataclass(frozen=True)
class Kernel:
    """One emitted kernel: its name, parameters (name, kind), launch grid and source.

    Parameter kinds: ``io`` (a tensor in the input dtype), ``f32``/``i32``/``i64``
    (tensors of that dtype), ``int`` and ``float`` (scalars).
    ``grid``: ``chunks`` (chunk, value head), ``chunks_v`` (chunk, value head, V tile),
    ``seqs_v`` (sequence, value head, V tile).
    """

    name: str
    params: tuple[tuple[str, str], ...]
    grid: str
    source: str
    num_warps: int


L2NORM = "1e-6"


class _Emitter:
    """Shared pieces of the forward kernels for one plan."""

    def __init__(self, plan: Plan) -> None:
        self.p = plan
        self.dt = {"bf16": "tl.bfloat16", "fp16": "tl.float16", "fp32": "tl.float32"}[plan.dtype]
        self.prec = f', input_precision="{plan.precision}"' if plan.dtype == "fp32" else ""

    def dot(self, a: str, b: str) -> str:
        """A tensor-core product with operands rounded to the input dtype, fp32 accumulation.

        ``MMA`` is the operand type the product runs in: the input dtype when compiled;
        fp32 in Triton's interpreter, whose bf16 products are wrong (the rounding to the
        input dtype is kept, so the numerics are the same).
        """
        return f"tl.dot(({a}).to({self.dt}).to(MMA), ({b}).to({self.dt}).to(MMA){self.prec})"

    @staticmethod
    def dot32(a: str, b: str) -> str:
        """An exact fp32 product (the triangular solve)."""
        return f'tl.dot({a}, {b}, input_precision="ieee")'

    # ------------------------------------------------------------------ prologues
    def chunk_prologue(self, s: Source, v_tile: bool = False) -> None:
        s("i_c = tl.program_id(0)")
        s("i_h = tl.program_id(1)")
        if v_tile:
            s("i_v = tl.program_id(2)")
        s("i_hk = i_h // GROUP  # the q/k head serving this value head")
        s("t0 = tl.load(chunk_t0 + i_c)  # first token of the chunk (int64)")
        s("L = tl.load(chunk_len + i_c)  # tokens in the chunk; 0 for spare programs")
        s("r = tl.arange(0, C)")
        s("row_ok = r < L")
        s("tok = t0 + r")
        s("ck = tl.arange(0, BK)")
        s("ck_ok = ck < K")
        if v_tile:
            s("cv = i_v * BV + tl.arange(0, BV)")
            s("cv_ok = cv < V")

    # ------------------------------------------------------------------ loads
    def load_qk(self, s: Source, var: str, ptr: str, tok: str, ok: str) -> None:
        s(
            f"{var} = tl.load({ptr} + ({tok}[:, None] * H + i_hk) * K + ck[None, :], "
            f"mask={ok}[:, None] & ck_ok[None, :], other=0.0).to(tl.float32)"
        )
        if self.p.spec.qk_l2norm:
            s(f"{var} = {var} * tl.rsqrt(tl.sum({var} * {var}, 1) + {L2NORM})[:, None]")

    def load_qk_row(self, s: Source, var: str, ptr: str, tok: str, ok: str) -> None:
        s(f"{var} = tl.load({ptr} + ({tok} * H + i_hk) * K + ck, mask=ck < tl.where({ok}, K, 0), other=0.0).to(tl.float32)")
        if self.p.spec.qk_l2norm:
            s(f"{var} = {var} * tl.rsqrt(tl.sum({var} * {var}, 0) + {L2NORM})")

    def load_glast(self, s: Source) -> None:
        """``G`` at the chunk's last token: the decay of the whole chunk, and the fill of padding rows."""
        if self.p.channel:
            s("b_Glast = tl.load(G + ((t0 + L - 1) * HV + i_h) * K + ck, mask=ck < tl.where(L > 0, K, 0), other=0.0)")
        else:
            s("b_Glast = tl.load(G + (t0 + L - 1) * HV + i_h, mask=L > 0, other=0.0)")

    def load_G(self, s: Source, var: str, tok: str, ok: str) -> None:
        """Rows of ``G``; padding rows repeat the last valid row, so every exp factor stays <= 1."""
        if self.p.channel:
            s(
                f"{var} = tl.load(G + ({tok}[:, None] * HV + i_h) * K + ck[None, :], "
                f"mask={ok}[:, None] & ck_ok[None, :], other=0.0)"
            )
            s(f"{var} = tl.where({ok}[:, None], {var}, b_Glast[None, :])")
        else:
            s(f"{var} = tl.load(G + {tok} * HV + i_h, mask={ok}, other=0.0)")
            s(f"{var} = tl.where({ok}, {var}, b_Glast)")

    def load_G_row(self, s: Source, var: str, tok: str, ok: str) -> None:
        s(f"{var} = tl.load(G + ({tok} * HV + i_h) * K + ck, mask=ck < tl.where({ok}, K, 0), other=0.0)")
        s(f"{var} = tl.where({ok}, {var}, b_Glast)")

    def load_beta(self, s: Source, var: str, tok: str, ok: str) -> None:
        s(f"{var} = tl.load(beta + {tok} * HV + i_h, mask={ok}, other=0.0).to(tl.float32)")

    def load_v(self, s: Source, var: str, ptr: str, tok: str, ok: str) -> None:
        s(
            f"{var} = tl.load({ptr} + ({tok}[:, None] * HV + i_h) * V + cv[None, :], "
            f"mask={ok}[:, None] & cv_ok[None, :], other=0.0).to(tl.float32)"
        )

    def store_v(self, s: Source, ptr: str, value: str, tok: str, ok: str) -> None:
        s(
            f"tl.store({ptr} + ({tok}[:, None] * HV + i_h) * V + cv[None, :], "
            f"({value}).to({ptr}.dtype.element_ty), mask={ok}[:, None] & cv_ok[None, :])"
        )

    def decay_factor(self, G: str, other: str, sign: str = "") -> str:
        """``exp(other - G)`` broadcast to ``[rows, BK]`` (``other`` a row or a reference)."""
        if self.p.channel:
            return f"tl.exp({other}[None, :] - {G})"
        return f"tl.exp({other} - {G})[:, None]"


def _signature(name: str, params: list[tuple[str, str]]) -> str:
    args = ", ".join(f"{n}: tl.constexpr" if kind == "constexpr" else n for n, kind in params)
    return f"def {name}({args}):"


def _operand_params(plan: Plan) -> list[tuple[str, str]]:
    out = []
    for o in plan.spec.operands:
        out.append((f"s_{o.name}", "float") if o.role is Role.SCALAR else (f"x_{o.name}", "io"))
    return out


# ============================================================================ gates
def _emit_gates(plan: Plan) -> Kernel:
    e, spec = _Emitter(plan), plan.spec
    used = {o.name: o for t in (spec.gate, spec.beta if plan.beta_computed else None) if t for o in t.operands}
    params = [(n, k) for n, k in _operand_params(plan) if n[2:] in used]
    if spec.has_decay:
        params.append(("G", "f32"))
    if plan.beta_computed:
        params.append(("beta", "f32"))
    params += [("chunk_t0", "i64"), ("chunk_len", "i32"), ("HV", "int")]
    s = Source()
    with s.block(_signature("gates_fwd", params)):
        s('"""Evaluate the gate (and β) terms per token; G = their cumsum inside each chunk, in fp32."""')
        s("i_c = tl.program_id(0)", "i_h = tl.program_id(1)")
        s("t0 = tl.load(chunk_t0 + i_c)", "L = tl.load(chunk_len + i_c)")
        s("r = tl.arange(0, C)", "row_ok = r < L", "tok = t0 + r")
        if plan.channel:
            s("ck = tl.arange(0, BK)", "ck_ok = ck < K")
        for o in used.values():
            n = o.name
            if o.role is Role.TOKEN:
                s(f"o_{n} = tl.load(x_{n} + tok * HV + i_h, mask=row_ok, other=0.0).to(tl.float32)")
            elif o.role is Role.TOKEN_CHANNEL:
                s(
                    f"o_{n} = tl.load(x_{n} + (tok[:, None] * HV + i_h) * K + ck[None, :], "
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

        if spec.has_decay:
            shape, mask = ("[C, BK]", "row_ok[:, None] & ck_ok[None, :]") if plan.channel else ("[C]", "row_ok")
            s(f"b_g = {to_triton(spec.gate.expr, name(plan.channel))} + tl.zeros({shape}, dtype=tl.float32)")
            s(f"b_g = tl.where({mask}, b_g, 0.0)")
            s("b_G = tl.cumsum(b_g, 0)")
            if plan.channel:
                s("tl.store(G + (tok[:, None] * HV + i_h) * K + ck[None, :], b_G, mask=row_ok[:, None] & ck_ok[None, :])")
            else:
                s("tl.store(G + tok * HV + i_h, b_G, mask=row_ok)")
        if plan.beta_computed:
            s(f"b_beta = {to_triton(spec.beta.expr, name(False))} + tl.zeros([C], dtype=tl.float32)")
            s("tl.store(beta + tok * HV + i_h, b_beta, mask=row_ok)")
    return Kernel("gates_fwd", tuple(params), "chunks", s.text(), plan.warps_chunk)


# ============================================================================ intra
def _emit_intra(plan: Plan) -> Kernel:
    e = _Emitter(plan)
    NS, BC = plan.NS, plan.BC
    params = [("k", "io")]
    if plan.aqk_stored:
        params.append(("q", "io"))
    if plan.spec.has_decay:
        params.append(("G", "f32"))
    if plan.beta:
        params.append(("beta", "io" if not plan.beta_computed else "f32"))
    if plan.delta:
        params.append(("Tm", "io"))
    if plan.aqk_stored:
        params += [("Aqk", "io"), ("scale", "float")]
    params += [("chunk_t0", "i64"), ("chunk_len", "i32"), ("H", "int"), ("HV", "int"), ("GROUP", "int")]
    params.append(("MMA", "constexpr"))

    s = Source()
    with s.block(_signature("intra_fwd", params)):
        what = []
        if plan.delta:
            what.append("Akk -> T = (I + Akk)^-1 (the state pass applies it: Δ = T β(V - Kg S))")
        if plan.aqk_stored:
            what.append("Aqk")
        s(f'"""Per chunk: {"; ".join(what)}."""')
        e.chunk_prologue(s)
        if plan.spec.has_decay:
            e.load_glast(s)
        s("ri = tl.arange(0, BC)")

        def rows(i: int, k: bool = True, q: bool = False, G: bool = True, b: bool = False, tag: str = "") -> None:
            t = tag or str(i)
            s(f"r{t} = {i * BC} + ri", f"ok{t} = r{t} < L", f"tok{t} = t0 + r{t}")
            if k:
                e.load_qk(s, f"b_k{t}", "k", f"tok{t}", f"ok{t}")
            if q:
                e.load_qk(s, f"b_q{t}", "q", f"tok{t}", f"ok{t}")
            if G and plan.spec.has_decay:
                e.load_G(s, f"b_G{t}", f"tok{t}", f"ok{t}")
            if b and plan.beta:
                e.load_beta(s, f"b_b{t}", f"tok{t}", f"ok{t}")

        def store_aqk(i: int, j: int, value: str) -> None:
            s(
                f"tl.store(Aqk + (tok{i}[:, None] * HV + i_h) * C + ({j * BC} + ri)[None, :], "
                f"({value}).to(Aqk.dtype.element_ty), mask=ok{i}[:, None])"
            )

        beta_rows = lambda i: f" * b_b{i}[:, None]" if plan.beta else ""  # noqa: E731
        for i in range(NS):
            s("", f"# ---- rows of sub-chunk {i}")
            rows(i, k=True, q=plan.aqk_stored, b=True)
            if plan.channel and i > 0:
                # reference point: G at the last token before sub-chunk i (>= G of every later row)
                ref = i * BC - 1
                s(f"ref_ok = {ref} < L")
                e.load_G_row(s, "b_Gref", f"(t0 + {ref})", "ref_ok")
                if plan.delta:
                    s(f"b_ka = b_k{i} * tl.exp(b_G{i} - b_Gref[None, :])")
                if plan.aqk_stored:
                    s(f"b_qa = b_q{i} * tl.exp(b_G{i} - b_Gref[None, :])")
            for j in range(i):
                rows(j, k=True, tag="j")
                if plan.channel:
                    s("b_kb = b_kj * tl.exp(b_Gref[None, :] - b_Gj)")
                    if plan.delta:
                        s(f"b_A{i}{j} = {e.dot('b_ka', 'tl.trans(b_kb)')}{beta_rows(i)}")
                    if plan.aqk_stored:
                        store_aqk(i, j, f"{e.dot('b_qa', 'tl.trans(b_kb)')} * scale")
                elif plan.scalar:
                    s(f"b_A{i}{j} = {e.dot(f'b_k{i}', 'tl.trans(b_kj)')} * tl.exp(b_G{i}[:, None] - b_Gj[None, :]){beta_rows(i)}")
                else:
                    s(f"b_A{i}{j} = {e.dot(f'b_k{i}', 'tl.trans(b_kj)')}{beta_rows(i)}")
            # diagonal block
            if plan.channel:
                # pairwise: one column at a time, exp(G_r - G_s) with s <= r only
                if plan.delta:
                    s(f"b_A{i}{i} = tl.zeros([BC, BC], dtype=tl.float32)")
                if plan.aqk_stored:
                    s("b_Aqk = tl.zeros([BC, BC], dtype=tl.float32)")
                with s.block("for c in range(BC):"):
                    s(f"ok_c = {i * BC} + c < L", f"tok_c = t0 + {i * BC} + c")
                    e.load_qk_row(s, "b_kc", "k", "tok_c", "ok_c")
                    e.load_G_row(s, "b_Gc", "tok_c", "ok_c")
                    s(f"b_e = tl.exp(tl.where(ri[:, None] >= c, b_G{i} - b_Gc[None, :], 0.0))")
                    if plan.delta:
                        s(f"col = tl.sum(tl.where(ri[:, None] > c, b_k{i} * b_kc[None, :] * b_e, 0.0), 1)")
                        s(f"b_A{i}{i} += tl.where(ri[None, :] == c, col[:, None], 0.0)")
                    if plan.aqk_stored:
                        s(f"col = tl.sum(tl.where(ri[:, None] >= c, b_q{i} * b_kc[None, :] * b_e, 0.0), 1)")
                        s("b_Aqk += tl.where(ri[None, :] == c, col[:, None], 0.0)")
                if plan.delta and plan.beta:
                    s(f"b_A{i}{i} = b_A{i}{i} * b_b{i}[:, None]")
                if plan.aqk_stored:
                    store_aqk(i, i, "b_Aqk * scale")
            else:
                decay = ""
                if plan.scalar:
                    decay = f" * tl.exp(tl.where(ri[:, None] > ri[None, :], b_G{i}[:, None] - b_G{i}[None, :], 0.0))"
                s(
                    f"b_A{i}{i} = tl.where(ri[:, None] > ri[None, :], "
                    f"{e.dot(f'b_k{i}', f'tl.trans(b_k{i})')}{decay}, 0.0){beta_rows(i)}"
                )

        if not plan.delta:
            return Kernel("intra_fwd", tuple(params), "chunks", s.text(), plan.warps_chunk)

        s("", "# ---- T = (I + Akk)^-1: diagonal blocks by forward substitution")
        s("eye = tl.where(ri[:, None] == ri[None, :], 1.0, 0.0)")
        for i in range(NS):
            s(f"b_T{i}{i} = eye")
            with s.block("for rr in range(1, BC):"):
                s(f"a_row = tl.sum(tl.where(ri[:, None] == rr, b_A{i}{i}, 0.0), 0)")
                s(f"new = tl.where(ri == rr, 1.0, 0.0) - tl.sum(a_row[:, None] * b_T{i}{i}, 0)")
                s(f"b_T{i}{i} = tl.where(ri[:, None] == rr, new[None, :], b_T{i}{i})")
        s("# off-diagonal blocks: T_ij = -T_ii · sum_{j <= m < i} A_im T_mj")
        for i in range(1, NS):
            for j in range(i):
                terms = " + ".join(e.dot32(f"b_A{i}{m}", f"b_T{m}{j}") for m in range(j, i))
                s(f"b_T{i}{j} = -{e.dot32(f'b_T{i}{i}', f'({terms})')}")

        s("", "# ---- store T (lower triangular; the blocks above the diagonal are never read)")
        for i in range(NS):
            s(f"r{i} = {i * BC} + ri", f"ok{i} = r{i} < L", f"tok{i} = t0 + r{i}")
            for j in range(i + 1):
                s(
                    f"tl.store(Tm + (tok{i}[:, None] * HV + i_h) * C + ({j * BC} + ri)[None, :], "
                    f"b_T{i}{j}.to(Tm.dtype.element_ty), mask=ok{i}[:, None])"
                )
    return Kernel("intra_fwd", tuple(params), "chunks", s.text(), plan.warps_chunk)


# ============================================================================ state
def _emit_state(plan: Plan) -> Kernel:
    e = _Emitter(plan)
    params = [("k", "io")]
    if plan.spec.has_decay:
        params.append(("G", "f32"))
    params.append(("v", "io"))
    if plan.beta:
        params.append(("beta", "io" if not plan.beta_computed else "f32"))
    if plan.delta:
        params += [("Tm", "io"), ("vnew", "io")]
    params += [("hs", "io"), ("h0", "f32"), ("ht", "f32"), ("cu_seqlens", "i32"), ("chunk_off", "i32")]
    params += [("H", "int"), ("HV", "int"), ("GROUP", "int"), ("HAS_H0", "constexpr"), ("STORE_HT", "constexpr")]
    params.append(("MMA", "constexpr"))
    s = Source()
    with s.block(_signature("state_fwd", params)):
        s('"""Sequential over one sequence\'s chunks: store each start state S, then')
        if plan.delta:
            s("Δ = T β(V - Kg S) (stored: the output and the backward read it), and")
        s('S <- exp(G_C) S + Kbᵀ Δ."""')
        s("i_n = tl.program_id(0)", "i_h = tl.program_id(1)", "i_v = tl.program_id(2)")
        s("i_hk = i_h // GROUP")
        s("bos = tl.load(cu_seqlens + i_n).to(tl.int64)", "eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)")
        s("first = tl.load(chunk_off + i_n)  # global index of the sequence's first chunk")
        s("r = tl.arange(0, C)", "ck = tl.arange(0, BK)", "ck_ok = ck < K")
        s("cv = i_v * BV + tl.arange(0, BV)", "cv_ok = cv < V")
        s("s_mask = ck_ok[:, None] & cv_ok[None, :]")
        s("s_off = ck[:, None] * V + cv[None, :]")
        s("if HAS_H0:")
        s("    b_S = tl.load(h0 + (i_n * HV + i_h) * K * V + s_off, mask=s_mask, other=0.0).to(tl.float32)")
        s("else:")
        s("    b_S = tl.zeros([BK, BV], dtype=tl.float32)")
        with s.block("for ic in range(0, tl.cdiv(eos - bos, C)):"):
            s("t0 = bos + ic * C", "L = tl.minimum(eos - t0, C)", "row_ok = r < L", "tok = t0 + r")
            s("tl.store(hs + ((first + ic) * HV + i_h) * K * V + s_off, b_S.to(hs.dtype.element_ty), mask=s_mask)")
            e.load_qk(s, "b_k", "k", "tok", "row_ok")
            if plan.spec.has_decay:
                e.load_glast(s)
                e.load_G(s, "b_G", "tok", "row_ok")
            e.load_v(s, "b_d", "v", "tok", "row_ok")
            if plan.delta:
                # Δ = T β(V - Kg S): the WY form applied on the fly (W, U are never stored)
                kg = "b_k"
                if plan.spec.has_decay:
                    kg += " * " + ("tl.exp(b_G)" if plan.channel else "tl.exp(b_G)[:, None]")
                s(f"b_d = b_d - {e.dot(kg, 'b_S')}")
            if plan.beta:
                e.load_beta(s, "b_b", "tok", "row_ok")
                s("b_d = b_d * b_b[:, None]")
            if plan.delta:
                s(
                    "b_T = tl.load(Tm + (tok[:, None] * HV + i_h) * C + r[None, :], "
                    "mask=row_ok[:, None] & (r[:, None] >= r[None, :]), other=0.0)"
                )
                s(f"b_d = {e.dot('b_T', 'b_d')}")
                e.store_v(s, "vnew", "b_d", "tok", "row_ok")
            if plan.spec.has_decay:
                s(f"b_k = b_k * {e.decay_factor('b_G', 'b_Glast')}")
                s("b_S = b_S * " + ("tl.exp(b_Glast)[:, None]" if plan.channel else "tl.exp(b_Glast)"))
            s(f"b_S += {e.dot('tl.trans(b_k)', 'b_d')}")
        s("if STORE_HT:")
        s("    tl.store(ht + (i_n * HV + i_h) * K * V + s_off, b_S, mask=s_mask)")
    return Kernel("state_fwd", tuple(params), "seqs_v", s.text(), plan.warps_state)


# ============================================================================ output
def _emit_output(plan: Plan) -> Kernel:
    e, spec = _Emitter(plan), plan.spec
    params = [("q", "io")]
    if not plan.aqk_stored:
        params.append(("k", "io"))
    if spec.has_decay:
        params.append(("G", "f32"))
    if plan.aqk_stored:
        params.append(("Aqk", "io"))
    if plan.delta:
        params.append(("vnew", "io"))
    need_v = not plan.delta or spec.skip is not Skip.NONE
    if need_v:
        params.append(("v", "io"))
    if not plan.delta and plan.beta:
        params.append(("beta", "io" if not plan.beta_computed else "f32"))
    if spec.skip is not Skip.NONE:
        params.append(("D", "io"))
    if spec.output_gate is OutputGate.SILU:
        params.append(("z", "io"))
    params += [("hs", "io"), ("o", "io"), ("scale", "float")]
    params += [("chunk_t0", "i64"), ("chunk_len", "i32"), ("H", "int"), ("HV", "int"), ("GROUP", "int")]
    params.append(("MMA", "constexpr"))
    s = Source()
    with s.block(_signature("output_fwd", params)):
        s('"""Per chunk and V tile: O = Qg S + Aqk Δ, then the layer-side output terms."""')
        e.chunk_prologue(s, v_tile=True)
        e.load_qk(s, "b_q", "q", "tok", "row_ok")
        s("b_S = tl.load(hs + (i_c * HV + i_h) * K * V + ck[:, None] * V + cv[None, :], "
          "mask=ck_ok[:, None] & cv_ok[None, :], other=0.0)")
        causal = "r[:, None] >= r[None, :]"
        if spec.has_decay:
            e.load_glast(s)
            e.load_G(s, "b_G", "tok", "row_ok")
            qg = "b_q * " + ("tl.exp(b_G)" if plan.channel else "tl.exp(b_G)[:, None]") + " * scale"
        else:
            qg = "b_q * scale"
        s(f"b_o = {e.dot(qg, 'b_S')}")
        if plan.aqk_stored:
            s(f"b_A = tl.load(Aqk + (tok[:, None] * HV + i_h) * C + r[None, :], mask=row_ok[:, None] & ({causal}), other=0.0)")
        else:
            e.load_qk(s, "b_k", "k", "tok", "row_ok")
            s(f"b_A = {e.dot('b_q', 'tl.trans(b_k)')} * scale")
            if plan.scalar:
                s(f"b_A = b_A * tl.exp(tl.where({causal}, b_G[:, None] - b_G[None, :], 0.0))")
            s(f"b_A = tl.where({causal}, b_A, 0.0)")
        if need_v:
            e.load_v(s, "b_v", "v", "tok", "row_ok")
        if plan.delta:
            e.load_v(s, "b_d", "vnew", "tok", "row_ok")
        elif plan.beta:
            e.load_beta(s, "b_b", "tok", "row_ok")
            s("b_d = b_v * b_b[:, None]")
        else:
            s("b_d = b_v")
        s(f"b_o += {e.dot('b_A', 'b_d')}")
        if spec.skip is Skip.HEAD:
            s("b_o += tl.load(D + i_h).to(tl.float32) * b_v")
        elif spec.skip is Skip.CHANNEL:
            s("b_o += tl.load(D + i_h * V + cv, mask=cv_ok, other=0.0).to(tl.float32)[None, :] * b_v")
        if spec.output_gate is OutputGate.SILU:
            e.load_v(s, "b_z", "z", "tok", "row_ok")
            s("b_o = b_o * b_z / (1.0 + tl.exp(-b_z))")
        e.store_v(s, "o", "b_o", "tok", "row_ok")
    return Kernel("output_fwd", tuple(params), "chunks_v", s.text(), plan.warps_output)


_EMITTERS = {"gates": _emit_gates, "intra": _emit_intra, "state": _emit_state, "output": _emit_output}


def forward_kernels(plan: Plan) -> list[Kernel]:
    """The forward kernels of ``plan``, in launch order."""
    return [_EMITTERS[stage](plan) for stage in plan.stages]
