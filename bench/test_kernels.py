"""The kernel table: op x mode x shape x provider, bf16, one row per measurement.

Each row's ``extra_info`` holds the median time from CUDA-event timing (``do_bench``:
warm-up outside the timing, median of many runs) and, from the plan's cost model,
TFLOP/s, GB/s and the fraction of the roofline (against ceilings measured in the run).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from linattn import codegen
import linattn
from linattn.codegen.cost import cost
from linattn import specs
from linattn.testing import random_inputs

from .conftest import device_name, provider_status

CUDA = torch.cuda.is_available()
#: fla's benchmark shapes (B, T, H, D) and two long contexts; one tiny shape without a GPU
SHAPES = (
    [(1, 8192, 96, 128), (2, 16384, 16, 128), (4, 2048, 16, 128), (4, 4096, 64, 128), (8, 2048, 32, 256),
     (8, 1024, 8, 64), (1, 32768, 16, 128), (1, 65536, 16, 128)]
    if CUDA
    else [(1, 64, 2, 32)]
)
OPS = ["MAMBA2", "GDN", "KDA", "GLA", "DELTANET", "LINEAR"]
MODES = ["forward", "forward_backward", "step"]
PROVIDERS = ["linattn", "fla", "mamba_ssm", "sdpa"]
DEVICE = "cuda" if CUDA else "cpu"
_FLA = {"GDN": "gated_delta_rule", "KDA": "kda", "GLA": "gla", "DELTANET": "delta_rule", "LINEAR": "simple_gla"}


def _applicable(op: str, mode: str, provider: str) -> str | None:
    if provider == "mamba_ssm" and (op != "MAMBA2" or mode == "step"):
        return "not applicable"
    if provider == "fla" and op == "MAMBA2":
        return "not applicable"
    if provider == "sdpa" and mode == "step":
        return "not applicable"
    return None


def _inputs(spec, B, T, H, D, grad):
    x = random_inputs(spec, B=B, T=T, H=H, K=D, V=D, dtype=torch.bfloat16, seed=0, strength=1.0)
    for name in list(x.kwargs):
        t = x.kwargs[name]
        if isinstance(t, torch.Tensor):
            x.kwargs[name] = t.to(DEVICE)
    x.q, x.k, x.v = x.q.to(DEVICE), x.k.to(DEVICE), x.v.to(DEVICE)
    return x.requires_grad_() if grad else x


def _call(provider: str, op: str, mode: str, B: int, T: int, H: int, D: int):
    """A zero-argument callable running one measured call."""
    spec = specs.by_name(op)
    grad = mode == "forward_backward"
    if mode == "step":
        x = _inputs(spec, B, 1, H, D, False)
        state = torch.zeros(B, H, D, D, dtype=torch.float32, device=DEVICE)
        if provider == "linattn":
            lin = linattn.compile(spec)
            return lambda: lin.step(x.q, x.k, x.v, state, **x.kwargs)
        import importlib

        mod = importlib.import_module(f"fla.ops.{_FLA[op]}")
        fn = getattr(mod, f"fused_recurrent_{_FLA[op]}")
        kw = _fla_kwargs(op, x)
        if op == "GLA":  # fla's recurrent GLA names its channel decay gk
            kw["gk"] = kw.pop("g")
        return lambda: fn(x.q, x.k, x.v, **kw, initial_state=state, output_final_state=True)
    x = _inputs(spec, B, T, H, D, grad)
    if provider == "linattn":
        lin = linattn.compile(spec)
        run = lambda: lin(x.q, x.k, x.v, **x.kwargs)[0]  # noqa: E731
    elif provider == "fla":
        import importlib

        mod = importlib.import_module(f"fla.ops.{_FLA[op]}")
        fn = getattr(mod, f"chunk_{_FLA[op]}")
        run = lambda: fn(x.q, x.k, x.v, **_fla_kwargs(op, x))[0]  # noqa: E731
    elif provider == "mamba_ssm":
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

        run = lambda: mamba_chunk_scan_combined(x.v, x.kwargs["dt"], x.kwargs["A"], x.k, x.q, 256)  # noqa: E731
    else:  # sdpa: the quadratic baseline on the same q, k, v
        q, k, v = (t.transpose(1, 2) for t in (x.q, x.k, x.v))
        run = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)  # noqa: E731
    if not grad:
        return run
    do = torch.randn(B, T, H, D, dtype=torch.bfloat16, device=DEVICE)

    def fwd_bwd():
        run().backward(do)

    return fwd_bwd


def _fla_kwargs(op: str, x) -> dict:
    kw = {}
    if op in ("GDN", "KDA", "GLA"):
        kw["g"] = x.kwargs["g"]
    if op in ("GDN", "KDA", "DELTANET"):
        kw["beta"] = x.kwargs["beta"]
    return kw


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}_T{}_H{}_D{}".format(*s))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("op", OPS)
def test_kernel(benchmark, ceilings, progress, op, mode, shape, provider):
    why = _applicable(op, mode, provider) or provider_status()[provider]
    if why:
        pytest.skip(why)
    B, T, H, D = shape
    fn = _call(provider, op, mode, B, T, H, D)
    if CUDA:
        from triton.testing import do_bench

        ms = do_bench(fn, warmup=25, rep=100, return_mode="median")

        def timed():
            fn()
            torch.cuda.synchronize()

        benchmark.pedantic(timed, rounds=3, iterations=1, warmup_rounds=1)
    else:  # the interpreter: one smoke call, its time is not a measurement of the kernels
        benchmark.pedantic(fn, rounds=1, iterations=1)
        ms = benchmark.stats.stats.median * 1e3
    plan = codegen.make_plan(specs.by_name(op), "bf16", D, D, codegen.Options())
    c = cost(plan, B=B, T=T, H=H, HV=H, mode=mode)
    tflops, gbps = c.flops / ms / 1e9, c.bytes / ms / 1e6
    ideal = max(c.flops / (ceilings["tflops"] * 1e9), c.bytes / (ceilings["gbps"] * 1e6)) if CUDA else math.nan
    benchmark.extra_info.update(
        op=op, mode=mode, B=B, T=T, H=H, D=D, provider=provider, device=device_name(), ms=ms,
        tflops=tflops, gbps=gbps, roofline=ideal / ms if CUDA else math.nan,
    )
    progress(f"{ms:.3f} ms" + (f", {100 * ideal / ms:.0f}% of the roofline" if CUDA else " (CPU smoke run, not a measurement)"))
