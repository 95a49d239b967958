"""The compiled kernels on a GPU (skipped without one): forward, backward, varlen, decoding."""
import pytest
import torch

import linattn
from linattn import specs
from linattn.reference import recurrent

from helpers import ALL_BUILTIN, TINY_MODELS, assert_close, make_inputs, tiny_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _to(x, device):
    x.q, x.k, x.v = x.q.to(device), x.k.to(device), x.v.to(device)
    x.kwargs = {n: (t.to(device) if isinstance(t, torch.Tensor) else t) for n, t in x.kwargs.items()}
    return x


def _oracle(spec, x):
    up = {n: (t.double().cpu() if isinstance(t, torch.Tensor) and t.is_floating_point() else
              (t.cpu() if isinstance(t, torch.Tensor) else t)) for n, t in x.kwargs.items()}
    return recurrent(spec, x.q.double().cpu(), x.k.double().cpu(), x.v.double().cpu(), output_final_state=True, **up)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("spec", ALL_BUILTIN, ids=lambda s: s.name)
def test_forward_and_gradients_on_gpu(spec, dtype):
    x = _to(make_inputs(spec, B=2, T=300, H=2, HV=4, K=128, V=128, dtype=dtype, h0=True, strength=3.0, seed=1), "cuda")
    x.requires_grad_()
    o, s = linattn.compile(spec)(x.q, x.k, x.v, output_final_state=True, **x.kwargs)
    tol = 1e-3 if dtype == torch.float32 else 1.5e-2  # fp32 products run as tf32-free ieee
    o_ref, s_ref = _oracle(spec, x)
    assert_close("o", o.cpu(), o_ref, tol)
    assert_close("final state", s.cpu(), s_ref, tol)
    w = torch.randn_like(o)
    (o * w).sum().backward()
    x64 = make_inputs(spec, B=2, T=300, H=2, HV=4, K=128, V=128, dtype=torch.float64, h0=True, strength=3.0, seed=1)
    x64.q, x64.k, x64.v = (t.to(dtype).double() for t in (x64.q, x64.k, x64.v))
    x64.requires_grad_()
    o64, _ = recurrent(spec, x64.q, x64.k, x64.v, **x64.kwargs)
    (o64 * w.double().cpu()).sum().backward()
    for name in ("q", "k", "v"):
        assert_close(f"d{name}", x.tensors()[name].grad.cpu(), x64.tensors()[name].grad, 2e-2 if dtype != torch.float32 else 1e-3)


def test_varlen_and_step_on_gpu():
    spec = specs.KIMI_KDA
    x = _to(make_inputs(spec, lengths=[100, 1, 257], H=2, HV=4, K=128, V=128, dtype=torch.bfloat16, h0=True, seed=2), "cuda")
    o, s = linattn.compile(spec)(x.q, x.k, x.v, output_final_state=True, **x.kwargs)
    o_ref, s_ref = _oracle(spec, x)
    assert_close("o", o.cpu(), o_ref, 1.5e-2)
    assert_close("states", s.cpu(), s_ref, 1.5e-2)
    y = _to(make_inputs(spec, B=8, T=1, H=2, HV=4, K=128, V=128, dtype=torch.bfloat16, h0=True, seed=3), "cuda")
    state = y.kwargs.pop("initial_state").float().contiguous()
    ref_o, ref_s = _oracle(spec, type(y)(y.q, y.k, y.v, {**y.kwargs, "initial_state": state}))
    out = linattn.compile(spec).step(y.q, y.k, y.v, state, **y.kwargs)
    assert_close("step o", out.cpu(), ref_o, 1.5e-2)
    assert_close("step state", state.cpu(), ref_s, 1e-2)


def _model_checks(family: str, device: str) -> None:
    """The model on ``device`` against itself on the CPU (the interpreter), and prefill + decode there."""
    model = tiny_model(family)
    ids = torch.randint(0, 97, (2, 90), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        cpu = model(ids)
        model = model.cast(torch.float32, device)
        ids = ids.to(device)
        full = model(ids)
        assert_close("logits on the device vs the CPU", full.cpu(), cpu, 1e-4)
        cache = model.new_cache()
        parts = [model(ids[:, :70], cache)] + [model(ids[:, i:i + 1], cache) for i in range(70, 90)]
        assert_close("prefill + decode vs full forward", torch.cat(parts, 1).cpu(), full.cpu(), 1e-4)
        bf16 = model.cast(torch.bfloat16, device)
        out = bf16.generate(ids[:, :20], 10)
        assert out.shape == (2, 30) and out.device.type == ids.device.type


@pytest.mark.parametrize("family", sorted(TINY_MODELS))
def test_models_on_gpu(family):
    _model_checks(family, "cuda")
