"""The manifest of a plan: every buffer its kernels touch, and each kernel's parameters and grid.

One table (:func:`buffers`) says, for a plan, the dtype and shape of every tensor a
generated kernel may take; every emitter declares its kernel's parameters by name and
access through :func:`declare`, which reads the table. What runs a plan reads these
records and nothing else: the launcher allocates the buffers a kernel writes and resolves
its grid, the custom op's fake implementation takes the shapes of the saved buffers, the
ahead-of-time inspection and the cost model count bytes, the launch counter names kernels.

Shapes and grids are tuples of dimensions. A dimension is an ``int``, a name (a runtime
size of :data:`SIZES`, or a compile-time one of :func:`constants`: K, V, C, tile counts),
``"N+1"`` (the bounds of N sequences), ``"A*B"`` (a grid dimension enumerating A-major,
B-minor: program ``a * B + b``), or ``(name, n)``: that size divided by n, rounded up.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from linattn.spec import OutputGate, Role, Skip

from .plan import Plan

__all__ = ["Param", "Kernel", "SIZES", "constants", "buffers", "declare", "out", "inout", "resolve", "dims_text", "partial_name"]

Dim = int | str | tuple[str, int]

#: The runtime sizes shapes and grids are written in (each is also a kernel argument of that name):
#: packed tokens, sequences, chunks of all sequences, q/k heads, value heads, rows of a state pool.
SIZES = ("TT", "N", "NCH", "H", "HV", "NSLOT")

#: Scalar kernel arguments by kind (operand scalars ``s_<name>`` are floats).
SCALARS = {"TT": "int", "N": "int", "NCH": "int", "H": "int", "HV": "int", "NSLOT": "int", "GROUP": "int", "scale": "float"}
#: Compile-time flags: each enables an optional buffer (None when off).
FLAGS = {"HAS_H0": "h0", "STORE_HT": "ht", "HAS_DHT": "dht", "STORE_DH0": "dh0", "HAS_IDX": "state_idx"}
#: ``MMA``: the operand type of tensor-core products, chosen at launch by the device (see ``runtime.mma_dtype``).
CONSTEXPRS = ("MMA", *FLAGS)


@dataclass(frozen=True)
class Param:
    """One kernel parameter.

    ``kind``: ``tensor``, ``int``, ``float`` or ``constexpr``. Tensors have a ``dtype``
    (``bf16``, ``fp16``, ``fp32``, ``fp64``, ``int32``, ``int64``, or ``index``: int32 or
    int64 as the caller gives it), a ``shape`` and an ``access``: ``r``, ``w`` (the kernel
    writes every element it owns and reads none) or ``rw``. ``flag``: the constexpr
    without which an optional tensor is None.
    """

    name: str
    kind: str
    dtype: str | None = None
    shape: tuple[Dim, ...] | None = None
    access: str = "r"
    flag: str | None = None

    @property
    def tensor(self) -> bool:
        return self.kind == "tensor"

    @property
    def written(self) -> bool:
        return "w" in self.access


@dataclass(frozen=True)
class Kernel:
    """One emitted kernel: its stage name, parameters, launch grid and source.

    ``symbol``: the function's name in the generated module (the stage prefixed by the
    spec's name, so profiler traces tell specs apart); set when the module is assembled.
    """

    name: str
    params: tuple[Param, ...]
    grid: tuple[Dim, ...]
    source: str
    num_warps: int
    #: software-pipelining depth; None: Triton's default. 1 where prefetching the next
    #: iteration's tiles would cost more registers than its latency hiding is worth
    num_stages: int | None = None
    symbol: str = ""

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(f"{self.name} has no parameter {name!r}")


def constants(plan: Plan) -> dict[str, int]:
    """The compile-time sizes shapes and grids are written in: head sizes, chunk, tile counts."""
    return {"K": plan.K, "V": plan.V, "C": plan.C, "NKB": plan.NKB, "NV": plan.NV, "NVS": plan.NVS, "NVP": plan.NVP, "NVN": plan.NVN}


def partial_name(operand: str) -> str:
    """The buffer of per-chunk partial sums of a per-head operand's gradient."""
    return f"p_d{operand}"


def buffers(plan: Plan) -> dict[str, tuple[str, tuple[Dim, ...]]]:
    """``name -> (dtype, shape)`` of every tensor the plan's kernels may take: the one place
    the dtypes of intermediates (:data:`~codegen.plan.STORE_DTYPE`) meet the buffers.

    A gradient buffer whose readers use it only as a product operand (``dh``, ``dW``, and
    ``dvn`` with the delta rule) is stored in the product operand dtype (``MMA_DTYPE``): the product rounds it to
    that dtype anyway (bf16 inputs), so nothing changes but its bytes."""
    io, st, mma = plan.dtype, plan.store, plan.mma
    acc = "fp64" if plan.dtype == "fp64" else "fp32"  # accumulation and state dtype
    K, V, C, spec = "K", "V", "C", plan.spec
    g = ("TT", "HV", K) if plan.channel else ("TT", "HV")
    t: dict[str, tuple[str, tuple[Dim, ...]]] = {
        # inputs, outputs, states
        "q": (io, ("TT", "H", K)), "k": (io, ("TT", "H", K)), "v": (io, ("TT", "HV", V)),
        "p": (io, ("TT", "H", K)),  # Comba's read key
        "o": (io, ("TT", "HV", V)), "z": (io, ("TT", "HV", V)),
        "h0": (acc, ("N", "HV", K, V)), "ht": (acc, ("N", "HV", K, V)),
        "state": (acc, ("NSLOT", "HV", K, V)), "state_idx": ("index", ("N",)), "pool_err": ("int32", (1,)),
        # the chunk table
        "cu_seqlens": ("index", ("N+1",)), "chunk_t0": ("int64", ("NCH",)), "chunk_len": ("int32", ("NCH",)),
        "chunk_off": ("int32", ("N+1",)), "cu_ok": ("int32", (1,)),
        # forward intermediates
        "G": (acc, g), "beta": (acc if plan.beta_computed else io, ("TT", "HV")),
        "Gx": (acc, g),  # G - g: what a read before the decay sees
        "Tm": (st, ("TT", "HV", C)), "Aqk": (st, ("TT", "HV", C)),
        "W": (st, ("TT", "HV", K)), "U": (st, ("TT", "HV", V)), "vnew": (st, ("TT", "HV", V)),
        "rq": (acc, ("TT", "HV")), "rk": (acc, ("TT", "HV")),  # 1/|row| of q and k (the L2 norm), from intra for the scan
        "hs": (st, ("NCH", "HV", K, V)),
        "dtile": (acc, ("N", "HV", C, V)),  # the scan's Δ of one chunk per program: rewritten, L2-resident
        # backward
        "dO": (io, ("TT", "HV", V)), "dht": (acc, ("N", "HV", K, V)), "dh0": (acc, ("N", "HV", K, V)),
        "dh": (mma, ("NCH", "HV", K, V)),
        "dvl": (mma if plan.delta else acc, ("TT", "HV", V)), "dvn": (mma if plan.delta else acc, ("TT", "HV", V)), "dv": (io, ("TT", "HV", V)),  # v's gradient, written once (delta rule), in its dtype
        "dq": (acc, ("TT", "HV", K)), "dk": (acc, ("TT", "HV", K)), "dp": (acc, ("TT", "HV", K)),
        "dkq": (acc, ("TT", "HV", K)),  # dk with dAqk's share, between channel decay's two products kernels
        # dq, dk complete (the last kernel's): the op's gradients as they are where each q/k head
        # serves one value head and no norm follows; the launcher gives fp32 ones otherwise
        "dqo": (io, ("TT", "HV", K)), "dko": (io, ("TT", "HV", K)), "dpo": (io, ("TT", "HV", K)),
        "dW": (mma, ("TT", "HV", K)),
        "dAqk": (acc, ("TT", "HV", C)), "dAkk": (acc, ("TT", "HV", C)),
        "dbeta": (acc, ("TT", "HV")), "dG": (acc, g), "dg": (acc, g), "dGx": (acc, g),
        "dq_out": (io, ("TT", "H", K)), "dk_out": (io, ("TT", "H", K)),  # the op's gradients, in the inputs' dtype
        "dp_out": (io, ("TT", "H", K)),
    }  # fmt: skip
    if spec.skip is not Skip.NONE:
        t["D"] = (io, ("HV", V) if spec.skip is Skip.CHANNEL else ("HV",))
        t[partial_name("D")] = (acc, ("NCH", "HV", V) if spec.skip is Skip.CHANNEL else ("NCH", "HV"))
    if spec.output_gate is OutputGate.NONE:
        del t["z"]
    per_role = {Role.TOKEN: ("TT", "HV"), Role.TOKEN_CHANNEL: ("TT", "HV", K), Role.HEAD: ("HV",), Role.HEAD_CHANNEL: ("HV", K)}
    for o in spec.operands:
        if o.role is Role.SCALAR:
            continue
        t[f"x_{o.name}"] = (io, per_role[o.role])  # nominal: operands are passed in the dtype given
        if o.role in (Role.HEAD, Role.HEAD_CHANNEL):
            t[partial_name(o.name)] = (acc, ("NCH", *per_role[o.role]))
        else:
            t[f"d_{o.name}"] = (acc, per_role[o.role])
    return t


def out(name: str) -> tuple[str, str]:
    """A parameter the kernel writes (and does not read)."""
    return (name, "w")


def inout(name: str) -> tuple[str, str]:
    """A parameter the kernel reads and writes."""
    return (name, "rw")


def declare(plan: Plan, entries: list[str | tuple[str, str]]) -> tuple[Param, ...]:
    """The parameters of a kernel, in signature order: each entry a name (read, or a scalar)
    or ``out(name)`` / ``inout(name)``; kinds, dtypes and shapes come from the tables."""
    table = buffers(plan)
    flags = {buf: flag for flag, buf in FLAGS.items()}
    params = []
    for entry in entries:
        name, access = (entry, "r") if isinstance(entry, str) else entry
        if name in table:
            dtype, shape = table[name]
            params.append(Param(name, "tensor", dtype, shape, access, flags.get(name)))
        elif name in SCALARS or name.startswith("s_"):
            params.append(Param(name, SCALARS.get(name, "float")))
        elif name in CONSTEXPRS:
            params.append(Param(name, "constexpr"))
        else:
            raise KeyError(f"{name!r} is in no table of codegen.manifest")
    return tuple(params)


def resolve(dims: tuple[Dim, ...], sizes: Mapping[str, int]) -> tuple[int, ...]:
    """Dimensions as integers, for the runtime ``sizes`` (see :data:`SIZES`)."""
    out_ = []
    for d in dims:
        if isinstance(d, int):
            out_.append(d)
        elif isinstance(d, str) and "*" in d:
            out_.append(math.prod(int(sizes[n]) for n in d.split("*")))
        elif isinstance(d, str):
            out_.append(int(sizes[d[:-2]]) + 1 if d.endswith("+1") else int(sizes[d]))
        else:
            name, n = d
            out_.append(-(-int(sizes[name]) // n))
    return tuple(out_)


def dims_text(dims: tuple[Dim, ...]) -> str:
    """``NCH×HV×2``: dimensions as people read them (``N+1``, ``⌈TT/64⌉``)."""
    def one(d: Dim) -> str:
        if isinstance(d, tuple):
            return f"⌈{d[0]}/{d[1]}⌉"
        return str(d)

    return "×".join(one(d) for d in dims)


def numel(dims: tuple[Dim, ...], sizes: Mapping[str, int]) -> int:
    return math.prod(resolve(dims, sizes))
