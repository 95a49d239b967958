"""Snapshots of the generated source of one built-in spec (GDN, bf16, K = V = 64), forward
and backward modules: a change to the emitters shows here as a diff to review.

After an intended change, regenerate them:

    python -m linattn source GDN --K 64 --V 64 > tests/snapshots/GDN_bf16_K64_V64.py.txt
    python -m linattn source GDN --K 64 --V 64 --backward > tests/snapshots/GDN_core_backward_bf16_K64_V64.py.txt
"""
import difflib
import subprocess
import sys
from pathlib import Path

import pytest

SNAPSHOTS = Path(__file__).parent / "snapshots"


@pytest.mark.parametrize(
    "args, name",
    [([], "GDN_bf16_K64_V64.py.txt"), (["--backward"], "GDN_core_backward_bf16_K64_V64.py.txt")],
    ids=["forward", "backward"],
)
def test_generated_source_matches_its_snapshot(args, name):
    out = subprocess.run(
        [sys.executable, "-m", "linattn", "source", "GDN", "--K", "64", "--V", "64", *args],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    expected = (SNAPSHOTS / name).read_text()
    if out.stdout != expected:
        diff = "".join(difflib.unified_diff(expected.splitlines(True), out.stdout.splitlines(True), name, "generated", n=1))
        pytest.fail(f"the generated source changed (regenerate the snapshot if intended):\n{diff[:4000]}")


def test_generated_module_is_plain_triton(tmp_path):
    """The printed module imports on its own: every kernel a ``@triton.jit`` function named
    after its spec; the gate's shared subexpressions are computed once."""
    import importlib.util

    import triton

    out = subprocess.run(
        [sys.executable, "-m", "linattn", "source", "KIMI_KDA", "--K", "64", "--V", "64"],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    path = tmp_path / "kimi_kda_generated.py"
    path.write_text(out.stdout)
    spec = importlib.util.spec_from_file_location("kimi_kda_generated", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    kernels = [n for n in vars(mod) if n.startswith("kimi_kda_")]
    assert "kimi_kda_state_fwd" in kernels and "kimi_kda_gates_fwd" in kernels
    assert all(isinstance(getattr(mod, n), triton.runtime.JITFunction) for n in kernels), kernels
    gates = out.stdout.split("def kimi_kda_gates_fwd", 1)[1].split("\n\n\n", 1)[0]
    assert gates.count("o_a + o_dt_bias[None, :]") == 1  # softplus's argument, bound once
