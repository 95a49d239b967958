"""The manifest: each kernel's declared parameters, and everything that reads them.

Allocation, the custom op's fake shapes, ahead-of-time inspection, the cost model and the
launch counter all read the manifest, so these tests check it against the one thing it
describes: the generated source.
"""
import re

import pytest
import torch

from helpers import ALL_BUILTIN
from linattn import codegen, compile, specs
from linattn.codegen import manifest
from linattn.codegen.plan import core_spec


def _modules(spec):
    yield codegen.generate(codegen.make_plan(spec, "bf16", 64, 64, codegen.Options()))
    yield codegen.generate(codegen.make_plan(core_spec(spec), "bf16", 64, 64, codegen.Options()), backward=True)


def _accesses(kernel) -> dict[str, str]:
    """What the kernel's source does with each tensor parameter: ``r``, ``w`` or ``rw``."""
    names = {p.name for p in kernel.params if p.tensor}

    def base(n: str) -> str | None:  # a parameter, or a chunk base pointer p_<parameter>
        return n if n in names else (n[2:] if n.startswith("p_") and n[2:] in names else None)

    loads = {base(m.group(1)) for m in re.finditer(r"tl\.load\(\s*(\w+)", kernel.source)}
    stores = {base(m.group(1)) for m in re.finditer(r"tl\.store\(\s*(\w+)", kernel.source)}
    return {n: ("r" if n in loads else "") + ("w" if n in stores else "") for n in names}


@pytest.mark.parametrize("spec", ALL_BUILTIN, ids=lambda s: s.name)
def test_declared_parameters_are_what_the_source_does(spec):
    """Every tensor a kernel declares it reads, it loads and never stores; every tensor it
    declares it writes, it stores (an output may be read back by the kernel that wrote it);
    no scalar or tensor parameter goes unused."""
    for mod in _modules(spec):
        for k in mod.kernels:
            body = k.source.split("):\n", 1)[1]  # after the signature
            for p in k.params:
                assert re.search(rf"\b{p.name}\b", body), f"{k.symbol}: parameter {p.name} is unused"
            did = _accesses(k)
            for p in k.params:
                if not p.tensor:
                    continue
                if p.access == "r":
                    assert did[p.name] == "r", f"{k.symbol}: {p.name} declared read, source {did[p.name]!r}"
                elif p.access == "rw":
                    assert did[p.name] == "rw", f"{k.symbol}: {p.name} declared read-write, source {did[p.name]!r}"
                else:
                    assert "w" in did[p.name], f"{k.symbol}: {p.name} declared written, source {did[p.name]!r}"
            # the signature is the declared parameters, in order
            assert f"def {k.symbol}({', '.join(p.name + (': tl.constexpr' if p.kind == 'constexpr' else '') for p in k.params)}):" in k.source


def test_shapes_and_dtypes_come_from_one_table():
    """A kernel's tensor parameters carry the plan's table entries; intermediates follow STORE_DTYPE."""
    for dtype, store in (("bf16", "bf16"), ("fp16", "fp32"), ("fp32", "fp32")):
        plan = codegen.make_plan(specs.KIMI_KDA, dtype, 64, 32, codegen.Options())
        table = manifest.buffers(plan)
        mod = codegen.generate(plan)
        for k in mod.kernels:
            for p in k.params:
                if p.tensor:
                    assert (p.dtype, p.shape) == table[p.name], (k.name, p.name)
        assert table["Tm"] == (store, ("TT", "HV", "C")) and table["hs"] == (store, ("NCH", "HV", "K", "V"))
        assert table["G"] == ("fp32", ("TT", "HV", "K")) and table["q"] == (dtype, ("TT", "H", "K"))
    gdn = manifest.buffers(codegen.make_plan(specs.GDN, "bf16", 64, 64, codegen.Options()))
    assert gdn["G"] == ("fp32", ("TT", "HV")) and "Aqk" in gdn and "z" not in gdn


def test_grids_resolve_from_sizes():
    plan = codegen.make_plan(specs.GDN, "bf16", 128, 128, codegen.Options())
    mod = codegen.generate(plan)
    sizes = {"TT": 1000, "N": 3, "NCH": 19, "H": 4, "HV": 8, **manifest.constants(plan)}
    grids = {k.name: manifest.resolve(k.grid, sizes) for k in mod.kernels}
    # the state pass tiles V by the state's BV, output by the products' BVP: 64 both at K = V =
    # 128; the scan by BVS, 32 there for channel decay only
    assert (plan.BV, plan.BVP, plan.BVS) == (64, 64, 64)
    kda = codegen.make_plan(specs.KDA, "bf16", 128, 128, codegen.Options())
    assert (kda.BV, kda.BVS) == (64, 32)
    assert manifest.resolve(codegen.generate(kda).kernel("scan_fwd").grid, {**sizes, **manifest.constants(kda)}) == (3 * 4, 8)
    assert grids["output_fwd"] == (19 * 2, 8) and grids["state_fwd"] == (3 * 2, 8)
    assert grids["chunk_table"] == (1,) and grids["intra_fwd"] == (19, 8)
    assert manifest.dims_text(mod.kernel("output_fwd").grid) == "NCH*NVP×HV"
    assert manifest.resolve(("N+1", ("TT", 64)), sizes) == (4, 16)


def test_a_missing_buffer_names_the_kernel_and_parameter():
    """A kernel launched before what it reads exists: a clear error, not a bare KeyError."""
    op = compile(specs.GDN)
    gen, mod = op.module("fp32", 16, 16)
    env = {"TT": 64, "N": 1, "NCH": 1, "H": 1, "HV": 1, "GROUP": 1, "scale": 1.0}
    with pytest.raises(RuntimeError, match=r"gdn_output_fwd: no value for its parameter 'q'"):
        op._launch(gen, mod, ["output_fwd"], env, torch.device("cpu"))


@pytest.mark.parametrize("spec, dtype", [(specs.KIMI_KDA, torch.float16), (specs.QWEN3_NEXT_GDN, torch.bfloat16),
                                         (specs.NEMOTRON_MAMBA2, torch.float32)], ids=lambda x: getattr(x, "name", str(x)))
def test_fake_outputs_match_the_real_ones(spec, dtype):
    """The custom op's fake implementation (read from the manifest) gives the real outputs' shapes and dtypes."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from linattn import custom_ops
    from linattn.testing import random_inputs

    op = compile(spec)
    x = random_inputs(spec, B=2, T=20, H=1, HV=2, K=16, V=16, dtype=dtype, h0=True)
    tensors = [x.kwargs[o.name] for o in spec.operands if o.role.value != "scalar"]
    scalars = [float(x.kwargs[o.name]) for o in spec.operands if o.role.value == "scalar"]
    args = (op.key, x.q, x.k, x.v, tensors, scalars, x.kwargs.get("z"), x.kwargs.get("D"),
            x.kwargs["initial_state"], None, 0.25, True)
    real = torch.ops.linattn.forward(*args)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = torch.ops.linattn.forward(*[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args])
    assert len(real) == len(fake) == 2 + len(custom_ops.SAVED)
    for r, f in zip(real, fake):
        assert (tuple(r.shape), r.dtype) == (tuple(f.shape), f.dtype)
