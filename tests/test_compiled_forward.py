"""The generated forward kernels (through Triton's interpreter) against the float64 oracle."""
import math

import pytest
import torch

import linattn
from linattn import Spec, specs
from linattn.reference import recurrent

from helpers import ALL_BUILTIN, assert_close, make_inputs, random_spec

# relative error to the float64 oracle run on the same (rounded) inputs
TOL = {torch.float32: 2e-5, torch.bfloat16: 1e-2}

_OPS: dict = {}


def compiled(spec: Spec, **options) -> linattn.CompiledOp:
    key = (spec, tuple(sorted(options.items())))
    if key not in _OPS:
        _OPS[key] = linattn.compile(spec, **options)
    return _OPS[key]


def run(op, x):
    with torch.no_grad():
        return op(x.q, x.k, x.v, output_final_state=True, **x.kwargs)


def oracle(spec, x):
    up = {n: (t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t) for n, t in x.kwargs.items()}
    return recurrent(spec, x.q.double(), x.k.double(), x.v.double(), output_final_state=True, **up)


def check(spec, x, tol, **options):
    o, s = run(compiled(spec, **options), x)
    o_ref, s_ref = oracle(spec, x)
    assert o.dtype == x.q.dtype and s.dtype == torch.float32
    assert_close(f"o ({spec.name})", o, o_ref, tol)
    assert_close(f"final state ({spec.name})", s, s_ref, tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("spec", ALL_BUILTIN, ids=lambda s: s.name)
def test_builtin(spec, dtype):
    """Grouped value heads, T not a multiple of the chunk, an initial state."""
    x = make_inputs(spec, B=2, T=100, H=2, HV=4, K=32, V=16, dtype=dtype, h0=True, strength=3.0, seed=1)
    check(spec, x, TOL[dtype])


@pytest.mark.parametrize("seed", range(8))
def test_random_spec(seed):
    spec = random_spec(1000 + seed)
    g = torch.Generator().manual_seed(seed)
    T = int(torch.randint(1, 90, (1,), generator=g))
    x = make_inputs(spec, B=2, T=T, H=1, HV=2, K=16, V=32, dtype=torch.float32, h0=seed % 2 == 0, seed=seed)
    check(spec, x, TOL[torch.float32], chunk_size=[16, 32, 64][seed % 3])


@pytest.mark.parametrize("spec", [specs.KDA, specs.GDN, specs.NEMOTRON_MAMBA2], ids=lambda s: s.name)
def test_varlen(spec):
    x = make_inputs(spec, lengths=[37, 64, 1, 90], H=2, HV=2, K=32, V=16, dtype=torch.float32, h0=True, seed=2)
    o, s = run(compiled(spec), x)
    assert s.shape == (4, 2, 32, 16)
    o_ref, s_ref = oracle(spec, x)
    assert_close("o", o, o_ref, TOL[torch.float32])
    assert_close("final states", s, s_ref, TOL[torch.float32])


@pytest.mark.parametrize("spec", [specs.KDA, specs.GLA, specs.GDN, specs.SIMPLE_GLA], ids=lambda s: s.name)
def test_strong_decay(spec):
    """g down to -20 per token, no lower bound: every exp factor of the kernels stays <= 1."""
    x = make_inputs(spec, B=1, T=128, H=2, K=32, V=16, dtype=torch.float32, h0=True, strength=20.0, seed=3)
    check(spec, x, 1e-4)


@pytest.mark.parametrize("beta", [1e-4, 1 - 1e-4])
@pytest.mark.parametrize("spec", [specs.KDA, specs.DELTANET], ids=lambda s: s.name)
def test_beta_extremes(spec, beta):
    x = make_inputs(spec, B=1, T=70, H=1, K=32, V=16, dtype=torch.float32, h0=True, seed=4)
    x.kwargs["beta"] = torch.full_like(x.kwargs["beta"], beta)
    check(spec, x, TOL[torch.float32])


def test_odd_head_sizes_and_v_tiles():
    """K and V not powers of two; V spread over several tiles."""
    spec = specs.KDA
    x = make_inputs(spec, B=1, T=40, H=1, K=24, V=40, dtype=torch.float32, h0=True, seed=5)
    check(spec, x, TOL[torch.float32], block_v=16)


@pytest.mark.parametrize("spec", [specs.KDA, specs.GDN, specs.MAMBA2], ids=lambda s: s.name)
def test_causality(spec):
    """Changing inputs after position t leaves outputs up to t bit-identical."""
    x = make_inputs(spec, B=1, T=100, H=1, HV=2, K=16, V=16, dtype=torch.bfloat16, seed=6)
    o, _ = run(compiled(spec), x)
    for t in (40, 63, 64):
        y = make_inputs(spec, B=1, T=100, H=1, HV=2, K=16, V=16, dtype=torch.bfloat16, seed=60 + t)
        z = make_inputs(spec, B=1, T=100, H=1, HV=2, K=16, V=16, dtype=torch.bfloat16, seed=6)
        z.q[:, t + 1 :], z.k[:, t + 1 :], z.v[:, t + 1 :] = y.q[:, t + 1 :], y.k[:, t + 1 :], y.v[:, t + 1 :]
        for name, val in z.kwargs.items():
            if isinstance(val, torch.Tensor) and val.dim() >= 3:
                val[:, t + 1 :] = y.kwargs[name][:, t + 1 :]
        o2, _ = run(compiled(spec), z)
        assert torch.equal(o[:, : t + 1], o2[:, : t + 1]), f"outputs before {t + 1} changed"
        assert not torch.equal(o[:, t + 1 :], o2[:, t + 1 :])


@pytest.mark.parametrize("spec", [specs.KIMI_KDA, specs.GDN], ids=lambda s: s.name)
def test_every_output_written(spec, monkeypatch):
    """Buffers and outputs start as NaN (index tables as garbage): the results must not change
    (every element is written)."""
    import linattn.op

    x = make_inputs(spec, lengths=[20, 45], H=1, HV=2, K=16, V=16, dtype=torch.float32, h0=True, seed=7)
    clean = run(compiled(spec), x)

    def poisoned_alloc(shape, dtype, device):
        return torch.full(shape, math.nan if dtype.is_floating_point else -(2**30), dtype=dtype, device=device)

    monkeypatch.setattr(linattn.op, "_alloc", poisoned_alloc)
    poisoned = run(compiled(spec), x)
    assert torch.equal(clean[0], poisoned[0]) and torch.equal(clean[1], poisoned[1])


@pytest.mark.parametrize(
    "spec, dtype",
    [(specs.KIMI_KDA, torch.float32), (specs.QWEN3_NEXT_GDN, torch.float32), (specs.GLA, torch.bfloat16)],
    ids=lambda x: getattr(x, "name", str(x)),
)
def test_several_key_blocks(spec, dtype):
    """K = 80 pads to 128: two key blocks of 64 (one of them partial) in every kernel."""
    x = make_inputs(spec, B=1, T=70, H=1, HV=2, K=80, V=24, dtype=dtype, h0=True, strength=3.0, seed=8)
    check(spec, x, TOL[dtype])


def test_generated_source_holds_only_the_specs_terms():
    def source(spec):
        return compiled(spec).module("bf16", 64, 64)[0].source

    lin = source(specs.LINEAR)
    assert "tl.exp" not in lin and "_intra_fwd(" not in lin and "_gates_fwd(" not in lin
    delta = source(specs.DELTANET)
    assert "tl.exp" not in delta and "b_T00" in delta and "def deltanet_wu_fwd(" in delta
    gla = source(specs.GLA)
    assert "b_Gref" in gla and "b_T00" not in gla and "_wu_fwd(" not in gla
    gdn = source(specs.GDN)
    assert "b_Gref" not in gdn and "b_T00" in gdn and "rsqrt" not in gdn
    qwen = source(specs.QWEN3_NEXT_GDN)
    assert "rsqrt" in qwen and "tl.log(1.0 + tl.exp(" in qwen  # the fused softplus gate
    mamba = source(specs.NEMOTRON_MAMBA2)
    assert "tl.load(D + i_h)" in mamba and "b_T00" not in mamba


def test_cache_keys_on_structure_not_sizes(tmp_path, monkeypatch):
    monkeypatch.setenv("LINATTN_CACHE_DIR", str(tmp_path))
    op = linattn.compile(specs.GDN.replace(name="cache-test"))
    for B, T in [(1, 10), (2, 70), (1, 33)]:
        x = make_inputs(op.spec, B=B, T=T, H=1, K=16, V=16, dtype=torch.float32, seed=B * T)
        run(op, x)
    files = list(tmp_path.glob("*.py"))
    assert len(files) == 1 and files[0].read_text() == op.source
    assert len(op._modules) == 1
    # the same structure under another label shares the file's key
    same = linattn.compile(specs.GDN)
    assert same.plan("fp32", 16, 16).key() == op.plan("fp32", 16, 16).key()
    assert op.plan("fp32", 16, 32).key() != op.plan("fp32", 16, 16).key()


def test_call_errors():
    op = compiled(specs.GDN)
    x = make_inputs(specs.GDN, B=1, T=8, H=1, K=16, V=16, dtype=torch.float32)
    with pytest.raises(ValueError, match="g: expected shape"):
        run(op, x.__class__(x.q, x.k, x.v, {**x.kwargs, "g": x.v}))
    with pytest.raises(ValueError, match="chunk_size: expected a power of two >= 16"):
        linattn.compile(specs.GDN, chunk_size=48)
    with pytest.raises(ValueError, match=r"compile: unknown option\(s\) 'chunks' \(did you mean 'chunk_size'\?\); valid options: chunk_size"):
        linattn.compile(specs.GDN, chunks=64)
    with pytest.raises(ValueError, match="spec: expected a linattn.Spec"):
        linattn.compile("GDN")
    with pytest.raises(ValueError, match="K: head size must be in"):
        compiled(specs.GDN).plan("bf16", 512, 64)


@pytest.mark.parametrize("spec", [specs.KDA, specs.GDN], ids=lambda s: s.name)
def test_largest_heads_and_fp16(spec):
    """K = V = 256 (four key blocks, four V tiles) with fp16 inputs."""
    x = make_inputs(spec, B=1, T=40, H=1, K=256, V=256, dtype=torch.float16, h0=True, seed=9)
    check(spec, x, 5e-3)


@pytest.mark.parametrize("fused", [True, False], ids=["scan", "state+output"])
@pytest.mark.parametrize(
    "spec", [specs.KIMI_KDA, specs.QWEN3_NEXT_GDN, specs.NEMOTRON_MAMBA2, specs.DELTANET, specs.GLA], ids=lambda s: s.name
)
def test_fused_and_separate_output(spec, fused):
    """The forward with the output written by the state pass (``scan``) and by its own kernel,
    whichever the default picks: packed sequences, one ending mid-chunk, an initial state, two V tiles."""
    x = make_inputs(spec, lengths=[37, 70], H=1, HV=2, K=32, V=40, dtype=torch.float32, h0=True, strength=3.0, seed=9)
    check(spec, x, TOL[torch.float32], fused_output=fused, block_v=32)


@pytest.mark.parametrize("spec", [specs.GDN, specs.KIMI_KDA], ids=lambda s: s.name)
def test_scan_wide_keys(spec):
    """The scan with more than 128 key channels (four state blocks) takes the output, and with
    channel decay the state update, a sub-chunk's rows at a time: sequences ending mid-chunk."""
    x = make_inputs(spec, lengths=[21, 50], H=1, HV=1, K=136, V=16, dtype=torch.float32, h0=True, strength=3.0, seed=4)
    check(spec, x, TOL[torch.float32], fused_output=True)


def test_fused_output_default():
    """The scan where Aqk is stored and the state pass has a program for every SM (in the
    interpreter: always), the separate output kernel elsewhere; a bad option value is
    refused by name."""
    from linattn.inspection import captured_launches

    # a capture on meta tensors plans for an H100 (132 SMs): 4 x 48 value heads x 1 V tile fill it, 2 x 48 do not
    cases = ((specs.GDN, 4, 16, True), (specs.KIMI_KDA, 4, 16, True), (specs.GDN, 2, 16, False),
             (specs.MAMBA2, 4, 16, False), (specs.GDN, 4, 256, True), (specs.KDA, 4, 256, True))
    for spec, B, K, fused in cases:
        launches = captured_launches(spec, "fp32", K, K, T=20, H=48, HV=48, B=B, packed=0, step=False)
        names = {launch.kernel.name for launch in launches}
        assert ("scan_fwd" in names) == fused and ({"state_fwd", "output_fwd"} <= names) != fused, (spec.name, B, names)
    with pytest.raises(ValueError, match="fused_output"):
        linattn.compile(specs.GDN, fused_output="yes")
