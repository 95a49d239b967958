"""How many device kernels one call of a compiled op launches: generated Triton kernels and
torch ops outside them, for the forward, the backward and the decode step.

Launch overhead (a few microseconds each on a GPU) dominates short sequences and decoding,
so the count is tracked without a GPU: a dispatch mode counts every torch op that computes
(views and allocations launch nothing) and the runtime's launcher counts Triton kernels.

    python -m bench.launches            # the table, written to bench/results/launches.md
"""
from __future__ import annotations

import argparse
import collections
import sys
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import linattn
from linattn import runtime, specs
from linattn.inspection import launch_bytes
from linattn.inputs import check_call
from linattn.testing import random_inputs

RESULTS = Path(__file__).parent / "results"

#: torch ops that launch no kernel (metadata changes and allocations)
_FREE = frozenset({
    "view", "_unsafe_view", "empty", "empty_strided", "reshape", "detach", "t", "transpose", "expand", "as_strided",
    "slice", "select", "unsqueeze", "squeeze", "alias", "permute", "lift_fresh", "split", "unbind", "_reshape_alias",
})


@dataclass
class Launches:
    triton: int = 0
    torch_ops: collections.Counter = field(default_factory=collections.Counter)
    #: the generated kernels launched, in order, by their manifest's stage names
    kernels: list[str] = field(default_factory=list)
    #: the bytes those kernels read and write, each tensor once per launch (from their manifests)
    kernel_bytes: int = 0

    @property
    def torch(self) -> int:
        return sum(self.torch_ops.values())


class _Counter(TorchDispatchMode):
    def __init__(self, into: Launches) -> None:
        super().__init__()
        self.into, self.paused = into, False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.__name__.split(".")[0]
        if not self.paused and name not in _FREE:
            self.into.torch_ops[name] += 1
        return out


@contextmanager
def counting():
    """Count launches inside the block (torch ops run by the Triton interpreter itself excluded)."""
    result = Launches()
    mode = _Counter(result)
    launch = runtime.launch

    def counted(*args, kernel=None, sizes=None, **kwargs):
        mode.paused = True
        try:
            return launch(*args, kernel=kernel, sizes=sizes, **kwargs)
        finally:
            mode.paused = False
            result.triton += 1
            if kernel is not None:
                result.kernels.append(kernel.name)
                given = args[3] if len(args) > 3 else kwargs["args"]
                result.kernel_bytes += sum(launch_bytes(kernel, sizes, given))

    runtime.launch = counted
    try:
        with mode:
            yield result
    finally:
        runtime.launch = launch


def count_spec(spec: linattn.Spec, B: int = 2, T: int = 64, varlen: bool = False) -> dict[str, Launches]:
    """Launches of a forward, a backward (from the forward's saved tensors) and a one-token step."""
    op = linattn.compile(spec)
    x = random_inputs(spec, B=B, T=T, H=1, HV=2, K=16, V=16, dtype=torch.float32)
    operands = {n: t for n, t in x.kwargs.items() if n not in ("z", "D")}
    q, k, v = x.q, x.k, x.v
    cu = None
    if varlen:
        q, k, v = (t.reshape(1, B * T, *t.shape[2:]) for t in (q, k, v))
        operands = {n: (t.reshape(1, B * T, *t.shape[2:]) if isinstance(t, torch.Tensor) and t.dim() >= 3 else t)
                    for n, t in operands.items()}
        cu = torch.arange(0, B + 1, dtype=torch.int32) * T
    z, D = x.kwargs.get("z"), x.kwargs.get("D")
    if varlen and z is not None:
        z = z.reshape(1, B * T, *z.shape[2:])
    call = check_call(spec, q, k, v, operands, z=z, D=D, scale=None, initial_state=None, cu_seqlens=cu,
                      check_values=False)
    out: dict[str, Launches] = {}
    with torch.no_grad():
        op._forward(call, False)  # generate and load the kernels first
        with counting() as out["forward"]:
            op._forward(call, False)
        saved: dict = {}
        o, _ = op._forward(call, False, keep=saved)
        do = torch.ones_like(o)
        op._backward(call, saved, do, None)
        with counting() as out["backward"]:
            op._backward(call, saved, do, None)
        s = random_inputs(spec, B=B, T=1, H=1, HV=2, K=16, V=16, dtype=torch.float32)
        state = torch.zeros(B, 2, 16, 16)
        op.step(s.q, s.k, s.v, state, **s.kwargs)
        with counting() as out["step"]:
            op.step(s.q, s.k, s.v, state, **s.kwargs)
    return out


def _quiet(text: str) -> None:
    pass


def table(progress: Callable[[str], None] = _quiet) -> list[str]:
    lines = [
        "# Launches per call (counted on the CPU; the GPU runs the same launches)",
        "",
        "Triton = generated kernels; torch = torch ops that launch a kernel (views and allocations excluded).",
        "Equal-length batch (B=2, T=64; its chunk table depends on B and T alone and is cached); varlen packs the",
        "same two sequences with cu_seqlens: its chunk table is built by one small kernel on every call (never",
        "stale). On CUDA a varlen call adds one torch op, the device-side assert of the bounds' validity, and a",
        "decode step through a state pool adds three (the error flag, its test and assert).",
        "",
        "| spec | forward triton + torch | varlen forward triton + torch | backward triton + torch | step triton + torch |",
        "| --- | --- | --- | --- | --- |",
    ]
    for i, spec in enumerate(specs.BUILTIN.values(), 1):
        progress(f"[{i}/{len(specs.BUILTIN)}] counting the launches of {spec.name} ...")
        n, var = count_spec(spec), count_spec(spec, varlen=True)
        cell = lambda x: f"{x.triton} + {x.torch}"  # noqa: E731
        varlen = cell(var["forward"])
        lines.append(f"| {spec.name} | {cell(n['forward'])} | {varlen} | {cell(n['backward'])} | {cell(n['step'])} |")
    return lines


def _test_helpers():
    """The tests' helpers (the tiny model configs live there)."""
    import sys

    tests = str(Path(__file__).parent.parent / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    import helpers

    return helpers


def count_model_step(family: str, batch: int = 4, prompt: int = 12) -> Launches:
    """Launches of one decode step (one token per sequence) of a tiny model of ``family``."""
    model = _test_helpers().tiny_model(family)
    ids = torch.randint(0, 97, (batch, prompt), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cache = model.new_cache()
        model(ids, cache)
        model(ids[:, :1], cache)  # the step kernels generated and loaded
        with counting() as out:
            model(ids[:, 1:2], cache)
    return out


def model_table(progress: Callable[[str], None] = _quiet) -> list[str]:
    lines = [
        "",
        "## One decode step of a whole (tiny) model",
        "",
        "Batch 4 after a 12-token prompt; the model's own layers (projections, norms, conv updates, MoE",
        "routing and experts, attention over the cache) run as torch ops around the step kernels.",
        "",
        "| model | layers | triton | torch | most frequent torch ops |",
        "| --- | --- | --- | --- | --- |",
    ]
    TINY_MODELS = _test_helpers().TINY_MODELS
    for i, family in enumerate(sorted(TINY_MODELS), 1):
        progress(f"[{i}/{len(TINY_MODELS)}] counting the launches of a decode step of a tiny {family} ...")
        n = count_model_step(family)
        top = ", ".join(f"{k} {v}" for k, v in n.torch_ops.most_common(5))
        layers = len(TINY_MODELS[family].get("hybrid_override_pattern", "")) or TINY_MODELS[family]["num_hidden_layers"]
        lines.append(f"| {family} | {layers} | {n.triton} | {n.torch} | {top} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=RESULTS / "launches.md")
    args = parser.parse_args(argv)

    def progress(text: str) -> None:  # on stderr: stdout is the table
        print(text, file=sys.stderr, flush=True)

    text = "\n".join(table(progress) + model_table(progress)) + "\n"
    args.out.write_text(text)
    print(text, end="")  # noqa: T201 (a command-line report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
