"""The guarantees of the README's "Guarantees and limits": state pools, packed tables that
are never stale, inference mode, non-finite inputs, resets, fp16 range, int64 bounds."""
import math

import pytest
import torch

import linattn
from linattn import specs
from linattn.ops import chunk_gated_delta_rule
from linattn.spec import Role
from linattn.reference import recurrent

from helpers import assert_close, make_inputs

_OPS: dict = {}


def compiled(spec):
    if spec not in _OPS:
        _OPS[spec] = linattn.compile(spec)
    return _OPS[spec]


def run(spec, x, **kw):
    with torch.no_grad():
        return compiled(spec)(x.q, x.k, x.v, output_final_state=True, **{**x.kwargs, **kw})


def oracle(spec, x):
    up = {n: (t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t) for n, t in x.kwargs.items()}
    return recurrent(spec, x.q.double(), x.k.double(), x.v.double(), output_final_state=True, **up)


# ----------------------------------------------------------------------------- state pools
def _step_inputs(spec, N, seed=0):
    x = make_inputs(spec, B=N, T=1, H=1, HV=2, K=16, V=16, dtype=torch.float32, seed=seed)
    return x


def _step(spec, x, state, idx):
    return compiled(spec).step(x.q, x.k, x.v, state, state_indices=idx, **x.kwargs)


@pytest.mark.parametrize("spec", [specs.GDN, specs.KIMI_KDA], ids=lambda s: s.name)
def test_pool_padding_slot_skips_the_sequence(spec):
    """Slot -1: zero outputs and no state row touched; the other sequences are unaffected."""
    x = _step_inputs(spec, 3)
    pool = torch.randn(5, 2, 16, 16, generator=torch.Generator().manual_seed(1))
    before = pool.clone()
    o = _step(spec, x, pool, torch.tensor([3, -1, 0], dtype=torch.int32))
    assert torch.equal(o[1], torch.zeros_like(o[1]))
    assert torch.equal(pool[[1, 2, 4]], before[[1, 2, 4]]), "rows of no live sequence changed"
    # the live ones: as if run on their own rows
    alone = before[[3, 0]].clone()
    sub = type(x)(x.q[[0, 2]], x.k[[0, 2]], x.v[[0, 2]],
                  {n: (t[[0, 2]] if isinstance(t, torch.Tensor) and t.dim() >= 3 else t) for n, t in x.kwargs.items()})
    o_alone = compiled(spec).step(sub.q, sub.k, sub.v, alone, **sub.kwargs)
    assert torch.equal(o[[0, 2]], o_alone)
    assert torch.equal(pool[[3, 0]], alone)


@pytest.mark.parametrize("bad", [5, 7, -2, 10**6, -(10**6)])
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64], ids=str)
def test_pool_slot_outside_raises(bad, dtype):
    spec = specs.GDN
    x = _step_inputs(spec, 2)
    pool = torch.zeros(5, 2, 16, 16)
    with pytest.raises(ValueError, match="state_indices"):
        _step(spec, x, pool, torch.tensor([0, bad], dtype=dtype))
    assert torch.equal(pool, torch.zeros_like(pool)), "the pool was written before the error"


def test_pool_kernel_masks_slots_outside(monkeypatch):
    """What CUDA relies on (no host check there): the kernel itself never reads or writes
    outside the pool. The pool is a view inside a larger tensor whose guard rows must not change."""
    import linattn.op

    monkeypatch.setattr(linattn.op, "_check_state_indices", lambda *a: None)
    spec = specs.GDN
    x = _step_inputs(spec, 4)
    big = torch.randn(9, 2, 16, 16, generator=torch.Generator().manual_seed(2))
    guard = big.clone()
    pool = big[2:7]  # 5 rows; rows 0-1 and 7-8 of `big` are outside it
    o = _step(spec, x, pool, torch.tensor([1, 5, -3, 10**6], dtype=torch.int64))
    assert torch.equal(big[:2], guard[:2]) and torch.equal(big[7:], guard[7:]), "wrote outside the pool"
    assert torch.equal(big[[2, 4, 5, 6]], guard[[2, 4, 5, 6]])
    assert not torch.equal(big[3], guard[3])  # slot 1 of the pool: the live sequence
    assert torch.equal(o[1:], torch.zeros_like(o[1:]))


# ----------------------------------------------------------------------------- packed tables
def _packed(spec, lengths, seed):
    return make_inputs(spec, lengths=lengths, H=1, HV=2, K=16, V=16, dtype=torch.float32, seed=seed)


@pytest.mark.parametrize("write", ["data", "numpy", "copy_under_no_grad", "inference_mode"])
def test_reused_cu_seqlens_buffer_is_never_stale(write):
    """A serving engine rewrites one cu_seqlens buffer in place every step, by means that
    do not bump the version counter: each call must see the new contents."""
    spec = specs.GDN
    x = _packed(spec, [30, 34], seed=3)
    cu = x.kwargs.pop("cu_seqlens").clone()
    first, _ = run(spec, x, cu_seqlens=cu)
    new = torch.tensor([0, 50, 64], dtype=torch.int32)
    if write == "data":
        cu.data[:] = new
    elif write == "numpy":
        cu.numpy()[:] = new.numpy()
    elif write == "copy_under_no_grad":
        with torch.no_grad():
            cu.copy_(new)
    else:
        with torch.inference_mode():
            cu.copy_(new)
    second, _ = run(spec, x, cu_seqlens=cu)
    fresh, _ = run(spec, x, cu_seqlens=new.clone())
    assert torch.equal(second, fresh)
    assert not torch.equal(first, second)


@pytest.mark.parametrize("made_inside", [False, True])
@pytest.mark.parametrize("cu_dtype", [torch.int32, torch.int64], ids=str)
def test_packed_calls_under_inference_mode(cu_dtype, made_inside):
    """The compiled op and the drop-in ops under torch.inference_mode(), with int32 and int64
    cu_seqlens made inside or outside it."""
    spec = specs.QWEN3_NEXT_GDN
    x = _packed(spec, [20, 37], seed=4)
    cu32 = x.kwargs.pop("cu_seqlens")
    ref, _ = run(spec, x, cu_seqlens=cu32)

    def make_cu():
        return cu32.to(cu_dtype)

    cu = None if made_inside else make_cu()
    with torch.inference_mode():
        cu = make_cu() if made_inside else cu
        o, ht = compiled(spec)(x.q, x.k, x.v, cu_seqlens=cu, output_final_state=True, **x.kwargs)
        o2, _ = chunk_gated_delta_rule(
            x.q, x.k, x.v, x.kwargs["a"], x.kwargs["b"], use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True,
            A_log=x.kwargs["A_log"], dt_bias=x.kwargs["dt_bias"], use_beta_sigmoid_in_kernel=True, cu_seqlens=cu,
        )
    assert torch.equal(o, ref)
    assert torch.equal(o2, ref)
    # and a training call afterwards, with tables made under inference mode still cached
    xg = _packed(spec, [20, 37], seed=4)
    xg.kwargs.pop("cu_seqlens")
    xg.requires_grad_()
    og, _ = compiled(spec)(xg.q, xg.k, xg.v, cu_seqlens=cu32.to(cu_dtype), **xg.kwargs)
    og.sum().backward()
    assert torch.equal(og.detach(), ref) and torch.isfinite(xg.q.grad).all()


def test_int64_cu_seqlens_compiled_op():
    spec = specs.KIMI_KDA
    x = _packed(spec, [17, 40, 9], seed=5)
    o32, s32 = run(spec, x)
    o64, s64 = run(spec, x, cu_seqlens=x.kwargs["cu_seqlens"].long())
    assert torch.equal(o32, o64) and torch.equal(s32, s64)
    # the decode step too
    state = torch.zeros(3, 2, 16, 16)
    o = compiled(spec).step(x.q, x.k, x.v, state, cu_seqlens=x.kwargs["cu_seqlens"].long(),
                            **{n: t for n, t in x.kwargs.items() if n != "cu_seqlens"})
    assert_close("step with int64 cu_seqlens", o, o32, 1e-5)


# ----------------------------------------------------------------------------- non-finite inputs
_CAUSAL_SPECS = [specs.GDN, specs.KDA, specs.GLA, specs.SIMPLE_GLA, specs.DELTANET, specs.LINEAR,
                 specs.QWEN3_NEXT_GDN, specs.KIMI_KDA, specs.NEMOTRON_MAMBA2]


def _per_token_targets(spec):
    out = ["q", "k", "v"]
    out += [o.name for o in spec.operands if o.role in (Role.TOKEN, Role.TOKEN_CHANNEL)]
    return out


# token 21 of sequence 0 (inside its first chunk and second sub-chunk), token 70 of sequence 1
# (its second chunk, first sub-chunk)
_LENGTHS, _BAD = [30, 90], [21, 30 + 70]


@pytest.mark.parametrize("spec", _CAUSAL_SPECS, ids=lambda s: s.name)
def test_non_finite_input_never_reaches_earlier_outputs(spec):
    """NaN (or inf) at token t of k, v, g, β, ... leaves every output before t, and every
    other sequence's outputs before their own bad token, bit-identical; from t on the
    output is not finite."""
    x = _packed(spec, _LENGTHS, seed=6)
    clean, _ = run(spec, x)
    for name in _per_token_targets(spec):
        for value in ([math.nan, math.inf] if name in ("k", "v") else [math.nan]):
            xs = type(x)(x.q.clone(), x.k.clone(), x.v.clone(), dict(x.kwargs))
            t = getattr(xs, name) if name in ("q", "k", "v") else xs.kwargs[name].clone()
            t[0, _BAD] = value
            if name not in ("q", "k", "v"):
                xs.kwargs[name] = t
            o, _ = run(spec, xs)
            where = f"{name}={value} at tokens {_BAD}"
            assert torch.equal(o[0, : _BAD[0]], clean[0, : _BAD[0]]), f"{where}: sequence 0 changed before it"
            assert torch.equal(o[0, _LENGTHS[0] : _BAD[1]], clean[0, _LENGTHS[0] : _BAD[1]]), (
                f"{where}: sequence 1 changed before it"
            )
            for t_bad in _BAD:
                assert not torch.isfinite(o[0, t_bad]).all(), f"{where}: output at {t_bad} is finite"


# ----------------------------------------------------------------------------- resets
_RESET_SPECS = [specs.SIMPLE_GLA, specs.GLA, specs.GDN, specs.KDA]


@pytest.mark.parametrize("value", [-math.inf, -1e30, -300.0], ids=str)
@pytest.mark.parametrize("spec", _RESET_SPECS, ids=lambda s: s.name)
def test_full_reset_equals_the_recurrence(spec, value):
    """g = -inf (or very negative) decays the state exactly to zero, as the token recurrence
    and the step kernel say: resets mid-chunk, at a chunk start, twice in a row."""
    x = make_inputs(spec, B=2, T=100, H=1, HV=2, K=16, V=16, dtype=torch.float32, h0=True, strength=2.0, seed=8)
    g = x.kwargs["g"]
    for t in (5, 37, 38, 64):
        g[0, t] = value
    g[1, 80] = value
    o, s = run(spec, x)
    o_ref, s_ref = oracle(spec, x)
    assert torch.isfinite(o).all() and torch.isfinite(s).all()
    assert_close("o", o, o_ref, 2e-5)
    assert_close("final state", s, s_ref, 2e-5)
    state = x.kwargs["initial_state"].clone()
    o_step = compiled(spec).step(x.q, x.k, x.v, state, **{n: t for n, t in x.kwargs.items() if n != "initial_state"})
    assert_close("step", o_step, o_ref, 2e-5)


def test_reset_through_the_fused_gate():
    """Qwen3-Next's gate -exp(A_log)·softplus(a + dt_bias) is -inf at a = +inf."""
    spec = specs.QWEN3_NEXT_GDN
    x = make_inputs(spec, B=1, T=80, H=1, HV=2, K=16, V=16, dtype=torch.float32, h0=True, seed=9)
    x.kwargs["a"][0, [10, 50]] = math.inf
    o, s = run(spec, x)
    o_ref, s_ref = oracle(spec, x)
    assert_close("o", o, o_ref, 2e-5)
    assert_close("final state", s, s_ref, 2e-5)


@pytest.mark.parametrize("spec", [specs.GDN, specs.GLA], ids=lambda s: s.name)
def test_reset_gradients(spec):
    x = make_inputs(spec, B=1, T=70, H=1, HV=2, K=16, V=16, dtype=torch.float64, h0=True, seed=10)
    x.kwargs["g"][0, [12, 40]] = -math.inf
    x.requires_grad_()
    o, s = compiled(spec)(x.q, x.k, x.v, output_final_state=True, **x.kwargs)
    w = torch.randn_like(o)
    grads = torch.autograd.grad((o * w).sum() + s.sum(), list(x.tensors().values()))
    o_ref, s_ref = recurrent(spec, x.q, x.k, x.v, output_final_state=True, **x.kwargs)
    refs = torch.autograd.grad((o_ref * w).sum() + s_ref.sum(), list(x.tensors().values()))
    for name, d, d_ref in zip(x.tensors(), grads, refs):
        assert torch.isfinite(d).all(), f"d{name} not finite"
        assert_close(f"d{name}", d, d_ref, 1e-9)


# ----------------------------------------------------------------------------- fp16 range
@pytest.mark.parametrize("spec", [specs.LINEAR, specs.SIMPLE_GLA], ids=lambda s: s.name)
def test_fp16_states_beyond_fp16_range(spec):
    """States summing many tokens exceed fp16's 65504 (the per-chunk states overflowed to
    inf after ~128 tokens) while the outputs fit: intermediates that can exceed it are fp32."""
    gen = torch.Generator().manual_seed(11)
    B, T, H, K, V = 1, 256, 1, 16, 16
    q = (torch.rand(B, T, H, K, generator=gen) * 0.02).half()
    k = (1 + 0.1 * torch.rand(B, T, H, K, generator=gen)).half()
    v = (400 + 20 * torch.randn(B, T, H, V, generator=gen)).half()
    kw = {"g": torch.full((B, T, H), -1e-3).half()} if spec.has_decay else {}
    with torch.no_grad():
        o, s = compiled(spec)(q, k, v, output_final_state=True, **kw)
    up = {n: t.double() for n, t in kw.items()}
    o_ref, s_ref = recurrent(spec, q.double(), k.double(), v.double(), output_final_state=True, **up)
    # the case that overflowed: states past fp16's range, outputs well inside it
    assert s_ref.abs().max() > 65504 and o_ref.abs().max() < 2e4
    assert torch.isfinite(o).all()
    assert_close("o", o, o_ref, 3e-3)
    assert_close("final state", s, s_ref, 3e-3)


# ----------------------------------------------------------------------------- errors a user meets
def test_compile_option_typo_lists_the_options():
    with pytest.raises(ValueError, match=r"chunk_sise.*did you mean 'chunk_size'.*valid options: chunk_size"):
        linattn.compile(specs.GDN, chunk_sise=32)


def test_head_first_input_warns():
    """[B, H, T, K] passed as [B, T, H, K] (T < H): a warning, as fla gives; none when T >= H."""
    spec = specs.SIMPLE_GLA
    x = make_inputs(spec, B=1, T=3, H=8, K=16, V=16, dtype=torch.float32, seed=12)
    with pytest.warns(UserWarning, match=r"T=3 < H=8"):
        run(spec, x)
    import warnings

    # T >= H, or value heads unlike q's (head-first input would give them equal): no warning
    for y in (make_inputs(spec, B=1, T=8, H=2, K=16, V=16, dtype=torch.float32, seed=12),
              make_inputs(spec, B=1, T=3, H=4, HV=8, K=16, V=16, dtype=torch.float32, seed=12)):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            run(spec, y)
