"""Every generated kernel compiles ahead of time for the H100 (sm_90) and does not spill:
the variant a launch compiles (captured from a call on meta tensors, with the launch's
specialization of pointer alignment and integer divisibility)."""
import pytest

import linattn.steps
from linattn import specs
from linattn.codegen.aot import format_reports
from linattn.inspection import inspect_spec
from linattn.spec import Decay

from helpers import ALL_BUILTIN

#: Known: channel decay's dprod_bwd spills a little in the launch variant (KIMI_KDA 20 bytes,
#: KDA 0 here and 8 at 96 q/k and value heads, measured with triton 3.9); bounded here so it cannot grow unseen, to be
#: removed by restructuring its pairwise diagonal blocks.
_KNOWN_SPILL = {"dprod_bwd": 32}


@pytest.mark.parametrize("spec", ALL_BUILTIN, ids=lambda s: s.name)
def test_builtin_kernels_compile_for_sm90_without_spills(spec):
    reports = inspect_spec(spec, "bf16", 128, 128, arch=90)
    table = "\n".join(format_reports(reports))
    assert reports, "no kernels"
    for r in reports:
        assert 0 < r.registers <= 255, table
        assert not r.spills, f"{spec.name}: {r.name} spills\n{table}"
        assert r.shared <= 227 * 1024, f"{spec.name}: {r.name} needs more shared memory than an H100 has\n{table}"
        # the warpgroup MMAs' N widths, read off the SASS: one at least wherever there is one
        assert bool(r.wgmma_n) == (r.wgmma > 0) and all(n % 8 == 0 and 8 <= n <= 256 for n in r.wgmma_n), r


@pytest.mark.parametrize("spec", ALL_BUILTIN, ids=lambda s: s.name)
def test_backward_kernels_compile_for_sm90_without_spills(spec):
    """The kernels the backward runs: its own and the forward ones it re-runs (on the spec's core)."""
    reports = inspect_spec(spec, "bf16", 128, 128, arch=90, backward=True)
    table = "\n".join(format_reports(reports))
    assert any(r.stage.endswith("_bwd") for r in reports), table
    for r in reports:
        assert 0 < r.registers <= 255, table
        allowed = _KNOWN_SPILL.get(r.stage, 0) if spec.decay is Decay.CHANNEL else 0
        assert max(r.spill_stores, r.spill_loads) <= allowed, f"{spec.name}: {r.name} spills\n{table}"
        assert r.shared <= 227 * 1024, table


@pytest.mark.parametrize("spec", [specs.DELTANET, specs.GDN, specs.KDA, specs.MAMBA2], ids=lambda s: s.name)
def test_kernels_at_head_size_64_compile_for_sm90_without_spills(spec):
    """K = V = 64 takes its own tiles (the state passes on 4 warps, the intra solve in key
    blocks of 32, the delta rule's dchunk walking V in 32 columns): forward and backward
    kernels, no spills beyond channel decay's known ones (its dqk_bwd: 4 bytes here)."""
    reports = inspect_spec(spec, "bf16", 64, 64, arch=90) + inspect_spec(spec, "bf16", 64, 64, arch=90, backward=True)
    table = "\n".join(format_reports(reports))
    for r in reports:
        allowed = {**_KNOWN_SPILL, "dqk_bwd": 8}.get(r.stage, 0) if spec.decay is Decay.CHANNEL else 0
        assert max(r.spill_stores, r.spill_loads) <= allowed, f"{spec.name}: {r.name} spills\n{table}"
        if r.stage in ("state_fwd", "dstate_bwd"):  # a warpgroup: the state products on wgmma
            assert r.wgmma > 0 and r.num_warps == 4, f"{spec.name}: {r.name}\n{table}"


def test_inspection_captures_what_a_call_launches():
    """The launches of a packed forward and a decode step, in order, with the launch's
    specialization: 16-aligned pointers and 16-divisible integers hinted, integers 1 constant."""
    from linattn.codegen.aot import specialize
    from linattn import specs
    from linattn.inspection import captured_launches

    # 4 sequences x 32 value heads x 2 V tiles: the state pass fills the H100 a capture models,
    # so it writes the output too (one program per sequence, value head and V tile)
    launches = captured_launches(specs.GDN, T=4096, H=16, HV=32)
    stages = ["chunk_table", "gates_fwd", "intra_fwd", "wu_fwd", "scan_fwd", "step_fwd"]
    assert [launch.kernel.name for launch in launches] == stages
    # the generated functions carry the spec's name (profiler traces tell specs apart)
    assert [launch.fn.__name__ for launch in launches] == [f"gdn_{s}" for s in stages]
    state = launches[4]
    assert state.grid == (4 * 2, 32)
    signature, constexprs, attrs = specialize(state.args)
    index = {name: i for i, name in enumerate(state.args)}
    assert signature["k"] == "*bf16" and signature["Aqk"] == "*bf16" and signature["G"] == "*fp32"
    assert signature["dtile"] == "*fp32" and "hs" not in signature
    assert attrs[(index["k"],)] == [["tt.divisibility", 16]] and attrs[(index["TT"],)] == [["tt.divisibility", 16]]
    assert constexprs["HAS_H0"] is False and signature["GROUP"] == "i32" and (index["GROUP"],) not in attrs
    table = launches[0]
    assert table.args["NCH"] == 4096 // 64 + 4


def test_interpreter_leaves_triton_language_as_it_was():
    """A kernel run through the interpreter (its device functions tl.sum, tl.cumsum included)
    leaves triton.language unpatched, so that compiling for sm_90 afterwards still works."""
    import inspect

    import torch
    import triton.language as tl

    import linattn
    from linattn import specs
    from linattn.testing import random_inputs

    objects = [tl, tl.core, tl.math, tl.core.tensor]
    before = [dict(vars(o)) for o in objects]
    x = random_inputs(specs.GDN, B=1, T=20, H=1, K=16, V=16, dtype=torch.float32, seed=0)
    linattn.compile(specs.GDN)(x.q, x.k, x.v, **x.kwargs)
    for o, attrs in zip(objects, before):
        # (a submodule imported meanwhile, such as triton.language.semantic, is no patch)
        changed = [n for n in set(attrs) | set(vars(o)) if vars(o).get(n) is not attrs.get(n)
                   and not (n not in attrs and inspect.ismodule(vars(o)[n]))]
        assert not changed, f"{o}: {sorted(changed)[:5]}"
    assert inspect_spec(specs.GDN, "bf16", 64, 64, arch=90)


def test_delta_product_kernels_compile_for_sm90_without_spills():
    """DeltaProduct's launches (its one-step core over T · n rows) at K = V = 128 in bf16,
    forward and backward: no spills. (Without the L2 norm its core is GDN's, checked above.)"""
    spec = specs.delta_product(3).replace(qk_l2norm=True)
    assert linattn.steps.core_of(specs.DELTA_PRODUCT)[0] == specs.GDN
    reports = inspect_spec(spec, "bf16", 128, 128, arch=90) + inspect_spec(spec, "bf16", 128, 128, arch=90, backward=True)
    table = "\n".join(format_reports(reports))
    assert any(r.stage.endswith("_bwd") for r in reports), table
    for r in reports:
        assert 0 < r.registers <= 255 and not r.spills, f"{spec.name}: {r.name} spills\n{table}"


@pytest.mark.parametrize("spec", [specs.COMBA], ids=lambda s: s.name)
def test_comba_kernels_compile_for_sm90_without_spills(spec):
    """Comba (fla's: scalar decay) at K = V = 128 in bf16, forward, decode step and backward:
    its read key p adds operand tiles to intra, wu, dchunk and the step; no spills."""
    reports = inspect_spec(spec, "bf16", 128, 128, arch=90) + inspect_spec(spec, "bf16", 128, 128, arch=90, backward=True)
    table = "\n".join(format_reports(reports))
    assert {"intra_fwd", "wu_fwd", "step_fwd", "dchunk_bwd"} <= {r.stage for r in reports}, table
    for r in reports:
        assert 0 < r.registers <= 255 and not r.spills, f"{spec.name}: {r.name} spills\n{table}"


@pytest.mark.parametrize("spec", [specs.DPLR, specs.IPLR], ids=lambda s: s.name)
def test_dplr_kernels_compile_for_sm90_without_spills(spec):
    """DPLR's core (two rows per token of Comba read before the decay) at K = V = 128 in bf16:
    forward, decode step and backward (channel decay's products in two kernels) without spills."""
    core = linattn.steps.dplr_core(spec)
    reports = inspect_spec(core, "bf16", 128, 128, arch=90) + inspect_spec(core, "bf16", 128, 128, arch=90, backward=True)
    table = "\n".join(format_reports(reports))
    assert {"intra_fwd", "wu_fwd", "step_fwd"} <= {r.stage for r in reports}, table
    for r in reports:
        assert 0 < r.registers <= 255 and not r.spills, f"{spec.name}: {r.name} spills\n{table}"
