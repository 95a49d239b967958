"""The toolkit every emitter uses: the emitted-kernel record, and the pieces of kernel text
shared by the forward, backward, decode-step, epilogue and table emitters (products,
prologues, key blocks, loads and stores by buffer layout, signatures).
"""
from __future__ import annotations

from dataclasses import dataclass

from linattn.spec import QK_L2NORM_EPS, Role

from .plan import Plan
from .source import Source

__all__ = ["Kernel", "Emitter", "L2NORM_EPS", "signature", "operand_params", "beta_kind"]


@dataclass(frozen=True)
class Kernel:
    """One emitted kernel: its name, parameters (name, kind), launch grid and source.

    Parameter kinds: ``io`` (a tensor in the input dtype), ``st`` (a stored intermediate,
    in the plan's :data:`~codegen.plan.STORE_DTYPE`), ``f32``/``i32``/``i64`` (tensors of
    that dtype), ``idx`` (an int32 or int64 index tensor), ``int`` and ``float`` (scalars),
    ``constexpr``.
    ``grid``: ``chunks`` (chunk, value head), ``chunks_k`` (chunk, value head, key block),
    ``chunks_v`` (chunk, value head, V tile), ``seqs_v`` (sequence, value head, V tile),
    ``rows_qk`` (block of ``epilogue.NORM_ROWS`` tokens, q/k head).
    """

    name: str
    params: tuple[tuple[str, str], ...]
    grid: str
    source: str
    num_warps: int
    #: software-pipelining depth; None: Triton's default. 1 where prefetching the next
    #: iteration's tiles would cost more registers than its latency hiding is worth
    num_stages: int | None = None


L2NORM_EPS = repr(QK_L2NORM_EPS)


class Emitter:
    """Shared pieces of the forward kernels for one plan."""

    def __init__(self, plan: Plan, kb: int | None = None) -> None:
        self.p = plan
        # products round their operands to the plan's product dtype (see codegen.plan.MMA_DTYPE)
        self.dt = {"bf16": "tl.bfloat16", "fp16": "tl.float16", "fp32": "tl.float32", "fp64": "tl.float64"}[plan.mma]
        self.prec = f', input_precision="{plan.mma_precision}"' if plan.mma_precision else ""
        self.kb = kb or plan.KB  # this kernel's key block
        self.blocks = range(plan.BK // self.kb)

    # ------------------------------------------------------------------ products
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

    def causal_dot(self, s: Source, var: str, lower: str, rows: str, row: str = "r", exact: bool = False) -> None:
        """``var = lower @ rows`` where ``lower`` mixes tokens causally (zero above the diagonal,
        by select) and ``rows`` holds one token per row (``row``: the rows' index vector).

        A non-finite value in ``rows`` at token t would reach every earlier row through
        ``0 · inf`` or ``0 · NaN``. So the rows from t on enter the product as 0, and the
        product's rows from t on come back as NaN: the recurrence's outputs there depend on
        the bad value, the earlier ones never. (A [rows, rows] select finds "a bad row at or
        before"; a scan over rows costs the solve its registers.)
        """
        s(f"x_rows = {rows}")
        s("x_bad = tl.max(tl.where(tl.abs(x_rows) < float('inf'), 0, 1), 1)  # rows holding inf or NaN")
        s(f"x_bad = tl.max(tl.where({row}[None, :] <= {row}[:, None], x_bad[None, :], 0), 1)  # one at or before")
        clean = "tl.where(x_bad[:, None] == 0, x_rows, 0.0)"
        s(f"{var} = {self.dot32(lower, clean) if exact else self.dot(lower, clean)}")
        s(f"{var} = tl.where(x_bad[:, None] > 0, float('nan'), {var})")

    # ------------------------------------------------------------------ prologues
    def chunk_prologue(self, s: Source, v_tile: bool = False) -> None:
        s("i_c = tl.program_id(0)", "i_h = tl.program_id(1)")
        if v_tile:
            s("i_v = tl.program_id(2)")
        s("i_hk = i_h // GROUP  # the q/k head serving this value head")
        s("t0 = tl.load(chunk_t0 + i_c)  # first token of the chunk (int64)")
        s("L = tl.load(chunk_len + i_c)  # tokens in the chunk; 0 for spare programs")
        s("r = tl.arange(0, C)", "row_ok = r < L")
        self.key_blocks(s)
        if v_tile:
            s("cv = i_v * BV + tl.arange(0, BV)", "cv_ok = cv < V")

    #: where each buffer's rows live: q/k heads x K, value heads x K / V / C, or one per head
    LAYOUT = {
        "q": "qk", "k": "qk",
        "v": "v", "vnew": "v", "o": "v", "z": "v", "U": "v", "dO": "v", "dvl": "v", "dvn": "v", "dv": "v",
        "W": "kh", "dq": "kh", "dk": "kh", "dW": "kh",
        "G": "g", "dG": "g", "dg": "g",
        "beta": "h", "dbeta": "h",
        "Tm": "c", "Aqk": "c", "dAqk": "c", "dAkk": "c",
    }  # fmt: skip

    def bases(self, s: Source, names: list[str]) -> None:
        """64-bit base pointers of the chunk's first token; offsets inside a chunk stay 32-bit
        (per-element 64-bit index tiles would double the registers of every load)."""
        for n in names:
            lay = self.LAYOUT[n]
            if lay == "g":
                lay = "kh" if self.p.channel else "h"
            s(
                {
                    "qk": f"p_{n} = {n} + (t0 * H + i_hk) * K",
                    "v": f"p_{n} = {n} + (t0 * HV + i_h) * V",
                    "kh": f"p_{n} = {n} + (t0 * HV + i_h) * K",
                    "h": f"p_{n} = {n} + t0 * HV + i_h",
                    "c": f"p_{n} = {n} + (t0 * HV + i_h) * C",
                }[lay]
            )

    def sequence_prologue(self, s: Source) -> None:
        """A (sequence, value head, V tile) program of a sequential pass: its bounds and state tiles' offsets."""
        s("i_n = tl.program_id(0)", "i_h = tl.program_id(1)", "i_v = tl.program_id(2)", "i_hk = i_h // GROUP")
        self.sequence_bounds(s)
        s("first = tl.load(chunk_off + i_n)  # global index of the sequence's first chunk")
        s("NT = tl.load(chunk_off + i_n + 1) - first  # its chunks (the table never exceeds the grid)")
        s("rb = tl.arange(0, RB)")
        self.key_blocks(s)
        s("cv = i_v * BV + tl.arange(0, BV)", "cv_ok = cv < V")
        for b in self.blocks:
            s(f"s_mask{b} = ck_ok{b}[:, None] & cv_ok[None, :]", f"s_off{b} = ck{b}[:, None] * V + cv[None, :]")

    @staticmethod
    def sequence_bounds(s: Source) -> None:
        """Tokens ``[bos, eos)`` of sequence ``i_n``, clamped into ``[0, TT)``: a bad ``cu_seqlens``
        on the GPU (reported asynchronously) never sends a program outside the tensors."""
        s("bos = tl.minimum(tl.maximum(tl.load(cu_seqlens + i_n).to(tl.int64), 0), TT)")
        s("eos = tl.minimum(tl.maximum(tl.load(cu_seqlens + i_n + 1).to(tl.int64), bos), TT)")

    def state_tiles(self, s: Source, var: str, flag: str, ptr: str) -> None:
        """The key blocks ``{var}b`` of a [K, BV] state tile: loaded from ``ptr`` if ``flag``, else zeros."""
        s(f"if {flag}:")
        for b in self.blocks:
            s(
                f"    {var}{b} = tl.load({ptr} + (i_n * HV + i_h) * K * V + s_off{b}, "
                f"mask=s_mask{b}, other=0.0).to(tl.float32)"
            )
        s("else:")
        for b in self.blocks:
            s(f"    {var}{b} = tl.zeros([{self.kb}, BV], dtype=tl.float32)")

    def key_blocks(self, s: Source) -> None:
        for b in self.blocks:
            s(f"ck{b} = {b * self.kb} + tl.arange(0, {self.kb})", f"ck_ok{b} = ck{b} < K")

    # ------------------------------------------------------------------ loads
    def load_qk(self, s: Source, var: str, ptr: str, rows: str, ok: str, b: int) -> None:
        """Rows ``rows`` of the chunk of q or k, key block ``b``, in fp32 (raw: normalisation is a row scale)."""
        s(
            f"{var} = tl.load(p_{ptr} + {rows}[:, None] * (H * K) + ck{b}[None, :], "
            f"mask={ok}[:, None] & ck_ok{b}[None, :], other=0.0).to(tl.float32)"
        )

    def load_qk_row(self, s: Source, var: str, ptr: str, row: str, ok: str, b: int) -> None:
        s(
            f"{var} = tl.load(p_{ptr} + {row} * (H * K) + ck{b}, "
            f"mask=ck{b} < tl.where({ok}, K, 0), other=0.0).to(tl.float32)"
        )

    def rnorm(self, s: Source, var: str, ptr: str, rows: str, ok: str) -> None:
        """``1 / |row|`` of q or k (the in-kernel L2 normalisation), over all key blocks."""
        s(f"{var} = tl.zeros_like({rows}).to(tl.float32)")
        for b in self.blocks:
            self.load_qk(s, "b_x", ptr, rows, ok, b)
            s(f"{var} += tl.sum(b_x * b_x, 1)")
        s(f"{var} = tl.rsqrt({var} + {L2NORM_EPS})")

    def load_glast(self, s: Source) -> None:
        """``G`` at the chunk's last token: the decay of the whole chunk, and the fill of padding rows."""
        if self.p.channel:
            for b in self.blocks:
                s(
                    f"b_Glast{b} = tl.load(p_G + (L - 1) * (HV * K) + ck{b}, "
                    f"mask=ck{b} < tl.where(L > 0, K, 0), other=0.0)"
                )
        else:
            s("b_Glast = tl.load(p_G + (L - 1) * HV, mask=L > 0, other=0.0)")

    def load_G(self, s: Source, var: str, rows: str, ok: str, b: int = 0) -> None:
        """Rows of ``G`` (key block ``b`` if channel); padding rows repeat the last valid row,
        so every exp factor stays <= 1."""
        if self.p.channel:
            s(
                f"{var} = tl.load(p_G + {rows}[:, None] * (HV * K) + ck{b}[None, :], "
                f"mask={ok}[:, None] & ck_ok{b}[None, :], other=0.0)"
            )
            s(f"{var} = tl.where({ok}[:, None], {var}, b_Glast{b}[None, :])")
        else:
            s(f"{var} = tl.load(p_G + {rows} * HV, mask={ok}, other=0.0)")
            s(f"{var} = tl.where({ok}, {var}, b_Glast)")

    def load_G_row(self, s: Source, var: str, row: str, ok: str, b: int) -> None:
        s(f"{var} = tl.load(p_G + {row} * (HV * K) + ck{b}, mask=ck{b} < tl.where({ok}, K, 0), other=0.0)")
        s(f"{var} = tl.where({ok}, {var}, b_Glast{b})")

    def load_beta(self, s: Source, var: str, rows: str, ok: str) -> None:
        s(f"{var} = tl.load(p_beta + {rows} * HV, mask={ok}, other=0.0).to(tl.float32)")

    def load_v(self, s: Source, var: str, ptr: str, rows: str, ok: str) -> None:
        s(
            f"{var} = tl.load(p_{ptr} + {rows}[:, None] * (HV * V) + cv[None, :], "
            f"mask={ok}[:, None] & cv_ok[None, :], other=0.0).to(tl.float32)"
        )

    def store_v(self, s: Source, ptr: str, value: str, rows: str, ok: str) -> None:
        s(
            f"tl.store(p_{ptr} + {rows}[:, None] * (HV * V) + cv[None, :], "
            f"({value}).to({ptr}.dtype.element_ty), mask={ok}[:, None] & cv_ok[None, :])"
        )


def signature(name: str, params: list[tuple[str, str]]) -> str:
    args = ", ".join(f"{n}: tl.constexpr" if kind == "constexpr" else n for n, kind in params)
    return f"def {name}({args}):"


def operand_params(plan: Plan) -> list[tuple[str, str]]:
    out = []
    for o in plan.spec.operands:
        out.append((f"s_{o.name}", "float") if o.role is Role.SCALAR else (f"x_{o.name}", "io"))
    return out


def beta_kind(plan: Plan) -> str:
    return "f32" if plan.beta_computed else "io"
