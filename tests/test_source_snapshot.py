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
