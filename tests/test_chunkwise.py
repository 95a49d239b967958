"""The chunkwise reference equals the token-by-token oracle, values and gradients, for any spec."""
import pytest
import torch

from linattn import Spec, specs
from linattn.reference import chunkwise, recurrent
from linattn.reference.chunkwise import _to_chunks, gate_cumsum

from helpers import ALL_BUILTIN, assert_close, make_inputs, random_spec

F64_TOL = 1e-10


def both(spec, x, **opts):
    ref = recurrent(spec, x.q, x.k, x.v, output_final_state=True, **x.kwargs)
    out = chunkwise(spec, x.q, x.k, x.v, output_final_state=True, **x.kwargs, **opts)
    return out, ref


@pytest.mark.parametrize("spec", ALL_BUILTIN, ids=lambda s: s.name)
@pytest.mark.parametrize("T, h0, HV", [(50, False, 2), (128, True, 2), (77, True, 4)])
def test_builtin_forward(spec, T, h0, HV):
    x = make_inputs(spec, B=2, T=T, H=2, HV=HV, K=32, V=16, h0=h0, seed=T)
    (o, s), (o_ref, s_ref) = both(spec, x, chunk_size=32, subchunk_size=8 if T == 77 else 16)
    assert_close("o", o, o_ref, F64_TOL)
    assert_close("final state", s, s_ref, F64_TOL)


@pytest.mark.parametrize("seed", range(24))
def test_random_spec_forward(seed):
    spec = random_spec(seed)
    g = torch.Generator().manual_seed(seed)
    T = int(torch.randint(1, 100, (1,), generator=g))
    H = int(torch.randint(1, 3, (1,), generator=g))
    x = make_inputs(spec, B=2, T=T, H=H, HV=H * int(torch.randint(1, 3, (1,), generator=g)), K=16, V=8, h0=seed % 2 == 0, seed=seed)
    chunk = [16, 32, 64][seed % 3]
    (o, s), (o_ref, s_ref) = both(spec, x, chunk_size=chunk)
    assert_close(f"o ({spec!r}, T={T})", o, o_ref, F64_TOL)
    assert_close("final state", s, s_ref, F64_TOL)


@pytest.mark.parametrize("spec", [specs.KDA, specs.GDN, specs.MAMBA2, specs.DELTANET, specs.GLA], ids=lambda s: s.name)
@pytest.mark.parametrize("lengths", [[37, 64, 1, 90], [128], [3, 3, 70]])
def test_varlen(spec, lengths):
    x = make_inputs(spec, lengths=lengths, H=2, HV=4, K=16, V=8, h0=True, seed=len(lengths))
    (o, s), (o_ref, s_ref) = both(spec, x, chunk_size=32)
    assert s.shape[0] == len(lengths)
    assert_close("o", o, o_ref, F64_TOL)
    assert_close("final state", s, s_ref, F64_TOL)


def _grads(fn, spec, x, weights):
    o, s = fn(spec, x.q, x.k, x.v, output_final_state=True, **x.kwargs)
    loss = (o * weights[0]).sum() + (s * weights[1]).sum()
    names, tensors = zip(*x.tensors().items())
    return dict(zip(names, torch.autograd.grad(loss, tensors)))


def _check_grads(spec, x, **opts):
    x.requires_grad_()
    o, s = recurrent(spec, x.q, x.k, x.v, output_final_state=True, **x.kwargs)
    w = (torch.randn_like(o), torch.randn_like(s))
    ref = _grads(recurrent, spec, x, w)
    out = _grads(lambda *a, **k: chunkwise(*a, **k, **opts), spec, x, w)
    assert set(out) == set(ref)
    for name in ref:
        assert ref[name].abs().sum() > 0 or name == "initial_state", f"d{name} vanishes: the test would not see it"
        assert_close(f"d{name}", out[name], ref[name], F64_TOL)


@pytest.mark.parametrize("spec", ALL_BUILTIN, ids=lambda s: s.name)
def test_builtin_gradients(spec):
    x = make_inputs(spec, B=1, T=45, H=1, HV=2, K=16, V=8, h0=True, seed=7)
    _check_grads(spec, x, chunk_size=16, subchunk_size=8)


@pytest.mark.parametrize("seed", range(100, 112))
def test_random_spec_gradients(seed):
    spec = random_spec(seed)
    x = make_inputs(spec, B=2, T=40, H=1, HV=2, K=8, V=8, h0=True, seed=seed)
    _check_grads(spec, x, chunk_size=16)


def test_varlen_gradients():
    spec = specs.QWEN3_NEXT_GDN
    x = make_inputs(spec, lengths=[20, 5, 33], H=1, HV=2, K=8, V=8, h0=True, seed=9)
    _check_grads(spec, x, chunk_size=16)


@pytest.mark.parametrize("spec", [specs.KDA, specs.GLA, specs.GDN, specs.SIMPLE_GLA], ids=lambda s: s.name)
@pytest.mark.parametrize("strength", [20.0, 8.0, 1e-4])
def test_strong_and_weak_decay_fp32(spec, strength):
    """g in (-strength, 0) per token, with no lower bound: fp32 chunks stay finite and accurate."""
    x64 = make_inputs(spec, B=2, T=128, H=2, K=32, V=16, h0=True, seed=11, strength=strength)
    o_ref, s_ref = recurrent(spec, x64.q, x64.k, x64.v, output_final_state=True, **x64.kwargs)
    cast = {k: (v.float() if isinstance(v, torch.Tensor) else v) for k, v in x64.kwargs.items()}
    o, s = chunkwise(spec, x64.q.float(), x64.k.float(), x64.v.float(), output_final_state=True, **cast)
    assert torch.isfinite(o).all() and torch.isfinite(s).all()
    assert_close("o", o, o_ref, 2e-5)
    assert_close("final state", s, s_ref, 2e-5)


def test_naive_factorization_would_overflow():
    """The strong-decay test has teeth: exp(G_r)·exp(-G_s) over a 64-token chunk is not finite in fp32."""
    x = make_inputs(specs.KDA, B=1, T=64, H=1, K=8, V=4, dtype=torch.float32, seed=11, strength=20.0)
    G = gate_cumsum(_to_chunks(x.kwargs["g"], 64))
    naive = (x.q * 1.0).movedim(2, 1)[:, :, None] * torch.exp(G) @ (torch.exp(-G) * _to_chunks(x.k, 64)).transpose(-1, -2)
    assert not torch.isfinite(naive).all()


def test_bf16_inputs():
    spec = specs.KDA
    x = make_inputs(spec, B=1, T=70, H=2, K=16, V=16, dtype=torch.bfloat16, seed=12, h0=True)
    o, s = chunkwise(spec, x.q, x.k, x.v, output_final_state=True, **x.kwargs)
    assert o.dtype == torch.bfloat16 and s.dtype == torch.float32
    up = {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in x.kwargs.items()}
    o_ref, s_ref = recurrent(spec, x.q.double(), x.k.double(), x.v.double(), output_final_state=True, **up)
    assert_close("o", o, o_ref, 1e-2)
    assert_close("final state", s, s_ref, 1e-5)


def test_chunk_options_are_checked():
    x = make_inputs(specs.GLA, T=8)
    with pytest.raises(ValueError, match="subchunk_size: expected a positive divisor of chunk_size 64"):
        chunkwise(specs.GLA, x.q, x.k, x.v, subchunk_size=24, **x.kwargs)
    with pytest.raises(ValueError, match="chunk_size: expected a positive int"):
        chunkwise(specs.GLA, x.q, x.k, x.v, chunk_size=0, **x.kwargs)


def test_empty_final_state_is_initial_state_free():
    """Without output_final_state no state is returned; with h0 of zeros it equals no h0."""
    spec = Spec(decay="scalar", correction="delta", beta=True)
    x = make_inputs(spec, T=20, seed=13)
    o1, s1 = chunkwise(spec, x.q, x.k, x.v, **x.kwargs)
    o2, _ = chunkwise(spec, x.q, x.k, x.v, initial_state=torch.zeros(2, 2, 16, 8, dtype=torch.float64), **x.kwargs)
    assert s1 is None and torch.equal(o1, o2)
