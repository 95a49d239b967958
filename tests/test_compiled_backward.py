"""Gradients of compiled ops: stage by stage against autograd through the chunkwise
reference, and end to end against autograd through the float64 oracle."""
import math

import pytest
import torch

import linattn
from linattn import specs
from linattn.reference import recurrent

from helpers import ALL_BUILTIN, assert_close, make_inputs, random_spec

_OPS: dict = {}


def compiled(spec, **options):
    key = (spec, tuple(sorted(options.items())))
    if key not in _OPS:
        _OPS[key] = linattn.compile(spec, **options)
    return _OPS[key]


def _param(name: str, spec) -> bool:
    """Per-head parameters: their gradient is a sum over every token (and channel), so its
    relative error is that of the per-token gradients times the cancellation in the sum."""
    return any(o.name == name and o.role.value.startswith("head") for o in spec.operands)


def grads_of(fn, spec, x, weights, **opts):
    o, s = fn(spec, x.q, x.k, x.v, output_final_state=True, **x.kwargs, **opts)
    loss = (o.double() * weights[0]).sum() + (s.double() * weights[1]).sum()
    names, tensors = zip(*x.tensors().items())
    return dict(zip(names, torch.autograd.grad(loss, tensors)))


def check_grads(spec, x, tol, param_tol, **options):
    x.requires_grad_()
    op = compiled(spec, **options)
    with torch.no_grad():
        o, s = op(x.q, x.k, x.v, output_final_state=True, **x.kwargs)
    g = torch.Generator().manual_seed(7)
    weights = (torch.randn(o.shape, generator=g, dtype=torch.float64), torch.randn(s.shape, generator=g, dtype=torch.float64))
    out = grads_of(lambda sp, *a, **k: op(*a, **k), spec, x, weights)
    x64 = make_inputs.__globals__["Inputs"](
        x.q.detach().double(), x.k.detach().double(), x.v.detach().double(),
        {n: (t.detach().double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t) for n, t in x.kwargs.items()},
    ).requires_grad_()
    ref = grads_of(recurrent, spec, x64, weights)
    assert set(out) == set(ref)
    for name in ref:
        assert out[name].dtype == x.tensors()[name].dtype, f"d{name} has dtype {out[name].dtype}"
        assert ref[name].abs().sum() > 0, f"d{name} vanishes: the test would not see it"
        assert_close(f"d{name} ({spec.name})", out[name], ref[name], param_tol if _param(name, spec) else tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("spec", ALL_BUILTIN, ids=lambda s: s.name)
def test_builtin_gradients(spec, dtype):
    """Grouped value heads (q/k gradients summed over the group), T not a multiple of the
    chunk, an initial state and a final-state gradient."""
    x = make_inputs(spec, B=2, T=100, H=1, HV=2, K=32, V=16, dtype=dtype, h0=True, strength=3.0, seed=3)
    if dtype == torch.float32:
        check_grads(spec, x, 1e-4, 1e-4)
    else:
        check_grads(spec, x, 2e-2, 2e-2)


@pytest.mark.parametrize("seed", range(6))
def test_random_spec_gradients(seed):
    spec = random_spec(2000 + seed)
    g = torch.Generator().manual_seed(seed)
    T = int(torch.randint(2, 90, (1,), generator=g))
    x = make_inputs(spec, B=2, T=T, H=1, HV=2, K=16, V=16, dtype=torch.float32, h0=True, seed=seed)
    check_grads(spec, x, 1e-4, 2e-4, chunk_size=[16, 32, 64][seed % 3])


@pytest.mark.parametrize("spec", [specs.KDA, specs.QWEN3_NEXT_GDN, specs.NEMOTRON_MAMBA2], ids=lambda s: s.name)
def test_varlen_gradients(spec):
    x = make_inputs(spec, lengths=[37, 64, 1, 30], H=1, HV=2, K=16, V=16, dtype=torch.float32, h0=True, seed=4)
    check_grads(spec, x, 1e-4, 2e-4)


@pytest.mark.parametrize(
    "spec, fused",
    [(specs.GDN, False), (specs.KDA, None), (specs.GLA, None), (specs.NEMOTRON_MAMBA2, None)],
    ids=lambda x: getattr(x, "name", str(x)),
)
def test_v_tile_gradients(spec, fused):
    """V walked in several tiles, of two widths: the state passes' 16 columns (block_v) and
    the chunk-parallel products' 32 (product_block_v), at V = 64: every kernel's V loop or V
    grid axis against the oracle, forward and gradients (with and without the output kernel)."""
    x = make_inputs(spec, lengths=[37, 50], H=1, HV=2, K=16, V=64, dtype=torch.float32, h0=True, seed=5)
    op = compiled(spec, block_v=16, product_block_v=32, fused_output=fused)
    assert (op.plan("fp32", 16, 64).NV, op.plan("fp32", 16, 64).NVP) == (4, 2)
    check_grads(spec, x, 1e-4, 2e-4, block_v=16, product_block_v=32, fused_output=fused)


@pytest.mark.parametrize(
    "decay,correction,skip,gate",
    [("scalar", "delta", "head", "none"), ("none", "delta", "channel", "silu"), ("scalar", "none", "head", "silu"),
     ("channel", "delta", "head", "none"), ("channel", "none", "channel", "none")],
)
def test_skip_gradients(decay, correction, skip, gate):
    """The D skip in each kernel that writes dv (the one-pass chunk kernel with and without the
    delta rule, the WY form's) and in the layer-side path (channel decay without it), alone and
    under an output gate: dD from per-chunk partial sums, dv with D ⊙ dO added in the kernel."""
    spec = linattn.Spec(decay=decay, correction=correction, skip=skip, output_gate=gate, beta=correction == "delta",
                        name=f"skip_{decay}_{correction}_{skip}_{gate}")
    x = make_inputs(spec, lengths=[37, 70], H=1, HV=2, K=16, V=16, dtype=torch.float32, h0=True, seed=12)
    check_grads(spec, x, 1e-4, 2e-4, chunk_size=32)


@pytest.mark.parametrize("spec", [specs.KDA, specs.GDN, specs.GLA], ids=lambda s: s.name)
def test_strong_decay_gradients(spec):
    x = make_inputs(spec, B=1, T=100, H=1, K=32, V=16, dtype=torch.float32, h0=True, strength=20.0, seed=5)
    check_grads(spec, x, 2e-4, 2e-4)


def _ref_layout(x: torch.Tensor, T: int) -> torch.Tensor:
    """[1, HV, NC, C, X] (reference chunks) -> [T, HV, X] (kernel buffers)."""
    _, HV, NC, C, X = x.shape
    return x[0].permute(1, 2, 0, 3).reshape(NC * C, HV, X)[:T]


@pytest.mark.parametrize("spec", [specs.KDA, specs.GDN, specs.DELTANET, specs.GLA, specs.SIMPLE_GLA], ids=lambda s: s.name)
def test_stages_against_chunkwise_autograd(spec):
    """Each backward stage's buffer equals autograd's gradient of the same stage of
    reference.chunkwise: dΔ_loc (output part of dΔ), dS' of the first chunk and, where channel
    decay's products kernel reads them from memory, dAqk and dAkk (dW never leaves the chip)."""
    from linattn.reference.chunkwise import chunk_stages

    T, C = 100, 64
    x = make_inputs(spec, B=1, T=T, H=1, K=16, V=16, dtype=torch.float32, h0=True, strength=2.0, seed=6)
    op = compiled(spec)
    call = linattn.inputs.check_call(spec, x.q, x.k, x.v, {n: t for n, t in x.kwargs.items() if n != "initial_state"},
                                     initial_state=x.kwargs["initial_state"])
    saved, stages = {}, {}
    with torch.no_grad():
        o, s = op._forward(call, True, keep=saved)
    g = torch.Generator().manual_seed(1)
    wo, ws = torch.randn(o.shape, generator=g), torch.randn(s.shape, generator=g)
    op._backward(call, saved, wo, ws, stages=stages)

    d = lambda t: t.detach().double().requires_grad_()  # noqa: E731
    q, k, v = d(x.q), d(x.k), d(x.v)
    gg = d(x.kwargs["g"]) if "g" in x.kwargs else None
    bb = d(x.kwargs["beta"]) if "beta" in x.kwargs else None
    h0 = x.kwargs["initial_state"].double()
    kw = dict(decay=spec.decay, delta=spec.has_delta, scale=16**-0.5, chunk_size=C, subchunk_size=16)
    st = chunk_stages(q, k, v, gg, bb, h0, **kw)
    loss = (st.o * wo.double()).sum() + (st.final_state * ws.double()).sum()
    wrt = {"dvl": st.delta, "dAqk": st.intra.Aqk}
    if spec.has_delta:
        wrt.update(dAkk=st.intra.Akk)
    got = dict(zip(wrt, torch.autograd.grad(loss, list(wrt.values()))))
    causal = torch.ones(C, C, dtype=torch.bool).tril()
    assert_close("dΔ_loc", stages["dvl"], _ref_layout(got["dvl"], T), 1e-5)
    assert stages.get("dW") is None  # the WY form's backward shares the kernel that computes dW
    if spec.decay.value == "channel":  # its products kernel takes dAqk and dAkk from memory
        assert_close("dAqk", stages["dAqk"], _ref_layout(got["dAqk"] * causal, T), 1e-5)
        if spec.has_delta:
            assert_close("dAkk", stages["dAkk"], _ref_layout(got["dAkk"] * causal.tril(-1), T), 1e-5)
    else:  # one kernel per chunk: they never reach memory (the op's gradients check them)
        assert all(stages.get(n) is None for n in ("dAqk", "dAkk", "dW"))
        assert stages["dq"] is stages["dqo"] and stages["dk"] is stages["dko"]
    # dS' of chunk 0: the gradient of the state between the two chunks, from a split run
    sl1, sl2 = slice(0, C), slice(C, T)
    part = lambda t, sl: None if t is None else t[:, sl]  # noqa: E731
    mid = chunk_stages(q[:, sl1], k[:, sl1], v[:, sl1], part(gg, sl1), part(bb, sl1), h0, **kw).final_state
    mid = mid.detach().requires_grad_()
    tail = chunk_stages(q[:, sl2], k[:, sl2], v[:, sl2], part(gg, sl2), part(bb, sl2), mid, **kw)
    loss2 = (tail.o * wo[:, sl2].double()).sum() + (tail.final_state * ws.double()).sum()
    (dmid,) = torch.autograd.grad(loss2, [mid])
    assert_close("dS' of chunk 0", stages["dh"][0], dmid[0], 1e-5)
    assert_close("dS' of the last chunk", stages["dh"][1], ws[0], 1e-6)


@pytest.mark.parametrize("spec", [specs.DELTANET, specs.NEMOTRON_MAMBA2, specs.KIMI_KDA], ids=lambda s: s.name)
def test_gradcheck_float64(spec):
    """torch.autograd.gradcheck through the interpreter, everything in float64: in fast mode
    (the Jacobian against random directions on both sides, a handful of evaluations instead
    of two per input element); every gradient is also compared entry by entry with the
    oracle's in the tests above."""
    x = make_inputs(spec, B=1, T=5, H=1, HV=1, K=4, V=4, dtype=torch.float64, h0=True, strength=2.0, seed=8)
    op = compiled(spec, chunk_size=16)
    names = list(x.tensors())

    def f(*tensors):
        t = dict(zip(names, tensors))
        kw = {n: t.get(n, val) for n, val in x.kwargs.items()}
        return op(t["q"], t["k"], t["v"], output_final_state=True, **kw)

    assert torch.autograd.gradcheck(f, tuple(x.requires_grad_().tensors().values()), eps=1e-6, atol=1e-7, rtol=1e-5,
                                    fast_mode=True)


def test_gradient_of_output_only_and_no_initial_state():
    """Without a final state in the loss and without h0 (dht = None, no dh0)."""
    spec = specs.GDN
    x = make_inputs(spec, B=1, T=40, H=1, K=16, V=16, dtype=torch.float32, seed=9).requires_grad_()
    o, _ = compiled(spec)(x.q, x.k, x.v, **x.kwargs)
    o.sum().backward()
    x64 = [t.detach().double().requires_grad_() for t in (x.q, x.k, x.v, x.kwargs["g"], x.kwargs["beta"])]
    o2, _ = recurrent(spec, *x64[:3], g=x64[3], beta=x64[4])
    o2.sum().backward()
    for a, b in zip((x.q, x.k, x.v, x.kwargs["g"], x.kwargs["beta"]), x64):
        assert math.isfinite(a.grad.sum().item())
        assert_close("grad", a.grad, b.grad, 1e-4)


@pytest.mark.parametrize(
    "spec",
    [
        linattn.Spec(decay="scalar", gate=linattn.gates.mamba_gate(limit=True), beta=linattn.gates.mamba_dt(limit=True),
                     default_scale=1.0, name="mamba_dt_limit"),
        linattn.Spec(decay="channel", correction="delta", gate=linattn.gates.lower_bound_gate(), beta=True,
                     name="kda_lower_bound"),
    ],
    ids=lambda s: s.name,
)
def test_gradients_with_scalar_operands(spec):
    """Scalar operands (dt limits, a gate's lower bound) are call arguments without gradients."""
    x = make_inputs(spec, B=1, T=50, H=1, HV=2, K=16, V=16, dtype=torch.float32, h0=True, seed=10)
    check_grads(spec, x, 1e-4, 2e-4)
