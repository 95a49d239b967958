"""Every generated kernel compiles ahead of time for the H100 (sm_90) and does not spill."""
import pytest

from codegen.aot import format_reports, inspect_spec

from helpers import ALL_BUILTIN


@pytest.mark.parametrize("spec", ALL_BUILTIN, ids=lambda s: s.name)
def test_builtin_kernels_compile_for_sm90_without_spills(spec):
    reports = inspect_spec(spec, "bf16", 128, 128, arch=90)
    table = "\n".join(format_reports(reports))
    assert reports, "no kernels"
    for r in reports:
        assert 0 < r.registers <= 255, table
        assert not r.spills, f"{spec.name}: {r.name} spills\n{table}"
        assert r.shared <= 227 * 1024, f"{spec.name}: {r.name} needs more shared memory than an H100 has\n{table}"


@pytest.mark.parametrize("spec", ALL_BUILTIN, ids=lambda s: s.name)
def test_backward_kernels_compile_for_sm90_without_spills(spec):
    """The kernels the backward runs: its own and the forward ones it re-runs (on the spec's core)."""
    reports = inspect_spec(spec, "bf16", 128, 128, arch=90, backward=True)
    table = "\n".join(format_reports(reports))
    assert any(r.name.endswith("_bwd") for r in reports), table
    for r in reports:
        assert 0 < r.registers <= 255, table
        assert not r.spills, f"{spec.name}: {r.name} spills\n{table}"
        assert r.shared <= 227 * 1024, table
