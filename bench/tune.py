"""A time-boxed sweep of plan options, written where the plans read them.

    python -m bench.tune --budget 150            # on a GPU: fla's shapes, bf16
    python -m bench.tune --device cpu --budget 5 --shapes 1,32,2,32   # a smoke run (interpreter)

For each op and shape it times fwd+bwd (median of CUDA-event timings, ``do_bench``) for the
defaults and each candidate option set, and keeps the fastest when it beats the defaults by
more than ``--margin``. Winners go to ``codegen/tuned/<device>.json`` (see
:mod:`linattn.codegen.tuning`; entries keyed by spec, dtype and head sizes), merged with what
the file held, and the file is rewritten after every measurement, so a run cut short keeps
what it measured. A candidate that fails (compilation, memory) is recorded as failed and skipped.
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path

import torch

import linattn
from linattn import specs
from linattn.codegen import tuning
from linattn.testing import random_inputs

log = logging.getLogger("linattn.bench")

OPS = ("GDN", "QWEN3_NEXT_GDN", "KDA", "KIMI_KDA", "NEMOTRON_MAMBA2")
#: fla's registry shapes (B, T, H, D): the first two of bench/test_kernels.py
SHAPES = ((1, 8192, 96, 128), (8, 2048, 32, 256))
#: option sets tried against the defaults, most promising first (the budget may end the list)
CANDIDATES = (
    {"block_v": 64},
    {"block_v": 32},
    {"fused_output": False},
    {"num_warps": 4},
    {"block_v": 16},
    {"num_warps": 8},
    {"subchunk_size": 32},
    {"chunk_size": 128},
    {"product_block_v": 128},
)


def _fwd_bwd(op, spec, B: int, T: int, H: int, D: int, device: str):
    x = random_inputs(spec, B=B, T=T, H=H, K=D, V=D, dtype=torch.bfloat16, seed=0, strength=1.0)
    x.q, x.k, x.v = x.q.to(device), x.k.to(device), x.v.to(device)
    x.kwargs = {n: t.to(device) if isinstance(t, torch.Tensor) else t for n, t in x.kwargs.items()}
    x.requires_grad_()
    do = torch.randn(B, T, x.v.shape[2], D, dtype=torch.bfloat16, device=device)
    return lambda: op(x.q, x.k, x.v, **x.kwargs)[0].backward(do)


def _median_ms(fn, device: str) -> float:
    if device == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=10, rep=50, return_mode="median"))
    times = []
    for _ in range(3):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def sweep(ops, shapes, budget_s: float, out_dir: Path | None, device: str, margin: float = 0.03) -> Path:
    """Run the sweep; returns the table's path. Candidates go in rounds (the defaults for
    every op and shape first, then the first candidate for all, ...), so that a budget that
    ends early leaves comparable results everywhere; the table is rewritten after each
    measurement."""
    name = tuning.device_name() if device == "cuda" else "cpu"
    path = tuning.device_file(name) if out_dir is None else out_dir / tuning.device_file(name).name
    path.parent.mkdir(parents=True, exist_ok=True)
    table = json.loads(path.read_text()) if path.is_file() else {}
    table.update(device=name)
    table.setdefault("options", {})
    table.setdefault("measured", {})
    end = time.monotonic() + budget_s
    cases = [(specs.by_name(op_name), shape) for op_name in ops for shape in shapes]
    for cand in ({}, *CANDIDATES):
        label = json.dumps(cand, sort_keys=True)
        for spec, (B, T, H, D) in cases:
            if time.monotonic() > end:
                log.warning("tune: budget spent at %s for %s B%d T%d H%d D%d", label, spec.name, B, T, H, D)
                return path
            times = table["measured"].setdefault(f"{tuning.entry_key(spec.name, 'bf16', D, D)}@B{B}T{T}H{H}", {})
            if cand and not isinstance(times.get("{}"), float):
                continue  # no baseline for this case: nothing to compare with
            try:
                op = linattn.compile(spec, **cand)  # explicit options: no table in the way
                times[label] = round(_median_ms(_fwd_bwd(op, spec, B, T, H, D, device), device), 4)
            except Exception as err:  # noqa: BLE001 (a failing candidate is a result)
                times[label] = f"failed: {type(err).__name__}: {str(err)[:160]}"
            finally:
                if device == "cuda":
                    torch.cuda.empty_cache()
            log.info("tune %s B%d T%d H%d D%d %s: %s", spec.name, B, T, H, D, label, times[label])
            _choose(table, tuning.entry_key(spec.name, "bf16", D, D), times, margin)
            path.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    return path


def _choose(table: dict, key: str, times: dict, margin: float) -> None:
    """The fastest option set of ``times`` into the table's options, if it beats the defaults by ``margin``."""
    ok = {label: t for label, t in times.items() if isinstance(t, float)}
    base = ok.get("{}")
    if base is None:
        return
    best = min(ok, key=ok.get)
    if best != "{}" and ok[best] < base * (1 - margin):
        table["options"][key] = json.loads(best)
    else:
        table["options"].pop(key, None)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.tune", description=__doc__.splitlines()[0])
    p.add_argument("--budget", type=float, default=150.0, help="seconds for the whole sweep")
    p.add_argument("--ops", default=",".join(OPS))
    p.add_argument("--shapes", default=None, help="B,T,H,D[;B,T,H,D...] (default: fla's shapes)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=None, help="folder of the table (default: codegen/tuned)")
    p.add_argument("--margin", type=float, default=0.03, help="how much faster than the defaults a winner must be")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    shapes = SHAPES if args.shapes is None else [tuple(int(v) for v in s.split(",")) for s in args.shapes.split(";")]
    path = sweep(args.ops.split(","), shapes, args.budget, args.out, args.device, args.margin)
    log.info("wrote %s", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
