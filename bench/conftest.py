"""Kernel tables: providers, devices, roofline ceilings.

Run with ``python -m pytest bench --benchmark-json=bench/results/<device>.json`` (see
``bench/gpu.sh``), then ``python -m bench.report``. Without a GPU the same command runs
tiny shapes through Triton's interpreter (a smoke run: its times mean nothing).
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("FLA_DISABLE_BACKEND_DISPATCH", "1")  # fla's Triton path, the baseline

RESULTS = Path(os.environ.get("LINATTN_BENCH_OUT") or Path(__file__).parent / "results")


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name().replace(" ", "_")
    return "cpu-interpreter"


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


#: provider -> why it cannot run here (None: it can)
def provider_status() -> dict[str, str | None]:
    cuda = torch.cuda.is_available()
    return {
        "linattn": None,
        "fla": None if _installed("fla") and cuda else ("missing: needs fla-core and a GPU" if not cuda else "missing: fla-core not installed"),
        "mamba_ssm": None if _installed("mamba_ssm") and cuda else "missing: mamba_ssm not installed (needs a GPU build)",
        "sdpa": None,
    }


def _ceilings() -> dict[str, float]:
    """Peak HBM bandwidth (a large device copy) and bf16 matmul rate, measured once per run."""
    if not torch.cuda.is_available():
        return {"gbps": float("nan"), "tflops": float("nan")}
    from triton.testing import do_bench

    x = torch.empty(2**28, dtype=torch.bfloat16, device="cuda")  # 512 MiB
    y = torch.empty_like(x)
    ms = do_bench(lambda: y.copy_(x), return_mode="median")
    gbps = 2 * x.numel() * 2 / ms / 1e6
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    ms = do_bench(lambda: a @ a, return_mode="median")
    tflops = 2 * 8192**3 / ms / 1e9
    del x, y, a
    return {"gbps": gbps, "tflops": tflops}


@pytest.fixture
def progress(request):
    """``progress(text)``: one line ``[i/n] test id: text`` on the terminal as a measurement
    finishes (a sweep over every op, mode, shape and provider takes minutes on a GPU and
    pytest's -q shows only dots), past pytest's output capturing."""
    items = request.session.items  # after -k / -m deselection
    index = next((i for i, item in enumerate(items, 1) if item is request.node), 0)
    total = len(items)
    plugins = request.config.pluginmanager
    reporter, capture = plugins.getplugin("terminalreporter"), plugins.getplugin("capturemanager")

    def write(text: str) -> None:
        if reporter is None:
            return
        with capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext():
            reporter.ensure_newline()
            reporter.write_line(f"[{index}/{total}] {request.node.name}: {text}", flush=True)

    return write


@pytest.fixture(scope="session")
def ceilings():
    c = _ceilings()
    RESULTS.mkdir(exist_ok=True)
    info = {"device": device_name(), "ceilings": c, "providers": provider_status(), "torch": torch.__version__}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    (RESULTS / f"{device_name()}.run.json").write_text(json.dumps(info, indent=1))
    return c
