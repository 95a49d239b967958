"""Turn pytest-benchmark JSON into a markdown table and PNG plots under ``bench/results/``.

    python -m bench.report bench/results/NVIDIA_H100_80GB_HBM3.json [more.json ...]

Per (op, mode): one row per shape, per provider the median ms (CUDA events), TFLOP/s,
GB/s and % of the roofline from the cost model, and linattn's speed-up over every other
provider measured in the same run. Providers that could not run are listed as missing.
Plots: time vs T per op and mode, and linattn's ratio to fla.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def load(paths: list[Path]) -> tuple[list[dict], dict]:
    rows, run = [], {}
    for p in paths:
        data = json.loads(p.read_text())
        for b in data.get("benchmarks", []):
            if b.get("extra_info", {}).get("ms") is not None:
                rows.append(b["extra_info"])
        info = p.with_suffix(".run.json") if not p.name.endswith(".run.json") else p
        if info.exists():
            run = json.loads(info.read_text())
    return rows, run


def codegen_markdown(paths: list[Path]) -> str:
    """The code-generation times (bench/test_codegen.py) of the given runs, in ms."""
    out = ["# Code generation time (Triton's own JIT excluded)", "",
           "| spec | cold median | cold max (first in process) | cached median | cached max |",
           "| --- | --- | --- | --- | --- |"]
    table: dict[str, dict[str, dict]] = defaultdict(dict)
    for p in paths:
        for b in json.loads(p.read_text()).get("benchmarks", []):
            info = b.get("extra_info", {})
            if "codegen" in info:
                table[info["spec"]][info["codegen"]] = b["stats"]
    for spec, phases in table.items():
        cells = []
        for phase in ("cold", "cached"):
            st = phases.get(phase)
            cells += [f"{st['median'] * 1e3:.1f}", f"{st['max'] * 1e3:.1f}"] if st else ["–", "–"]
        out.append(f"| {spec} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def _fmt(x: float, spec: str) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def markdown(rows: list[dict], run: dict) -> str:
    device = run.get("device") or (rows[0]["device"] if rows else "?")
    out = [f"# Kernel table: {device}", ""]
    if run:
        c = run.get("ceilings", {})
        out.append(
            f"torch {run.get('torch', '?')}, triton {run.get('triton', '?')}; ceilings measured in this run: "
            f"{_fmt(c.get('gbps'), '.0f')} GB/s copy, {_fmt(c.get('tflops'), '.0f')} TFLOP/s bf16 matmul."
        )
        missing = {p: why for p, why in run.get("providers", {}).items() if why}
        for p, why in missing.items():
            out.append(f"- provider `{p}`: {why}")
        out.append("")
    if device == "cpu-interpreter":
        out += ["Smoke run through Triton's interpreter: the times measure the interpreter, not the kernels.", ""]
    groups = defaultdict(list)
    for r in rows:
        groups[(r["op"], r["mode"])].append(r)
    for (op, mode), rs in sorted(groups.items()):
        providers = sorted({r["provider"] for r in rs}, key=lambda p: (p != "linattn", p))
        out += [f"## {op}, {mode}", ""]
        cols = ["shape", *(f"{p} ms" for p in providers), "linattn TFLOP/s", "linattn GB/s", "linattn % roofline"]
        cols += [f"speed-up vs {p}" for p in providers if p != "linattn"]
        head = "| " + " | ".join(cols) + " |"
        out += [head, "|" + "---|" * (head.count("|") - 1)]
        by_shape = defaultdict(dict)
        for r in rs:
            by_shape[(r["B"], r["T"], r["H"], r["D"])][r["provider"]] = r
        for shape, prov in sorted(by_shape.items()):
            mine = prov.get("linattn")
            cells = [f"B{shape[0]} T{shape[1]} H{shape[2]} D{shape[3]}"]
            cells += [_fmt(prov[p]["ms"], ".3f") if p in prov else "–" for p in providers]
            cells += [_fmt(mine["tflops"], ".1f"), _fmt(mine["gbps"], ".0f"), _fmt(100 * mine["roofline"], ".0f")] if mine else ["–"] * 3
            for p in providers:
                if p != "linattn":
                    cells.append(_fmt(prov[p]["ms"] / mine["ms"], ".2f") + "x" if mine and p in prov else "–")
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def aot_table() -> str:
    """Registers, spills and shared memory of every kernel (forward, step, backward), sm_90, K = V = 128."""
    from linattn.codegen.aot import format_reports
    from linattn.inspection import inspect_spec
    from linattn import specs

    out = ["## Kernel resources (sm_90, bf16, K = V = 128, compiled ahead of time)", ""]
    names = ("MAMBA2", "GDN", "KDA", "GLA", "DELTANET", "LINEAR", "QWEN3_NEXT_GDN", "KIMI_KDA", "NEMOTRON_MAMBA2")
    for i, name in enumerate(names, 1):
        print(f"[{i}/{len(names)}] compiling the kernels of {name} for sm_90 ...", file=sys.stderr, flush=True)
        spec = specs.by_name(name)
        reports = inspect_spec(spec) + [r for r in inspect_spec(spec, backward=True) if r.stage.endswith("_bwd")]
        out += [f"### {name}", "", "```", *format_reports(reports), "```", ""]
    return "\n".join(out)


def plots(rows: list[dict], stem: Path) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    made = []
    groups = defaultdict(list)
    for r in rows:
        groups[r["mode"]].append(r)
    for mode, rs in groups.items():
        ops = sorted({r["op"] for r in rs})
        fig, axes = plt.subplots(1, len(ops), figsize=(4 * len(ops), 3.5), squeeze=False)
        for ax, op in zip(axes[0], ops):
            for provider in sorted({r["provider"] for r in rs if r["op"] == op}):
                pts = sorted((r["T"] * r["B"], r["ms"]) for r in rs if r["op"] == op and r["provider"] == provider)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=provider)
            ax.set(title=f"{op} {mode}", xlabel="tokens (B·T)", ylabel="ms", xscale="log", yscale="log")
            ax.legend(fontsize=7)
        fig.tight_layout()
        path = stem.with_name(f"{stem.name}_{mode}_time.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        made.append(path)
    ratio = [(r, o) for r in rows for o in rows if r["provider"] == "linattn" and o["provider"] == "fla"
             and all(r[k] == o[k] for k in ("op", "mode", "B", "T", "H", "D"))]
    if ratio:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        labels = [f"{r['op']} {r['mode'][:7]} T{r['T']}" for r, _ in ratio]
        ax.bar(range(len(ratio)), [o["ms"] / r["ms"] for r, o in ratio])
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks(range(len(ratio)), labels, rotation=90, fontsize=6)
        ax.set_ylabel("fla ms / linattn ms")
        fig.tight_layout()
        path = stem.with_name(f"{stem.name}_ratio_vs_fla.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        made.append(path)
    return made


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json", nargs="+", type=Path, help="pytest-benchmark JSON files of one run")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--aot", action="store_true", help="append the sm_90 resource table of every built-in op's kernels")
    parser.add_argument("--codegen", type=Path, metavar="MD", help="write the code-generation table (bench/test_codegen.py) here instead")
    args = parser.parse_args(argv)
    if args.codegen:
        args.codegen.write_text(codegen_markdown(args.json))
        print(args.codegen)  # noqa: T201
        return 0
    rows, run = load(args.json)
    if not rows:
        parser.error("no benchmark rows with extra_info in the given files")
    device = run.get("device") or rows[0]["device"]
    args.out.mkdir(parents=True, exist_ok=True)
    md = args.out / f"{device}.md"
    text = markdown(rows, run)
    if args.aot:
        text += "\n" + aot_table()
    md.write_text(text + "\n")
    made = plots(rows, args.out / device)
    print(md)  # noqa: T201 (a command's output)
    for p in made:
        print(p)  # noqa: T201
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
