"""Bad arguments are ValueErrors that name the argument, before any computation."""
import warnings

import pytest
import torch

import linattn
from linattn import specs
from linattn.reference import chunkwise, recurrent


def compiled(spec, q, k, v, **kwargs):
    """The compiled op: the same checks, before any kernel runs."""
    return linattn.compile(spec)(q, k, v, **kwargs)

from helpers import make_inputs


def _call(spec, x, fn=recurrent, **changes):
    kw = dict(x.kwargs)
    q, k, v = changes.pop("q", x.q), changes.pop("k", x.k), changes.pop("v", x.v)
    for name, value in changes.items():
        if value is _DROP:
            kw.pop(name)
        else:
            kw[name] = value
    return fn(spec, q, k, v, **kw)


_DROP = object()
_x = make_inputs(specs.NEMOTRON_MAMBA2, B=2, T=6, H=2, HV=4, K=4, V=3, h0=True)
_f32 = make_inputs(specs.KIMI_KDA, B=1, T=6, H=1, HV=2, K=4, V=3)


@pytest.mark.parametrize("fn", [recurrent, chunkwise, compiled])
@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(q=_x.q[0]), r"q: expected a 4-D tensor \[B, T, H, K\]"),
        (dict(q=_x.q.numpy()), "q: expected a torch.Tensor"),
        (dict(k=_x.k[:, :5]), r"k: expected shape \[2, 6, 2, 4\]"),
        (dict(v=_x.v[:1]), "v: expected batch and length"),
        (dict(v=torch.zeros(2, 6, 3, 3, dtype=torch.float64)), "v: its 3 heads must be a multiple of q/k's 2 heads"),
        (dict(q=_x.q.to(torch.int64)), "q: expected a floating dtype"),
        (dict(k=_x.k.float()), "q, k, v must share one dtype"),
        (dict(dt=_DROP), r"missing argument\(s\) \['dt'\]"),
        (dict(g=_x.v), r"unexpected argument\(s\) \['g'\]"),
        (dict(dt=_x.kwargs["dt"][..., None]), r"dt: expected shape \[2, 6, 4\] \(\[B, T, HV\]\)"),
        (dict(A=torch.zeros(3, dtype=torch.float64)), r"A: expected shape \[4\] \(\[HV\]\)"),
        (dict(D=_DROP), "D: required by the spec's D skip"),
        (dict(D=torch.zeros(4, 3, dtype=torch.float64)), r"D: expected shape \[4\]"),
        (dict(z=_x.v), "z: given, but the spec has no output gate"),
        (dict(scale=-1.0), "scale: expected a positive finite number"),
        (dict(initial_state=torch.zeros(2, 2, 3, 4, dtype=torch.float64)), r"initial_state: expected shape \[2, 4, 4, 3\]"),
        (dict(cu_seqlens=torch.tensor([0, 6], dtype=torch.int32)), "cu_seqlens: packed sequences need batch size 1"),
    ],
)
def test_bad_arguments(fn, changes, message):
    with pytest.raises(ValueError, match=message):
        _call(specs.NEMOTRON_MAMBA2, _x, fn, **changes)


@pytest.mark.parametrize("fn", [recurrent, chunkwise, compiled])
@pytest.mark.parametrize(
    "changes, message",
    [
        (
            dict(cu_seqlens=torch.tensor([0.0, 2.0, 6.0])),
            "cu_seqlens: expected dtype torch.int32 or torch.int64, got torch.float32",
        ),
        (dict(cu_seqlens=torch.tensor([0, 2, 6], dtype=torch.int16)), "expected dtype torch.int32 or torch.int64"),
        (dict(cu_seqlens=torch.tensor([[0, 6]], dtype=torch.int32)), r"cu_seqlens: expected a 1-D tensor \[N \+ 1\]"),
        (dict(cu_seqlens=torch.tensor([1, 6], dtype=torch.int32)), "cu_seqlens: must start at 0"),
        (dict(cu_seqlens=torch.tensor([0, 4, 4, 6], dtype=torch.int32)), "cu_seqlens: must be strictly increasing"),
        (dict(cu_seqlens=torch.tensor([0, 2, 5], dtype=torch.int32)), "cu_seqlens: last entry must equal the packed length T = 6"),
        (dict(a=_f32.kwargs["a"][..., 0]), r"a: expected shape \[1, 6, 2, 4\] \(\[B, T, HV, K\]\)"),
        (dict(dt_bias=torch.zeros(2, dtype=torch.float64)), r"dt_bias: expected shape \[2, 4\] \(\[HV, K\]\)"),
        (dict(b=3.0), "b: expected a torch.Tensor, got float"),
    ],
)
def test_bad_varlen_and_channel_arguments(fn, changes, message):
    with pytest.raises(ValueError, match=message):
        _call(specs.KIMI_KDA, _f32, fn, **changes)


def test_scalar_operand_must_be_a_number():
    from linattn import Spec, gates

    spec = Spec(decay="channel", gate=gates.lower_bound_gate())
    x = make_inputs(spec, T=4)
    with pytest.raises(ValueError, match="lower_bound: expected a Python number, got Tensor"):
        _call(spec, x, lower_bound=torch.tensor(-5.0))


def test_device_mismatch_is_named():
    x = make_inputs(specs.GDN, T=4)
    meta = torch.zeros(x.kwargs["g"].shape, dtype=torch.float64, device="meta")
    with pytest.raises(ValueError, match="g: on meta, but q is on cpu"):
        _call(specs.GDN, x, g=meta)


def _check(spec, x, **changes):
    kw = {n: t for n, t in x.kwargs.items() if n != "initial_state"}
    kw.update(changes)
    return linattn.inputs.check_call(spec, x.q, x.k, x.v, kw, initial_state=x.kwargs.get("initial_state"))


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_cu_seqlens_int32_and_int64_pass(dtype):
    x = make_inputs(specs.GDN, B=1, T=6, H=1, K=4, V=4)
    cu = torch.tensor([0, 2, 6], dtype=dtype)
    operands = {"g": x.kwargs["g"], "beta": x.kwargs["beta"]}
    call = linattn.inputs.check_call(specs.GDN, x.q, x.k, x.v, operands, cu_seqlens=cu)
    assert call.cu_seqlens is cu and call.n_seqs == 2 and call.segments() == [(0, 0, 2), (0, 2, 6)]
    with pytest.raises(ValueError, match="cu_seqlens: must be strictly increasing"):
        bad = torch.tensor([0, 3, 3, 6], dtype=dtype)
        linattn.inputs.check_call(specs.GDN, x.q, x.k, x.v, operands, cu_seqlens=bad)


def test_operand_shape_error_names_the_role_and_lists_the_roles():
    """A gate operand declared 'token' but given per channel: the message says what to write."""
    from linattn import Spec, term

    spec = Spec(decay="channel", gate=term("-exp(A_log) * softplus(a)", a="token", A_log="head"))
    x = make_inputs(specs.KIMI_KDA, B=1, T=6, H=1, HV=2, K=4, V=3)
    ok = make_inputs(spec, B=1, T=6, H=1, HV=2, K=4, V=3)
    assert _check(spec, ok).operands["a"].shape == (1, 6, 2)  # one gate for every channel is legal
    with pytest.raises(ValueError) as info:
        _check(spec, ok, a=x.kwargs["a"])
    msg = str(info.value)
    assert msg.startswith("a: expected shape [1, 6, 2] ([B, T, HV]) for its role 'token', got [1, 6, 2, 4]")
    assert "fits role 'token_channel' (a='token_channel' in the term)" in msg
    assert "token [B, T, HV], token_channel [B, T, HV, K], head [HV], head_channel [HV, K], scalar" in msg
    message = r"A_log: expected shape \[2\] \(\[HV\]\) for its role 'head'.*head_channel \[HV, K\]"
    with pytest.raises(ValueError, match=message):
        _check(spec, ok, A_log=torch.zeros(2, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"a: expected a torch.Tensor, got float; its role 'token' takes \[B, T, HV\]"):
        _check(spec, ok, a=1.0)


def _layout_call(T, H, **kwargs):
    x = make_inputs(specs.GDN, B=1, T=T, H=H, K=4, V=4)
    kw = {"g": x.kwargs["g"], "beta": x.kwargs["beta"]}
    return linattn.inputs.check_call(specs.GDN, x.q, x.k, x.v, kw, **kwargs)


def test_head_first_layout_warning():
    message = r"layout is \[B, T, H, K\], but q has T=3 < H=8: did you pass \[B, H, T, K\]\?"
    with pytest.warns(UserWarning, match=message):
        _layout_call(3, 8, warn_layout=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _layout_call(3, 8)  # off by default (a decode step has T = 1)
        _layout_call(1, 8)
        _layout_call(8, 8, warn_layout=True)
        _layout_call(9, 4, warn_layout=True)
        _layout_call(3, 8, warn_layout=True, cu_seqlens=torch.tensor([0, 1, 3], dtype=torch.int32))
