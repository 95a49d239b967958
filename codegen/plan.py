"""The plan: which stages a spec needs, with which terms, at which tile sizes.

It is the single source of truth for the emitters, the launcher, the AOT inspection
and (later) the cost model. Everything in it is compile-time: the spec, the input
dtype, the head sizes K and V, the chunk and tile sizes. Batch, length, head counts,
scale and parameter values are runtime arguments of the kernels.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, fields

from linattn.spec import Correction, Decay, Role, Skip, Spec

__all__ = ["Options", "Plan", "make_plan", "core_spec", "skip_in_core", "DTYPES", "STORE_DTYPE", "MMA_DTYPE", "GATE_FLOOR", "CODEGEN_VERSION"]

#: Bump when the emitted source changes for the same plan (invalidates the disk cache).
CODEGEN_VERSION = 9

#: Input dtypes the kernels take, by short name.
#: (fp64 runs everything in float64 and exists for gradient checks through the interpreter.)
DTYPES = ("bf16", "fp16", "fp32", "fp64")

#: The dtype of the stored intermediates (chunk start states, WY factors, Δ, T, Aqk) and of
#: the matrix-product operands, by input dtype: the one place these choices live. fp16's
#: range (65504) is too small for a state that sums many tokens (it overflowed after ~128
#: tokens at |o| ~ 1e3), so fp16 inputs keep intermediates in fp32 and multiply in tf32
#: (the same 10-bit mantissa as fp16, fp32's range); bf16 has fp32's range already.
STORE_DTYPE = {"bf16": "bf16", "fp16": "fp32", "fp32": "fp32", "fp64": "fp64"}
MMA_DTYPE = {"bf16": "bf16", "fp16": "fp32", "fp32": "fp32", "fp64": "fp64"}

#: A per-token log-decay below this is an exact reset: exp(GATE_FLOOR) is 0 in fp32, so the
#: gates stage clamps g there (a full reset g = -inf then never meets -inf - (-inf)).
GATE_FLOOR = -128.0


def _pow2_at_least(n: int, floor: int = 16) -> int:
    p = floor
    while p < n:
        p *= 2
    return p


@dataclass(frozen=True)
class Options:
    """Tunable, compile-time choices of a compiled op.

    ``chunk_size``: tokens per chunk (C). ``subchunk_size``: the block of the intra-chunk
    matrices and of channel decay's reference points (BC). ``block_v``: the V tile of the
    state passes and the scan, whose state tile [K, block_v] stays in registers (default: V
    rounded up to a power of two, at most 64; 32 where K > 128, and for channel decay's scan
    where K > 64). ``product_block_v``: the V tile of the
    chunk-parallel kernels whose products have C rows (wu, output, dvl, channel decay's dqk
    without the delta rule): the wgmma's N (default: V rounded up, at most 64).
    ``key_block``: the key-channel block every kernel walks K in (default 64).
    ``precision``: how fp32 matrix products run on tensor cores ("ieee" exact, "tf32").
    ``num_warps``: per kernel family; default chosen from the tile sizes.
    ``fused_output``: whether the forward's state pass also writes the output (``scan``:
    chunk start states and Δ never reach memory) instead of a chunk-parallel ``output``
    kernel reading them back. None chooses per call: fused when the sequential pass has at
    least one program per SM (the device is busy either way, and fusion saves the bytes),
    separate when it leaves SMs idle that the output kernel can use; separate also where
    Aqk is not stored (q·kᵀ beside the state would spill). A runtime choice: the generated
    source holds both. On a GPU with a tuned table (:mod:`codegen.tuning`), every option
    the caller does not pass takes the table's value for the spec, dtype and head sizes.
    """

    chunk_size: int = 64
    subchunk_size: int = 16
    block_v: int | None = None
    product_block_v: int | None = None
    key_block: int | None = None
    precision: str = "ieee"
    num_warps: int | None = None
    fused_output: bool | None = None

    def __post_init__(self) -> None:
        C, BC = self.chunk_size, self.subchunk_size
        if not isinstance(C, int) or C < 16 or C & (C - 1):
            raise ValueError(f"chunk_size: expected a power of two >= 16, got {C!r}")
        if not isinstance(BC, int) or BC < 16 or BC & (BC - 1) or BC > C:
            raise ValueError(f"subchunk_size: expected a power of two in [16, chunk_size], got {BC!r}")
        bv = self.block_v
        if bv is not None and (not isinstance(bv, int) or bv < 16 or bv & (bv - 1)):
            raise ValueError(f"block_v: expected a power of two >= 16, got {bv!r}")
        pv = self.product_block_v
        if pv is not None and (not isinstance(pv, int) or pv < 16 or pv & (pv - 1)):
            raise ValueError(f"product_block_v: expected a power of two >= 16, got {pv!r}")
        kb = self.key_block
        if kb is not None and (not isinstance(kb, int) or kb < 16 or kb & (kb - 1)):
            raise ValueError(f"key_block: expected a power of two >= 16, got {kb!r}")
        if self.precision not in ("ieee", "tf32"):
            raise ValueError(f"precision: expected 'ieee' or 'tf32', got {self.precision!r}")
        nw = self.num_warps
        if nw is not None and nw not in (1, 2, 4, 8, 16):
            raise ValueError(f"num_warps: expected 1, 2, 4, 8 or 16, got {nw!r}")
        if self.fused_output not in (None, True, False):
            raise ValueError(f"fused_output: expected True, False or None, got {self.fused_output!r}")


@dataclass(frozen=True)
class Plan:
    """A spec lowered to stages and tiles for one dtype and head sizes."""

    spec: Spec
    dtype: str  # input dtype: "bf16" | "fp16" | "fp32"
    K: int
    V: int
    C: int  # chunk
    BC: int  # sub-chunk
    BK: int  # K padded to a power of two
    KB: int  # key-channel block: kernels walk K in blocks of KB to bound their registers
    KBI: int  # the key block of the intra-chunk kernel (its tiles are [BC, KBI])
    KBB: int  # the key block of the chunk-parallel backward kernels (several [C, KBB] accumulators)
    KBD: int  # the key block of dchunk_bwd: the N of its [C, KBD] products
    RB: int  # row block of the state pass: a chunk is applied RB rows at a time
    BV: int  # V tile of the state passes (state, dstate, the decode step)
    BVS: int  # V tile of the scan (the forward's state pass that writes the output too)
    BVP: int  # V tile of the chunk-parallel products (wu, output, dvl): the width of their wgmma N
    precision: str
    warps_gates: int
    warps_intra: int
    warps_wide: int
    warps_state: int
    warps_dstate: int
    warps_scan: int
    warps_dchunk: int  # dchunk_bwd (scalar or no decay): 8 warps with the delta rule, else one warpgroup

    # ---- what the spec needs
    @property
    def channel(self) -> bool:
        return self.spec.decay is Decay.CHANNEL

    @property
    def scalar(self) -> bool:
        return self.spec.decay is Decay.SCALAR

    @property
    def delta(self) -> bool:
        """A correction in WY form: the delta rule's, or Comba's (the same stages, read along ``p``)."""
        return wy_correction(self.spec)

    @property
    def comba(self) -> bool:
        """Comba: the correction reads the state along ``p`` (Akk's rows, W), writes along ``k``."""
        return self.spec.correction is Correction.COMBA

    @property
    def read_before(self) -> bool:
        """The correction reads the state before the token's decay: its rows (Akk's, W's) sit at
        ``Gx = G - g``, the exclusive cumulative log-decay, which the gates stage stores."""
        return self.spec.read_before_decay and self.spec.has_decay

    @property
    def read(self) -> str:
        """The buffer the correction reads the state along: ``p`` (Comba) or ``k``."""
        return "p" if self.comba else "k"

    @property
    def beta(self) -> bool:
        return self.spec.beta is not None

    @property
    def beta_computed(self) -> bool:
        """β is a parameterization evaluated (once) by the gates stage, not an input."""
        return beta_computed(self.spec)

    @property
    def store(self) -> str:
        """The dtype of stored intermediates (see :data:`STORE_DTYPE`)."""
        return STORE_DTYPE[self.dtype]

    @property
    def mma(self) -> str:
        """The operand dtype of matrix products (see :data:`MMA_DTYPE`)."""
        return MMA_DTYPE[self.dtype]

    @property
    def mma_precision(self) -> str | None:
        """``input_precision`` of fp32 products: tf32 for fp16 inputs, the option for fp32."""
        if self.dtype == "fp16":
            return "tf32"
        return self.precision if self.dtype == "fp32" else None

    @property
    def NS(self) -> int:
        return self.C // self.BC

    @property
    def NKB(self) -> int:
        return self.BK // self.KB

    @property
    def NV(self) -> int:
        return -(-self.V // self.BV)

    @property
    def NVS(self) -> int:
        return -(-self.V // self.BVS)

    @property
    def NVP(self) -> int:
        return -(-self.V // self.BVP)

    @property
    def BVN(self) -> int:
        """The narrow V tile, 32 columns where K > 64 or with the delta rule: what ``dchunk_bwd``
        and ``dqk_bwd`` walk V in beside their [C, KB] accumulators (measured at K = V = 128
        with 64: dchunk took Mamba-2's from 127 registers to 211, one block an SM instead of
        two; dqk with the delta rule spilled; at K = V = 64 the delta rule's dchunk spilled
        136-316 bytes with 64, none on 8 warps with 32), and the decode step's tile (a step of
        a small batch needs its programs: B1 HV32 V128 has 128 of them)."""
        return min(_pow2_at_least(self.V), 64 if self.BK <= 64 and not self.delta else 32)

    @property
    def NVN(self) -> int:
        return -(-self.V // self.BVN)

    @property
    def stages(self) -> tuple[str, ...]:
        """The forward stages, in launch order (docs/algorithms.md, "The forward kernels")."""
        out = []
        if self.spec.has_decay or self.beta_computed:
            out.append("gates")  # G = chunk-local cumsum of g (and β) in fp32
        if self.delta or self.channel:
            out.append("intra")  # Akk → T = (I + Akk)^-1 (delta); Aqk (reference points with channel decay)
        if self.delta:
            out.append("wu")  # W = T (β Kg), U = T (β V): the chunk in WY form
        out += ["state", "output"]
        return tuple(out)

    def forward_stages(self, fused_output: bool) -> tuple[str, ...]:
        """The stages a forward call launches: :attr:`stages`, or with ``fused_output`` the
        state pass and the output as one ``scan``."""
        return (*self.stages[:-2], "scan") if fused_output else self.stages

    @property
    def aqk_stored(self) -> bool:
        """Aqk is computed once per chunk by `intra` and stored, wherever that stage runs:
        channel decay needs its sub-chunk factorization, and the V-tiled kernels after it
        (the scan, the output, the backward's dvl) load it instead of recomputing q·kᵀ per
        V tile (in the scan, a [C, C] product beside the state overflowed the registers)."""
        return "intra" in self.stages

    def key(self) -> str:
        """A stable digest of everything that shapes the generated source."""
        parts = [f"v{CODEGEN_VERSION}", spec_key(self.spec)]
        parts += [f"{f.name}={getattr(self, f.name)!r}" for f in fields(self) if f.name != "spec"]
        return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def spec_key(spec: Spec) -> str:
    """The spec's structure as text (sympy's srepr for terms): equal specs, equal keys."""
    import sympy as sp

    def term(t):
        if t is None:
            return "None"
        return f"{sp.srepr(t.expr)}:" + ",".join(f"{o.name}/{o.role.value}" for o in t.operands)

    return "/".join(
        [
            spec.decay.value,
            spec.correction.value,
            term(spec.gate),
            term(spec.beta),
            str(spec.qk_l2norm),
            spec.skip.value,
            spec.output_gate.value,
            repr(spec.default_scale),
            *(["read_before_decay"] if spec.read_before_decay else []),
        ]
    )


def wy_correction(spec: Spec) -> bool:
    """Whether ``spec``'s correction runs in WY form (the delta rule, Comba; one step per token)."""
    return spec.correction in (Correction.DELTA, Correction.COMBA)


def skip_in_core(spec: Spec) -> bool:
    """Whether the core backward takes ``spec``'s D skip: the kernel that writes dv (the WY
    form's, or the one-pass chunk kernel's) holds dO and v tiles anyway, so dv += D ⊙ dO and
    the per-chunk partial sums of dD = Σ dO ⊙ v cost no extra pass. Channel decay without the
    delta rule writes no dv in a kernel; there the skip stays a layer-side term."""
    return spec.skip is not Skip.NONE and (spec.decay is not Decay.CHANNEL or wy_correction(spec))


def core_spec(spec: Spec) -> Spec:
    """The recurrence of ``spec`` without its layer-side terms: ``g`` and ``β`` given as
    tensors, no output gate. The backward kernels work on it; the terms around it are
    elementwise and differentiated on their own. The q/k L2 norm stays: the kernels read q
    and k as given and normalise rows on load (no normalised copy goes through memory), and
    give the gradients of the normalised q, k. The D skip stays where :func:`skip_in_core`."""
    return Spec(
        decay=spec.decay,
        correction=spec.correction,
        beta=spec.beta is not None,
        qk_l2norm=spec.qk_l2norm,
        skip=spec.skip if skip_in_core(spec) else Skip.NONE,
        default_scale=spec.default_scale,
        read_before_decay=spec.read_before_decay,
        name=f"{spec.name or 'spec'}_core",
    )


def beta_computed(spec: Spec) -> bool:
    """Whether ``spec``'s β is a parameterization the gates stage evaluates (not an input as is)."""
    return spec.beta is not None and not (spec.beta.is_identity and spec.beta.operands[0].role is Role.TOKEN)


def make_plan(spec: Spec, dtype: str, K: int, V: int, options: Options) -> Plan:
    """Lower ``spec`` for inputs of ``dtype`` and head sizes ``K``, ``V``."""
    if spec.correction is Correction.DPLR or spec.householder != 1:
        raise ValueError(f"spec: the generated stages cover the corrections 'none', 'delta' and 'comba' with one step per "
                         f"token; got {spec.correction.value!r} with householder={spec.householder}")
    if spec.read_before_decay and spec.gate is not None and not spec.gate.is_identity:
        raise ValueError(f"spec: with read_before_decay the generated stages take the log-decay g as an input; "
                         f"evaluate the gate term {spec.gate} first")
    if dtype not in DTYPES:
        raise ValueError(f"dtype: expected one of {DTYPES}, got {dtype!r}")
    if not (1 <= K <= 256):
        raise ValueError(f"K: head size must be in [1, 256], got {K}")
    if not (1 <= V <= 256):
        raise ValueError(f"V: head size must be in [1, 256], got {V}")
    BK = _pow2_at_least(K)
    # The state tile [BK, BV] lives in registers through the whole sequence. At K = 128 a
    # [128, 64] tile on one warpgroup (64 registers a thread) takes its state products on
    # wgmma with N = 64, at two programs an SM (B1 T8192 H96 V = 128: 192 programs, 0.73
    # waves). K = 256 keeps 32 (a [256, 64] tile is 128 registers a thread of 4 warps), as
    # does channel decay's scan at K = 128 (with the gated tiles beside, 64 columns spill
    # 52-60 bytes).
    BV = options.block_v or min(_pow2_at_least(V), 64 if BK <= 128 else 32)
    BVS = options.block_v or (min(BV, 32) if spec.decay is Decay.CHANNEL and BK > 64 else BV)
    nw = options.num_warps
    return Plan(
        spec=spec,
        dtype=dtype,
        K=K,
        V=V,
        C=options.chunk_size,
        BC=options.subchunk_size,
        BK=BK,
        KB=min(BK, options.key_block or 64),
        # The intra kernel holds a few [BC, KBI] fp32 tiles beside up to 2·NS [BC, BC] ones
        # (A and T of a block row). Measured at K = V = 128 on sm_90 (`python -m linattn
        # inspect`): 16 keeps the scalar/no-decay solve free of spills, channel decay's
        # pairwise diagonal blocks need 32.
        KBI=min(BK, 32 if spec.decay is Decay.CHANNEL or BK <= 64 else 16),
        KBB=min(BK, 16),
        # dchunk_bwd's [C, KBD] accumulators are its products' N. Without the delta rule only
        # dAqk's weights stay live beside them: 32 columns on one warpgroup, wgmma N = 32-64 (at
        # K = V = 128: 204-246 registers, no spills; 64 columns took 250-255 and spilled 8-12
        # bytes in some launch variants; 16 columns on 8 warps took N = 8-32). The delta rule
        # keeps three [C, C] weights live: 8 columns on 8 warps (16 spilled 60 bytes, 32
        # spilled 224; a [K, C] orientation, M = K on 8 warps and N = 64, spilled 452-1,152).
        KBD=min(BK, 8 if wy_correction(spec) else 32),
        RB=min(options.chunk_size, 32),
        BV=BV,
        BVS=BVS,
        precision=options.precision,
        warps_gates=nw or 4,
        warps_intra=nw or (4 if BK <= 32 or BK <= 64 and spec.decay is Decay.CHANNEL else 8),
        # wu, output, dvl_bwd and channel decay's dqk_bwd on one warpgroup: their products with
        # C = 64 rows are wgmma with N = the tile's width (8 warps split N between two
        # warpgroups: N = 8-32 at K = V = 128 before). Measured on sm_90 at K = V = 128 (built-in
        # specs), no spills: wu 171-205 registers, output 165-252, dvl_bwd 125-148 (N = 64 or
        # 128 throughout), dqk 118-250 (N = 16 for its [C, KBB] accumulators, 32-64 else).
        # dchunk_bwd with the delta rule stays on 8 warps: on 4 it spills (GDN: 36 bytes at 255
        # registers); without it, one warpgroup (see KBD).
        BVP=options.product_block_v or min(_pow2_at_least(V), 64),
        warps_wide=nw or 4,
        # The sequential passes: one program per (sequence, value head, V tile), the whole
        # sequence long, so every program should be resident at once (one wave). B1 T8192 H96
        # K = V = 128: with BV = 64, 192 programs, two of 4 warps an SM (at most 255 registers),
        # the state products on wgmma N = 64; measured, no spills: state_fwd 193-214 registers,
        # dstate_bwd 186-214, the scan 182-184 without channel decay. Channel decay's scan (BVS
        # = 32): 384 programs, four of 2 warps an SM (mma.sync: a warpgroup MMA needs 4 warps),
        # 247-248 registers (the q/k norms from intra: recomputed, 236 on 4 and 8 bytes spilled
        # on 2). At K = 256 the state alone is 64 registers a thread of 4 warps: 4 warps, 8 for
        # the scan with channel decay (254-255 registers; 4 spilled 8-32 bytes).
        warps_state=nw or (4 if BK * BV >= 64 * 64 else 2),
        # At K = 256 with the q/k norm applied on load and scalar decay, 4 warps spill (Qwen3-Next:
        # 36 bytes; 178 registers on 8). Channel decay's takes 254 on 4 (252 on 8).
        warps_dstate=nw or (8 if BK > 128 and spec.qk_l2norm and spec.decay is not Decay.CHANNEL else 4),
        warps_scan=nw or ((8 if BK > 128 else 2) if spec.decay is Decay.CHANNEL else 4),
        warps_dchunk=nw or (8 if wy_correction(spec) else 4),
    )
