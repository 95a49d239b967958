"""The benchmark tooling works end to end without a GPU: smoke table, report, missing providers."""
import json
import os
import subprocess
import sys
from pathlib import Path

from linattn import codegen
from linattn.codegen.cost import cost
from linattn.codegen.plan import Options
from linattn import specs

ROOT = Path(__file__).resolve().parents[1]


def test_cost_model_counts_what_the_plan_runs():
    gdn = codegen.make_plan(specs.GDN, "bf16", 128, 128, Options())
    lin = codegen.make_plan(specs.LINEAR, "bf16", 128, 128, Options())
    c_gdn, c_lin = cost(gdn, B=1, T=1024, H=4, HV=4), cost(lin, B=1, T=1024, H=4, HV=4)
    assert c_gdn.flops > c_lin.flops  # the delta rule adds Akk, the solve, W, U and W S
    # minimal bytes of plain linear attention: q, k, v read and o written once, bf16
    assert c_lin.bytes == 1024 * 4 * 128 * 2 * 4
    both = cost(gdn, B=1, T=1024, H=4, HV=4, mode="forward_backward")
    assert both.flops > 2 * c_gdn.flops and both.bytes == 3 * c_gdn.bytes
    step = cost(gdn, B=64, T=1, H=4, HV=4, mode="step")
    assert step.bytes > 2 * 64 * 4 * 128 * 128 * 4  # states read and written


def test_smoke_table_and_report(tmp_path):
    # a clean environment: inside an xdist worker pytest-benchmark would switch itself off
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env["LINATTN_BENCH_OUT"] = str(tmp_path)
    out = tmp_path / "cpu-interpreter.json"
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "bench", "-q", "-p", "no:xdist", "-p", "no:cacheprovider",
         "-k", "GDN and forward and not backward", "--benchmark-enable", f"--benchmark-json={out}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = [b["extra_info"] for b in json.loads(out.read_text())["benchmarks"]]
    assert {r["provider"] for r in rows} == {"linattn", "sdpa"} and all(r["ms"] > 0 for r in rows)
    rep = subprocess.run([sys.executable, "-m", "bench.report", str(out), "--out", str(tmp_path)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert rep.returncode == 0, rep.stderr
    md = (tmp_path / "cpu-interpreter.md").read_text()
    assert "## GDN, forward" in md and "provider `fla`: missing" in md and "Smoke run" in md
