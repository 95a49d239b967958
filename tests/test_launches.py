"""Launch counts of a call: the generated kernels and nothing else where it can be helped.

Launch overhead dominates short sequences and decoding on a GPU; these counts are what a
profile of a call would list (counted on the CPU: the launches are the same).
"""
import pytest

from bench.launches import count_spec
from linattn import specs
from linattn.spec import Role


@pytest.mark.parametrize("spec", [specs.GDN, specs.QWEN3_NEXT_GDN, specs.NEMOTRON_MAMBA2, specs.KIMI_KDA],
                         ids=lambda s: s.name)
def test_launches(spec):
    from linattn import codegen
    plan = codegen.make_plan(spec, "fp32", 16, 16, codegen.Options())
    counts = count_spec(spec, B=2, T=20, varlen=True)
    fixed = count_spec(spec, B=2, T=20)
    # forward: one launch per stage (in the interpreter the state pass writes the output where
    # Aqk is stored); the chunk tables of an equal-length batch are cached
    stages = plan.forward_stages(plan.aqk_stored)
    assert (fixed["forward"].triton, fixed["forward"].torch) == (len(stages), 0), fixed["forward"].torch_ops
    assert fixed["forward"].kernels == [f"{stage}_fwd" for stage in stages]
    # a packed batch builds its table on every call (one kernel; nothing to go stale), and
    # (on CUDA only) asserts on the device that cu_seqlens was valid
    assert (counts["forward"].triton, counts["forward"].torch) == (len(stages) + 1, 0)
    assert counts["forward"].kernels == ["chunk_table", *fixed["forward"].kernels]
    # the bytes the manifests declare: the packed call's table on top of the same kernels
    assert counts["forward"].kernel_bytes > fixed["forward"].kernel_bytes > 0
    assert counts["backward"].triton == fixed["backward"].triton + 1
    # decoding: the step kernel alone
    assert (fixed["step"].triton, fixed["step"].torch) == (1, 0)
    # backward: the layer-side terms and norms run as generated kernels; what stays in torch
    # is a sum per per-head parameter (its chunk partials), the sums over a q/k head's value
    # heads where no norm kernel takes them, and the D skip and β of a recurrence without the
    # delta rule (dv = β dvn, dβ = Σ dvn v) — before the kernels, QWEN3_NEXT_GDN's took 60
    per_head = sum(o.role in (Role.HEAD, Role.HEAD_CHANNEL) for o in spec.operands)
    budget = per_head + (0 if spec.qk_l2norm else 2)
    if spec.skip.value != "none":
        budget += 5  # D's gradient (mul, sum), v's share (mul), the two dv parts added
    if spec.beta is not None and not spec.has_delta:
        budget += 4  # dv = β dvn (mul), dβ (mul, sum), dt's two shares added
    assert fixed["backward"].torch <= budget, fixed["backward"].torch_ops
