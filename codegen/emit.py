"""The toolkit every emitter uses: the emitted-kernel record, and the pieces of kernel text
shared by the forward, backward, decode-step, epilogue and table emitters (products,
prologues, key blocks, loads and stores by buffer layout, signatures).
"""
from __future__ import annotations

from contextlib import contextmanager

from linattn.spec import QK_L2NORM_EPS, Role

from .manifest import Kernel, Param, buffers
from .plan import Plan
from .source import Source

__all__ = ["Kernel", "Emitter", "L2NORM_EPS", "signature", "operand_params", "plus"]


L2NORM_EPS = repr(QK_L2NORM_EPS)


class Emitter:
    """Shared pieces of the forward kernels for one plan."""

    def __init__(self, plan: Plan, kb: int | None = None) -> None:
        self.p = plan
        # products round their operands to the plan's product dtype (see codegen.plan.MMA_DTYPE)
        self.dt = {"bf16": "tl.bfloat16", "fp16": "tl.float16", "fp32": "tl.float32", "fp64": "tl.float64"}[plan.mma]
        self.prec = f', input_precision="{plan.mma_precision}"' if plan.mma_precision else ""
        self.kb = kb or plan.KB  # this kernel's key block
        self.table = buffers(plan)  # every buffer's dtype and shape (the layouts of loads and stores)
        self.blocks = range(plan.BK // self.kb)

    # ------------------------------------------------------------------ products
    def dot(self, a: str, b: str) -> str:
        """A tensor-core product with operands rounded to the input dtype, fp32 accumulation.

        ``MMA`` is the operand type the product runs in: the input dtype when compiled;
        fp32 in Triton's interpreter, whose bf16 products are wrong (the rounding to the
        input dtype is kept, so the numerics are the same).
        """
        return f"tl.dot(({a}).to({self.dt}).to(MMA), ({b}).to({self.dt}).to(MMA){self.prec})"

    def split(self, s: Source, var: str, value: str) -> None:
        """Bind fp32 weights ``value`` for :meth:`dot_split`: with bf16 products as a high and a
        low bf16 part (``{var}_h``, ``{var}_l``: about 16 mantissa bits together), else as is."""
        if self.p.mma == "bf16":
            s(f"{var}_h = ({value}).to({self.dt})", f"{var}_l = (({value}) - {var}_h.to(tl.float32)).to({self.dt})")
        elif var != value:
            s(f"{var} = {value}")

    def dot_split(self, var: str, b: str, trans: bool = False) -> str:
        """``var @ b`` (``var``ᵀ with ``trans``) for weights bound by :meth:`split`: the weights
        keep about 16 mantissa bits (bf16 high + low parts; 3xTF32 where products run in tf32),
        ``b`` is rounded as by :meth:`dot` (exact for operands that are inputs in the product
        dtype). For sums whose rows and columns cancel (a gate's gradient), where one rounding
        of the weights to the product dtype is not small against the result."""
        t = (lambda x: f"tl.trans({x})") if trans else (lambda x: x)
        if self.p.mma == "bf16":
            return f"({self.dot(t(f'{var}_h'), b)} + {self.dot(t(f'{var}_l'), b)})"
        if self.p.mma_precision == "tf32":
            return f"tl.dot(({t(var)}).to(MMA), ({b}).to(MMA), input_precision=\"tf32x3\")"
        return self.dot(t(var), b)

    @staticmethod
    def dot32(a: str, b: str) -> str:
        """An exact fp32 product (the triangular solve)."""
        return f'tl.dot({a}, {b}, input_precision="ieee")'

    def causal_dot(
        self, s: Source, var: str, lower: str, rows: str, row: str = "r", exact: bool = False, out_row: str | None = None
    ) -> None:
        """``var = lower @ rows`` where ``lower`` mixes tokens causally (zero above the diagonal,
        by select) and ``rows`` holds one token per row (``row``: the rows' index vector;
        ``out_row``: the token index of ``lower``'s rows where they are not the same tokens).

        A non-finite value in ``rows`` at token t would reach every earlier row through
        ``0 · inf`` or ``0 · NaN``. So the rows from t on enter the product as 0, and the
        product's rows from t on come back as NaN: the recurrence's outputs there depend on
        the bad value, the earlier ones never. (A [rows, rows] select finds "a bad row at or
        before"; a scan over rows costs the solve its registers.)
        """
        s(f"x_rows = {rows}")
        s("x_bad = tl.max(tl.where(tl.abs(x_rows) < float('inf'), 0, 1), 1)  # rows holding inf or NaN")
        if out_row:  # the output rows' own "a bad row at or before"
            s(f"x_out = tl.max(tl.where({row}[None, :] <= {out_row}[:, None], x_bad[None, :], 0), 1)")
        s(f"x_bad = tl.max(tl.where({row}[None, :] <= {row}[:, None], x_bad[None, :], 0), 1)  # one at or before")
        clean = "tl.where(x_bad[:, None] == 0, x_rows, 0.0)"
        s(f"{var} = {self.dot32(lower, clean) if exact else self.dot(lower, clean)}")
        s(f"{var} = tl.where({'x_out' if out_row else 'x_bad'}[:, None] > 0, float('nan'), {var})")

    # ------------------------------------------------------------------ prologues
    def chunk_prologue(self, s: Source, v_tile: str | None = None) -> None:
        """A chunk's program (``v_tile``: and V tile, of that width constant: "BV" or "BVP")."""
        if v_tile:
            self.v_tiled_ids(s, "c", "NV" if v_tile == "BV" else "NVP")
        else:
            s("i_c = tl.program_id(0)", "i_h = tl.program_id(1)")
        s("i_hk = i_h // GROUP  # the q/k head serving this value head")
        s("t0 = tl.load(chunk_t0 + i_c)  # first token of the chunk (int64)")
        s("L = tl.load(chunk_len + i_c)  # tokens in the chunk; 0 for spare programs")
        s("r = tl.arange(0, C)", "row_ok = r < L")
        self.key_blocks(s)
        if v_tile:
            s(f"cv = i_v * {v_tile} + tl.arange(0, {v_tile})", "cv_ok = cv < V")

    def bases(self, s: Source, params: tuple[Param, ...]) -> None:
        """64-bit base pointers ``p_<name>`` of the chunk's first token, for every per-token
        tensor among ``params`` (its row: a q/k head or a value head, of the manifest's
        width). Offsets inside a chunk stay 32-bit (per-element 64-bit index tiles would
        double the registers of every load)."""
        for p in params:
            if not (p.tensor and p.shape[0] == "TT"):
                continue
            heads, head = ("H", "i_hk") if p.shape[1] == "H" else ("HV", "i_h")
            if len(p.shape) == 2:
                s(f"p_{p.name} = {p.name} + t0 * {heads} + {head}")
            else:
                s(f"p_{p.name} = {p.name} + (t0 * {heads} + {head}) * {p.shape[2]}")

    def sequence_prologue(self, s: Source, bv: str = "BV") -> None:
        """A (sequence, value head, V tile) program of a sequential pass: its bounds and state
        tiles' offsets (``bv``: the V tile's width constant, "BV", or the scan's "BVS")."""
        self.v_tiled_ids(s, "n", "N" + bv[1:])
        s("i_hk = i_h // GROUP")
        self.sequence_bounds(s)
        s("first = tl.load(chunk_off + i_n)  # global index of the sequence's first chunk")
        s("NT = tl.load(chunk_off + i_n + 1) - first  # its chunks (the table never exceeds the grid)")
        s("rb = tl.arange(0, RB)")
        self.key_blocks(s)
        s(f"cv = i_v * {bv} + tl.arange(0, {bv})", "cv_ok = cv < V")
        for b in self.blocks:
            s(f"s_mask{b} = ck_ok{b}[:, None] & cv_ok[None, :]", f"s_off{b} = ck{b}[:, None] * V + cv[None, :]")

    @staticmethod
    def v_tiled_ids(s: Source, outer: str, nv: str = "NV") -> None:
        """Program ids of a V-tiled kernel on grid ``("<OUTER>*<nv>", "HV")``: the V tiles of one
        chunk or sequence are adjacent in launch order, so what they all read (q, k, G, W)
        comes from L2 after the first, and the outer index keeps the 2^31 range of axis 0."""
        s(f"i_{outer}v = tl.program_id(0)", f"i_{outer} = i_{outer}v // {nv}", f"i_v = i_{outer}v % {nv}")
        s("i_h = tl.program_id(1)")

    @staticmethod
    def sequence_bounds(s: Source) -> None:
        """Tokens ``[bos, eos)`` of sequence ``i_n``, clamped into ``[0, TT)``: a bad ``cu_seqlens``
        on the GPU (reported asynchronously) never sends a program outside the tensors."""
        s("bos = tl.minimum(tl.maximum(tl.load(cu_seqlens + i_n).to(tl.int64), 0), TT)")
        s("eos = tl.minimum(tl.maximum(tl.load(cu_seqlens + i_n + 1).to(tl.int64), bos), TT)")

    def state_tiles(self, s: Source, var: str, flag: str, ptr: str, bv: str = "BV") -> None:
        """The key blocks ``{var}b`` of a [K, bv] state tile: loaded from ``ptr`` if ``flag``, else zeros."""
        s(f"if {flag}:")
        for b in self.blocks:
            s(
                f"    {var}{b} = tl.load({ptr} + (i_n * HV + i_h) * K * V + s_off{b}, "
                f"mask=s_mask{b}, other=0.0).to(tl.float32)"
            )
        s("else:")
        for b in self.blocks:
            s(f"    {var}{b} = tl.zeros([{self.kb}, {bv}], dtype=tl.float32)")

    def decay_state(self, s: Source, var: str) -> None:
        """The key blocks ``{var}b`` of a state tile times the chunk's decay ``exp(G_C)``."""
        for b in self.blocks:
            if self.p.channel:
                s(f"{var}{b} = {var}{b} * tl.exp(b_Glast{b})[:, None]")
            elif self.p.scalar:
                s(f"{var}{b} = {var}{b} * tl.exp(b_Glast)")

    def key_blocks(self, s: Source) -> None:
        for b in self.blocks:
            s(f"ck{b} = {plus(b * self.kb, f'tl.arange(0, {self.kb})')}", f"ck_ok{b} = ck{b} < K")

    @contextmanager
    def key_loop(self, s: Source):
        """The key blocks as a runtime loop (bounds the live tiles where unrolled blocks would
        keep several alive); yields the blocks' suffix ``x`` (``ckx``, ``ck_okx``, channel
        decay's ``b_Glastx``). The unrolled walk is ``for b in self.blocks`` after
        :meth:`key_blocks`, with suffixes 0, 1, ...; loads and stores take either suffix."""
        with s.block(f"for kb in range({len(self.blocks)}):  # key blocks"):
            s(f"ckx = kb * {self.kb} + tl.arange(0, {self.kb})", "ck_okx = ckx < K")
            if self.p.channel:
                self._glast(s, "x")
            yield "x"

    # ------------------------------------------------------------------ loads and stores by layout
    def _tile(self, name: str, rows: str, ok: str, b) -> tuple[str, str]:
        """``(offsets, mask)`` of rows ``rows`` of a per-token buffer, by its manifest shape:
        one value per row, a key block ``b`` of K, the V tile, or the chunk's C columns."""
        shape = self.table[name][1]
        heads = shape[1]
        if len(shape) == 2:
            return f"p_{name} + {rows} * {heads}", ok
        width = shape[2]
        cols, cols_ok = {"K": (f"ck{b}", f"ck_ok{b}"), "V": ("cv", "cv_ok")}[width]
        return f"p_{name} + {rows}[:, None] * ({heads} * {width}) + {cols}[None, :]", f"{ok}[:, None] & {cols_ok}[None, :]"

    def load(self, s: Source, var: str, name: str, rows: str, ok: str, b=None, raw: bool = False) -> None:
        """``var`` = rows ``rows`` (valid where ``ok``) of buffer ``name`` in fp32, zeros elsewhere.
        Its layout comes from the manifest: q/k rows of a q/k head, the V tile of a value
        head's row, key block ``b`` of a value head's row (unnormalised: normalisation is a
        row scale). ``raw``: in the buffer's dtype (a product operand, no fp32 copy to hold)."""
        offsets, mask = self._tile(name, rows, ok, b)
        s(f"{var} = tl.load({offsets}, mask={mask}, other=0.0){'' if raw else '.to(tl.float32)'}")

    def store(self, s: Source, name: str, value: str, rows: str, ok: str, b=None) -> None:
        """Rows ``rows`` (where ``ok``) of buffer ``name`` = ``value``, in the buffer's dtype."""
        offsets, mask = self._tile(name, rows, ok, b)
        s(f"tl.store({offsets}, ({value}).to({name}.dtype.element_ty), mask={mask})")

    def load_qk_row(self, s: Source, var: str, ptr: str, row: str, ok: str, b: int) -> None:
        s(
            f"{var} = tl.load(p_{ptr} + {row} * (H * K) + ck{b}, "
            f"mask=ck{b} < tl.where({ok}, K, 0), other=0.0).to(tl.float32)"
        )

    def rnorm(self, s: Source, var: str, ptr: str, rows: str, ok: str) -> None:
        """``1 / |row|`` of q or k (the in-kernel L2 normalisation), over all key blocks."""
        s(f"{var} = tl.zeros_like({rows}).to(tl.float32)")
        for b in self.blocks:
            self.load(s, f"{var}_x", ptr, rows, ok, b)
            s(f"{var} += tl.sum({var}_x * {var}_x, 1)")
        s(f"{var} = tl.rsqrt({var} + {L2NORM_EPS})")

    @staticmethod
    def _glast(s: Source, b) -> None:
        s(f"b_Glast{b} = tl.load(p_G + (L - 1) * (HV * K) + ck{b}, mask=ck{b} < tl.where(L > 0, K, 0), other=0.0)")

    def load_glast(self, s: Source) -> None:
        """``G`` at the chunk's last token: the decay of the whole chunk, and the fill of padding rows."""
        if self.p.channel:
            for b in self.blocks:
                self._glast(s, b)
        else:
            s("b_Glast = tl.load(p_G + (L - 1) * HV, mask=L > 0, other=0.0)")

    def load_G(self, s: Source, var: str, rows: str, ok: str, b: int = 0, buf: str = "G") -> None:
        """Rows of ``G`` (or ``buf``: ``Gx``, what a read before the decay sees; key block ``b``
        if channel); padding rows repeat the last valid row of G, so every exp factor stays <= 1."""
        if self.p.channel:
            s(
                f"{var} = tl.load(p_{buf} + {rows}[:, None] * (HV * K) + ck{b}[None, :], "
                f"mask={ok}[:, None] & ck_ok{b}[None, :], other=0.0)"
            )
            s(f"{var} = tl.where({ok}[:, None], {var}, b_Glast{b}[None, :])")
        else:
            s(f"{var} = tl.load(p_{buf} + {rows} * HV, mask={ok}, other=0.0)")
            s(f"{var} = tl.where({ok}, {var}, b_Glast)")

    def load_G_row(self, s: Source, var: str, row: str, ok: str, b: int, buf: str = "G") -> None:
        s(f"{var} = tl.load(p_{buf} + {row} * (HV * K) + ck{b}, mask=ck{b} < tl.where({ok}, K, 0), other=0.0)")
        s(f"{var} = tl.where({ok}, {var}, b_Glast{b})")


def plus(n: int, expr: str) -> str:
    """``n + expr`` as source, or ``expr`` alone where the offset is 0."""
    return f"{n} + {expr}" if n else expr


def signature(name: str, params: tuple[Param, ...]) -> str:
    args = ", ".join(f"{p.name}: tl.constexpr" if p.kind == "constexpr" else p.name for p in params)
    return f"def {name}({args}):"


def operand_params(plan: Plan) -> list[str]:
    """The spec's operands as kernel parameters: ``s_<name>`` scalars, ``x_<name>`` tensors."""
    return [f"s_{o.name}" if o.role is Role.SCALAR else f"x_{o.name}" for o in plan.spec.operands]
