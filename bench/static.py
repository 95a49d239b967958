"""The static report: what each kernel of a call would cost on an H100, judged without a GPU.

For an op at a shape, the launches a real call makes are captured on meta tensors (ours
through :func:`linattn.inspection.captured_launches`; the peer's when it is installed: fla's
Triton path through :func:`bench.peers.fla_launches`, mamba_ssm's SSD kernels through
:func:`bench.peers.mamba_launches`), each is compiled for sm_90 with its
launch's specialization, and per kernel the report gives CTAs, warps, stages, registers,
spills, shared memory, the tensor-core and TMA instructions of its SASS, occupancy and
waves on 132 SMs, and its bytes: unique (each tensor once) and, for ours, the likely HBM
traffic with the re-reads its grid makes (:func:`codegen.cost.hbm_bytes`). Torch ops
outside the kernels are counted with their bytes.

    python -m bench.static                       # the registry shapes -> bench/results/static-sm90.md
    python -m bench.static --op gdn --shape s1   # one op, one shape

Nothing here changes the library: the fake H100 lives in the capture of the peers' launches
(``bench.peers``) and ours needs none (meta tensors and the launcher's capture mode).
"""
from __future__ import annotations

import argparse
import collections
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from linattn import specs
from linattn.codegen.aot import KernelReport, compile_launch
from linattn.inspection import launch_bytes

RESULTS = Path(__file__).parent / "results"

#: H100 SXM: what occupancy and waves are computed against
SMS, REGS_PER_SM, SMEM_PER_SM, MAX_WARPS, MAX_BLOCKS = 132, 65536, 228 * 1024, 64, 32

#: fla's registry shapes (benchmarks/ops/registry.py): B, T, H, K = V
SHAPES = {"s1": {"B": 1, "T": 8192, "H": 96, "K": 128}, "s2": {"B": 8, "T": 2048, "H": 32, "K": 256}}

#: our spec and the peer's op for each compared op: fla's (an op of :func:`bench.peers.fla_launches`)
#: or mamba_ssm's (``mamba_chunk_scan_combined``)
OPS = {
    "gdn": ("GDN core", specs.GDN, ("fla", "gdn")),
    "gdn_fused": ("Qwen3-Next GDN (gate, β, l2norm fused)", specs.QWEN3_NEXT_GDN, ("fla", "gdn_fused")),
    "kda": ("KDA core", specs.KDA, ("fla", "kda")),
    "kda_fused": ("Kimi KDA (fused)", specs.KIMI_KDA, ("fla", "kda_fused")),
    "mamba2": ("Mamba-2 (Nemotron-H)", specs.NEMOTRON_MAMBA2, ("mamba_ssm", "mamba2")),
    "delta_product": ("Gated DeltaProduct (2 steps per token)", specs.DELTA_PRODUCT, ("fla", "delta_product")),
    "comba": ("Comba (scalar decay, read key p)", specs.COMBA, ("fla", "comba")),
    "dplr": ("DPLR (channel decay, a and b per token)", specs.DPLR, ("fla", "dplr")),
}

_FREE = frozenset({
    "view", "_unsafe_view", "empty", "empty_strided", "reshape", "detach", "t", "transpose", "expand", "as_strided",
    "slice", "select", "unsqueeze", "squeeze", "alias", "permute", "lift_fresh", "split", "unbind", "_reshape_alias",
    "new_empty", "new_empty_strided", "empty_like",
})


@dataclass
class Row:
    """One launch: its kernel's compiled resources, grid and bytes."""

    name: str
    ctas: int
    report: KernelReport
    num_stages: int | None
    read: int  # unique bytes
    written: int
    hbm_read: int | None = None  # with the grid's re-reads that miss L2 (ours only)

    @property
    def blocks_per_sm(self) -> int:
        r = self.report
        regs = math.ceil(max(r.registers, 1) / 8) * 8 * 32 * r.num_warps  # allocated per warp in units of 256
        by_regs = REGS_PER_SM // regs
        by_smem = SMEM_PER_SM // (r.shared + 1024) if r.shared else MAX_BLOCKS
        return max(0, min(by_regs, by_smem, MAX_WARPS // r.num_warps, MAX_BLOCKS))

    @property
    def waves(self) -> float:
        per_wave = self.blocks_per_sm * SMS
        return self.ctas / per_wave if per_wave else math.inf


@dataclass
class Side:
    """One library's launches for one call, and its torch ops outside them."""

    rows: list[Row] = field(default_factory=list)
    torch_ops: collections.Counter = field(default_factory=collections.Counter)
    #: bytes each torch op (by name) touches, inputs and outputs
    op_bytes: collections.Counter = field(default_factory=collections.Counter)

    @property
    def torch_bytes(self) -> int:
        return sum(self.op_bytes.values())

    @property
    def launches(self) -> int:
        return len(self.rows) + sum(self.torch_ops.values())

    @property
    def unique(self) -> int:
        return sum(r.read + r.written for r in self.rows) + self.torch_bytes

    @property
    def hbm(self) -> int:
        return sum((r.hbm_read if r.hbm_read is not None else r.read) + r.written for r in self.rows) + self.torch_bytes


class _TorchOps(TorchDispatchMode):
    """Counts the torch ops that compute (and the bytes they touch) outside the generated kernels."""

    def __init__(self, side: Side) -> None:
        super().__init__()
        self.side = side

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.__name__.split(".")[0]
        if name not in _FREE:
            self.side.torch_ops[name] += 1
            tensors = [t for t in torch.utils._pytree.tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)]
            self.side.op_bytes[name] += sum(t.numel() * t.element_size() for t in tensors)
        return out


_COMPILED: dict = {}


def _compile(fn, args: dict, num_warps: int, num_stages: int | None, stage: str = "") -> KernelReport:
    from linattn.codegen.aot import specialize

    signature, constexprs, attrs = specialize(args, fn if hasattr(fn, "params") else None)
    key = (getattr(fn, "__name__", None) or fn.fn.__name__, str(signature), str(constexprs), str(attrs), num_warps, num_stages)
    if key not in _COMPILED:
        _COMPILED[key] = compile_launch(fn, args, num_warps, num_stages, 90, stage)
    return _COMPILED[key]


def ours(spec, *, B: int, T: int, H: int, K: int, V: int, backward: bool, dtype: str = "bf16") -> Side:
    """Our launches for one call (fixed-length batch, as fla's registry runs)."""
    from linattn.inspection import captured_launches

    side = Side()
    args = dict(B=B, T=T, H=H, HV=H, packed=0, step=False)
    captured_launches(spec, dtype, K, V, **args)  # steady state: an equal-length batch's chunk table is cached
    with _TorchOps(side):
        launches = captured_launches(spec, dtype, K, V, backward=backward, **args)
    if spec.householder > 1:  # DeltaProduct's rows interleaved in torch before the core's kernels
        _interleave_side(spec, side, B, T, H, K, backward, dtype)
    if spec.correction.value == "dplr":  # DPLR's two rows per token, likewise
        _dplr_side(spec, side, B, T, H, K, V, backward, dtype)
    for launch in launches:
        report = _compile(launch.fn, launch.args, launch.num_warps, launch.num_stages, launch.kernel.name)
        row = Row(report.name, math.prod(launch.grid), report, launch.num_stages, 0, 0)
        row.read, row.written = launch_bytes(launch.kernel, launch.sizes, launch.args)
        row.hbm_read = launch_bytes(launch.kernel, launch.sizes, launch.args, max(row.blocks_per_sm, 1) * SMS)[0]
        side.rows.append(row)
    return side


def _interleave_side(spec, side: Side, B: int, T: int, H: int, K: int, backward: bool, dtype: str) -> None:
    """The torch ops :mod:`linattn.steps` runs around the core: the query and the gate spread
    over the rows (forward), or the rows' gradients gathered back (backward)."""
    from linattn.steps import interleave

    n = spec.householder
    dt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    q, g = torch.empty(B, T, H, K, dtype=dt, device="meta"), torch.empty(B, T, H, dtype=torch.float32, device="meta")
    with _TorchOps(side):
        if not backward:
            interleave(q, n, n - 1)
            interleave(g, n, 0)
            torch.empty(B, T * n, H, K, dtype=dt, device="meta").unflatten(1, (T, n))[:, :, n - 1].contiguous()  # o
        else:  # autograd's: dO spread over the rows, the rows' dq and dg gathered back
            interleave(q, n, n - 1)
            dq, dg = torch.empty(B, T * n, H, K, dtype=dt, device="meta"), torch.empty(B, T * n, H, device="meta")
            dq.unflatten(1, (T, n))[:, :, n - 1].contiguous()
            dg.unflatten(1, (T, n))[:, :, 0].contiguous()


def _dplr_side(spec, side: Side, B: int, T: int, H: int, K: int, V: int, backward: bool, dtype: str) -> None:
    """The torch ops :class:`linattn.steps.DplrOp` runs around its core: q, the write keys (-b, k),
    the read keys (a), v and the gate spread over two rows a token (forward), or the rows'
    gradients gathered back (backward)."""
    from linattn.steps import interleave

    dt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]

    def t(*shape, d=dt):
        return torch.empty(*shape, dtype=d, device="meta")

    decayed = spec.decay.value != "none"
    gate = (B, T, H, K) if spec.decay.value == "channel" else (B, T, H)
    with _TorchOps(side):
        if not backward:
            interleave(t(B, T, H, K), 2, 1)  # q
            torch.stack([-t(B, T, H, K), t(B, T, H, K)], dim=2).flatten(1, 2)  # the write keys
            interleave(t(B, T, H, K), 2, 0)  # the read keys a
            interleave(t(B, T, H, V), 2, 1)  # v
            if decayed:
                interleave(t(*gate, d=torch.float32), 2, 0)
            t(B, 2 * T, H, V)[:, 1::2].contiguous()  # o
        else:  # autograd's: dO spread over the rows, each input's rows gathered back
            interleave(t(B, T, H, V), 2, 1)
            for rows, at, d in (((B, 2 * T, H, K), 1, dt), ((B, 2 * T, H, K), 1, dt), ((B, 2 * T, H, K), 0, dt),
                                ((B, 2 * T, H, K), 0, dt), ((B, 2 * T, H, V), 1, dt)):  # dq, dk, db, da, dv
                t(*rows, d=d)[:, at::2].contiguous()
            if decayed:
                t(B, 2 * T, *gate[2:], d=torch.float32)[:, 0::2].contiguous()


def peer(library: str, op: str, *, B: int, T: int, H: int, K: int, V: int, backward: bool,
         dtype: str = "bf16") -> Side | None:
    """The peer's Triton launches for one call: fla's ``op`` or mamba_ssm's chunk scan (None when
    the library is not installed)."""
    import importlib.util

    if importlib.util.find_spec("fla" if library == "fla" else "mamba_ssm") is None:
        return None
    from bench import peers

    def capture(backward: bool):
        if library == "fla":
            return peers.fla_launches(op, B=B, T=T, H=H, K=K, V=V, dtype=dtype, backward=backward)
        return peers.mamba_launches(B=B, T=T, H=H, K=K, V=V, dtype=dtype, backward=backward)

    side = Side()
    with _TorchOps(side):
        launches = capture(backward)
    if backward:  # its capture of the backward runs the forward first: count the backward's torch ops alone
        forward = Side()
        with _TorchOps(forward):
            capture(False)
        side.torch_ops -= forward.torch_ops
        side.op_bytes -= forward.op_bytes
        # autograd's accumulation into the leaves' .grad copies on meta tensors, where on a GPU it
        # takes the gradient as it is: not the peer's cost
        side.torch_ops.pop("copy_", None)
        side.op_bytes.pop("copy_", None)
    for launch in launches:
        report = _compile(launch.fn, launch.args, launch.num_warps, launch.num_stages)
        side.rows.append(Row(launch.name, math.prod(launch.grid), report, launch.num_stages,
                             launch.bytes_read, launch.bytes_written))
    return side


def _mb(n: float) -> str:
    return f"{n / 1e6:,.0f}"


def kernel_table(title: str, side: Side) -> list[str]:
    lines = [
        f"**{title}**",
        "",
        "| kernel | CTAs | warps | stages | regs | spills | smem KB | wgmma | wgmma N | mma.sync | TMA | blocks/SM | waves "
        "| MB read | MB written | MB from HBM |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in side.rows:
        p = r.report
        hbm = _mb((r.hbm_read if r.hbm_read is not None else r.read) + r.written)
        lines.append(
            f"| {r.name} | {r.ctas:,} | {p.num_warps} | {r.num_stages if r.num_stages is not None else '-'} "
            f"| {p.registers} | {p.spill_stores + p.spill_loads} | {p.shared / 1024:.0f} | {p.wgmma} | {', '.join(map(str, p.wgmma_n)) or '-'} | {p.mma_sync} "
            f"| {p.tma} | {r.blocks_per_sm} | {r.waves:.2f} | {_mb(r.read)} | {_mb(r.written)} | {hbm} |"
        )
    if side.torch_ops:
        ops = ", ".join(f"{k} {v}" for k, v in side.torch_ops.most_common())
        lines.append(f"| torch ops: {ops} | | | | | | | | | | | | | | | {_mb(side.torch_bytes)} |")
    if any(r.blocks_per_sm == 0 for r in side.rows):
        lines += ["", "0 blocks/SM: this candidate needs more shared memory or registers than an SM has; "
                  "an autotuner on the device would skip it for a later one (the peer's bytes, each "
                  "tensor once, do not depend on the candidate)."]
    return lines + [""]


def compare(key: str, shape: str | dict, progress=lambda _: None, modes=("forward", "backward")) -> tuple[list[str], dict]:
    """The report section of one op at one shape (a name of :data:`SHAPES`, or its sizes), and its totals."""
    title, spec, (library, peer_op) = OPS[key]
    s = SHAPES[shape] if isinstance(shape, str) else shape
    dims = {"B": s["B"], "T": s["T"], "H": s["H"], "K": s["K"], "V": s["K"]}
    name = shape if isinstance(shape, str) else "custom"
    lines = [f"### {title}, {name}: B{s['B']} T{s['T']} H{s['H']} K=V={s['K']}, bf16", ""]
    totals = {}
    for mode in modes:
        progress(f"{key} {shape} {mode}: ours")
        mine = ours(spec, backward=mode == "backward", **dims)
        progress(f"{key} {shape} {mode}: {library}")
        theirs = peer(library, peer_op, backward=mode == "backward", **dims)
        totals[mode] = (mine, theirs)
        lines += kernel_table(f"linattn {mode}", mine)
        if theirs is not None:
            lines += kernel_table(f"{library} {mode} (first autotune candidate)", theirs)
    lines += ["| | linattn | peer | ratio |", "| --- | ---: | ---: | ---: |"]
    fwd_m, fwd_p = totals["forward"]
    rows = [("forward MB from HBM", fwd_m.hbm, fwd_p.hbm if fwd_p else None, _mb)]
    if "backward" not in totals:
        rows.append(("forward launches", fwd_m.launches, fwd_p.launches if fwd_p else None, str))
    else:
        bwd_m, bwd_p = totals["backward"]
        both = fwd_p is not None and bwd_p is not None
        rows += [
            ("fwd+bwd MB from HBM", fwd_m.hbm + bwd_m.hbm, fwd_p.hbm + bwd_p.hbm if both else None, _mb),
            ("fwd+bwd launches", fwd_m.launches + bwd_m.launches, fwd_p.launches + bwd_p.launches if both else None, str),
            ("torch-side share of backward bytes", bwd_m.torch_bytes / max(bwd_m.hbm, 1), None, lambda x: f"{100 * x:.1f}%"),
        ]
    summary = {"sides": totals}
    for label, a, b, fmt in rows:
        ratio = f"{a / b:.2f}" if b else "-"
        lines.append(f"| {label} | {fmt(a)} | {fmt(b) if b is not None else '-'} | {ratio} |")
        summary[label] = (a, b)
    return lines + [""], summary


def svg(sections: list[tuple[str, dict]]) -> str:
    """Bars of each kernel's MB from HBM, ours beside the peer's, per op, shape and pass (launch
    order top to bottom; torch ops as one bar): a picture of where the bytes go."""
    bar, gap, label_w, scale_w = 11, 4, 330, 520
    rows: list[tuple[str, str, float]] = []  # (kind, label, MB): kind "title", "ours", "peer"
    for title, summary in sections:
        for mode, (mine, peer) in summary["sides"].items():
            rows.append(("title", f"{title}: {mode} (launches {mine.launches} vs {peer.launches if peer else '-'})", 0.0))
            for kind, side in (("ours", mine), ("peer", peer)):
                if side is None:
                    continue
                for r in side.rows:
                    rows.append((kind, r.name, ((r.hbm_read if r.hbm_read is not None else r.read) + r.written) / 1e6))
                if side.torch_bytes:
                    rows.append((kind, "torch ops", side.torch_bytes / 1e6))
    top = max([mb for _, _, mb in rows] + [1.0])
    height = len(rows) * (bar + gap) + 40
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{label_w + scale_w + 90}" height="{height}" '
           'font-family="monospace" font-size="10">',
           f'<text x="4" y="14" font-size="12">MB from HBM per kernel on sm_90: linattn (blue), the peer: fla or mamba_ssm (orange); '
           f'full width = {top:,.0f} MB</text>']
    y = 30
    for kind, label, mb in rows:
        if kind == "title":
            out.append(f'<text x="4" y="{y + bar - 1}" font-weight="bold">{label}</text>')
        else:
            colour = "#3b6fb6" if kind == "ours" else "#e08a2e"
            w = max(1.0, scale_w * mb / top)
            out.append(f'<text x="{label_w - 4}" y="{y + bar - 2}" text-anchor="end">{label[:52]}</text>')
            out.append(f'<rect x="{label_w}" y="{y}" width="{w:.1f}" height="{bar}" fill="{colour}"/>')
            out.append(f'<text x="{label_w + w + 4:.1f}" y="{y + bar - 2}">{mb:,.0f}</text>')
        y += bar + gap
    return "\n".join(out + ["</svg>"]) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--op", choices=sorted(OPS), action="append")
    parser.add_argument("--shape", choices=sorted(SHAPES), action="append")
    parser.add_argument("--out", type=Path, default=RESULTS / "static-sm90.md")
    args = parser.parse_args(argv)

    def progress(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    plot = args.out.with_suffix(".svg")
    lines = ["# Static report: sm_90 (H100), compiled ahead of time on a CPU", "", __doc__.split("\n\n")[1], "",
             f"![MB from HBM per kernel, ours and the peer's]({plot.name})", ""]
    sections = []
    for key in args.op or list(OPS):
        for shape in args.shape or list(SHAPES):
            section, summary = compare(key, shape, progress)
            lines += section
            sections.append((f"{OPS[key][0]}, {shape}", summary))
    args.out.write_text("\n".join(lines) + "\n")
    plot.write_text(svg(sections))
    progress(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
