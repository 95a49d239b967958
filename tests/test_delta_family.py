"""The wider delta-rule family: DPLR / IPLR / RWKV-7, Comba and DeltaProduct as specs.

The token-by-token oracle against fla's own naive references (independent code), the
chunk form against the oracle (float64, and fp32 over long RWKV-7-range sequences), and
the generated kernels of each (Comba's stages; DeltaProduct on the delta rule's rows, DPLR
on Comba's read before the decay): forward, every gradient, decode, and fla's drop-in
signatures."""
from __future__ import annotations

import inspect
import warnings

import pytest
import torch
import torch.nn.functional as F

import linattn
from linattn import Spec, ops, specs, term
from linattn.reference import chunkwise, recurrent

F64 = torch.float64


def _rand(*shape, seed, dtype=F64):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _unit(*shape, seed, dtype=F64):
    return F.normalize(_rand(*shape, seed=seed, dtype=dtype), dim=-1)


def _family_inputs(spec: Spec, B=2, T=70, H=2, HV=2, K=16, V=16, seed=0, dtype=F64, alpha_max=1.0):
    """q, k, v and the spec's named inputs; DPLR's a, b in RWKV-7's range (a = -κ̂, b = κ̂ ⊙ α)."""
    n = spec.householder
    q, k, v = _rand(B, T, H, K, seed=seed, dtype=dtype), _unit(B, T * n, H, K, seed=seed + 1, dtype=dtype), \
        _rand(B, T * n, HV, V, seed=seed + 2, dtype=dtype)
    kw = {}
    gen = torch.Generator().manual_seed(seed + 3)
    if spec.decay.value != "none":
        shape = (B, T, HV, K) if spec.decay.value == "channel" else (B, T, HV)
        kw[spec.gate.operands[0].name] = -2 * torch.rand(shape, generator=gen, dtype=dtype)
    if spec.beta is not None:
        kw["beta"] = torch.rand(B, T * n, HV, generator=gen, dtype=dtype)
    if spec.correction.value == "comba":
        kw["p"] = _unit(B, T, H, K, seed=seed + 4, dtype=dtype)
    if spec.correction.value == "dplr":
        kappa = _unit(B, T, H, K, seed=seed + 5, dtype=dtype)
        kw["a"], kw["b"] = -kappa, kappa * alpha_max * torch.rand(B, T, H, K, generator=gen, dtype=dtype)
    return q, k, v, kw


def test_spec_validation():
    with pytest.raises(ValueError, match="beta: the dplr transition"):
        Spec(decay="channel", correction="dplr", beta=True)
    with pytest.raises(ValueError, match="householder must be a positive int"):
        Spec(correction="delta", householder=0)
    with pytest.raises(ValueError, match="householder=2 needs correction='delta'"):
        Spec(correction="comba", householder=2)
    with pytest.raises(ValueError, match="skip: the D skip adds D"):
        Spec(decay="scalar", correction="delta", householder=2, skip="head")
    with pytest.raises(ValueError, match="operand 'p' of .* is the comba correction's"):
        Spec(decay="scalar", correction="comba", gate=term("-softplus(p)", p="token"))
    with pytest.raises(ValueError, match=r"operand\(s\) \['x'\] in both gate and beta"):
        Spec(decay="scalar", correction="delta", householder=2, gate=term("-softplus(x)", x="token"),
             beta=term("sigmoid(x)", x="token"))
    assert specs.by_name("rwkv7") is specs.RWKV7 and specs.by_name("delta_product") is specs.DELTA_PRODUCT
    assert specs.delta_product(3).householder == 3


def test_call_checks_name_the_family_inputs():
    q, k, v, kw = _family_inputs(specs.COMBA, T=8)
    with pytest.raises(ValueError, match=r"missing argument\(s\) \['p'\]"):
        recurrent(specs.COMBA, q, k, v, **{n: t for n, t in kw.items() if n != "p"})
    with pytest.raises(ValueError, match=r"p: expected shape \[2, 8, 2, 16\]"):
        recurrent(specs.COMBA, q, k, v, **{**kw, "p": kw["p"][:, :4]})
    q, k, v, kw = _family_inputs(specs.DELTA_PRODUCT, T=8)
    with pytest.raises(ValueError, match=r"k: expected shape \[2, 16, 2, 16\] \(\[B, T \* householder, H, K\]"):
        recurrent(specs.DELTA_PRODUCT, q, k[:, :8], v, **kw)
    with pytest.raises(ValueError, match=r"beta: expected shape \[2, 16, 2\]"):
        recurrent(specs.DELTA_PRODUCT, q, k, v, **{**kw, "beta": kw["beta"][:, :8]})


def test_oracle_matches_fla_naive_references():
    """Our float64 oracle against fla's naive recurrences (fp32) on the same inputs."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dplr = pytest.importorskip("fla.ops.generalized_delta_rule.dplr.naive")
        iplr = pytest.importorskip("fla.ops.generalized_delta_rule.iplr.naive")
        comba = pytest.importorskip("fla.ops.comba.naive")
        product = pytest.importorskip("fla.ops.gated_delta_product.naive")

    def f(x):  # fla's head-first fp32
        return x.transpose(1, 2).float()

    def check(name, o, s, o_ref, s_ref):
        scale = o.abs().max().item()
        assert (o - o_ref.double()).abs().max().item() <= 1e-5 * scale, name
        assert (s - s_ref.double()).abs().max().item() <= 1e-5 * s.abs().max().item(), name

    q, k, v, kw = _family_inputs(specs.DPLR, T=40)
    o, s = recurrent(specs.DPLR, q, k, v, output_final_state=True, **kw)
    o_ref, s_ref = dplr.dplr_recurrence(f(q), f(k), f(v), f(kw["a"]), f(kw["b"]), f(kw["gk"]))
    check("dplr", o, s, o_ref.transpose(1, 2), s_ref)

    q, k, v, kw = _family_inputs(specs.IPLR, T=40)
    o, s = recurrent(specs.IPLR, q, k, v, output_final_state=True, **kw)
    o_ref, s_ref = iplr.iplr_recurrence(f(q), f(k), f(v), f(kw["a"]), f(kw["b"]))
    check("iplr", o, s, o_ref.transpose(1, 2), s_ref)

    q, k, v, kw = _family_inputs(specs.COMBA, T=40)
    o, s = recurrent(specs.COMBA, q, k, v, output_final_state=True, **kw)
    o_ref, s_ref = comba.naive_recurrent_comba(*(x.float() for x in (q, k, v, kw["p"], kw["beta"], kw["g"])),
                                               output_final_state=True)
    check("comba", o, s, o_ref, s_ref)

    spec = specs.delta_product(3)
    q, k, v, kw = _family_inputs(spec, T=30)
    h0 = _rand(2, 2, 16, 16, seed=9)
    o, s = recurrent(spec, q, k, v, initial_state=h0, output_final_state=True, **kw)
    o_ref, s_ref = product.naive_recurrent_gated_delta_product(
        *(x.float() for x in (q, k, v, kw["g"], kw["beta"])), 16 ** -0.5, initial_state=h0.float(),
        output_final_state=True, num_householder=3)
    check("delta product", o, s, o_ref, s_ref)


CHUNK_CASES = {
    "dplr": specs.DPLR,
    "iplr": specs.IPLR,
    "rwkv7": specs.RWKV7,
    "dplr-scalar": Spec(decay="scalar", correction="dplr"),
    "comba": specs.COMBA,
    "comba-channel-l2": Spec(decay="channel", correction="comba", beta=True, qk_l2norm=True),
    "delta-product-3": specs.delta_product(3),
    "delta-product-channel": Spec(decay="channel", correction="delta", beta=True, householder=2),
}


@pytest.mark.parametrize("case", sorted(CHUNK_CASES))
def test_chunk_form_equals_the_oracle(case):
    """The chunk form (reference.chunkwise: DPLR's solve, Comba's read key, DeltaProduct's
    interleaved rows) against the token recurrence, float64, packed sequences crossing
    chunk boundaries, grouped heads, an initial state."""
    spec = CHUNK_CASES[case]
    q, k, v, kw = _family_inputs(spec, B=1, T=150, H=1, HV=2, seed=3)
    cu = torch.tensor([0, 37, 150], dtype=torch.int32)
    h0 = _rand(2, 2, 16, 16, seed=4)
    o, s = recurrent(spec, q, k, v, initial_state=h0, output_final_state=True, cu_seqlens=cu, **kw)
    o2, s2 = chunkwise(spec, q, k, v, initial_state=h0, output_final_state=True, cu_seqlens=cu, **kw)
    assert ((o - o2).abs().max() / o.abs().max()).item() <= 1e-12
    assert ((s - s2).abs().max() / s.abs().max()).item() <= 1e-12


@pytest.mark.parametrize("spec", [specs.RWKV7, specs.IPLR], ids=["rwkv7", "iplr"])
def test_dplr_chunk_form_is_stable_over_long_sequences_in_rwkv7_range(spec):
    """RWKV-7's range, a = -κ̂ and b = κ̂ ⊙ α with unit κ̂ and α in [0, 1] (each rank-1 factor's
    eigenvalues in [0, 1], docs/algorithms.md section 12.2): the state stays bounded, and the
    chunk form in fp32 follows the float64 oracle over 2,048 tokens (32 chunks); so do the
    generated kernels (fp32, two rows a token) over the first 512 tokens."""
    q, k, v, kw = _family_inputs(spec, B=1, T=2048, H=1, HV=1, seed=6)
    o, s = recurrent(spec, q, k, v, output_final_state=True, **kw)
    f32 = {n: t.float() for n, t in kw.items()}
    o2, s2 = chunkwise(spec, q.float(), k.float(), v.float(), output_final_state=True, **f32)
    assert torch.isfinite(o2).all() and torch.isfinite(s2).all()
    assert s.abs().max() <= 16 * k.shape[1] ** 0.5  # no faster than a random walk of the writes
    err_o = ((o2.double() - o).abs().max() / o.abs().max()).item()
    err_s = ((s2.double() - s).abs().max() / s.abs().max()).item()
    print(f"{spec.name}: fp32 chunk form vs float64 oracle over 2048 tokens: o {err_o:.1e}, state {err_s:.1e}")
    assert err_o <= 1e-4 and err_s <= 1e-4
    T = 512
    o, s = recurrent(spec, q[:, :T], k[:, :T], v[:, :T], output_final_state=True, **{n: t[:, :T] for n, t in kw.items()})
    with torch.no_grad():
        o3, s3 = linattn.compile(spec)(q[:, :T].float(), k[:, :T].float(), v[:, :T].float(), output_final_state=True,
                                       **{n: t[:, :T] for n, t in f32.items()})
    err_o = ((o3.double() - o).abs().max() / o.abs().max()).item()
    err_s = ((s3.double() - s).abs().max() / s.abs().max()).item()
    print(f"{spec.name}: generated kernels (fp32) vs float64 oracle over {T} tokens: o {err_o:.1e}, state {err_s:.1e}")
    assert torch.isfinite(o3).all() and err_o <= 1e-4 and err_s <= 1e-4


@pytest.mark.parametrize("variant", ["scalar-gqa-l2-varlen", "channel-gated"])
def test_delta_product_compiled_forward_gradients_and_decode(variant):
    """DeltaProduct on the delta rule's generated kernels (Triton's interpreter), fp32,
    against the float64 oracle: outputs, final states, every input's gradient; then the
    decode step from the same initial states."""
    if variant == "channel-gated":  # a fused gate term, evaluated before the rows interleave
        spec = Spec(decay="channel", correction="delta", householder=2, beta=term("sigmoid(b)", b="token"),
                    gate=term("-exp(A_log) * softplus(a)", a="token_channel", A_log="head"), output_gate="silu")
        H, HV, n = 2, 2, 2
    else:
        spec = Spec(decay="scalar", correction="delta", beta=True, householder=3, qk_l2norm=True)
        H, HV, n = 1, 2, 3
    T, K, V = 37, 16, 16
    q, k, v = _rand(1, T, H, K, seed=1), _rand(1, T * n, H, K, seed=2) / 3, _rand(1, T * n, HV, V, seed=3)
    if variant == "channel-gated":
        kw = {"b": _rand(1, T * n, HV, seed=4), "a": _rand(1, T, HV, K, seed=5), "A_log": _rand(HV, seed=6) / 2}
        z = _rand(1, T, HV, V, seed=7)
    else:
        kw = {"g": -torch.rand(1, T, HV, dtype=F64), "beta": torch.rand(1, T * n, HV, dtype=F64)}
        z = None
    cu = torch.tensor([0, 15, 37], dtype=torch.int32)
    h0 = _rand(2, HV, K, V, seed=8)
    names = ["q", "k", "v", *kw, "h0"] + (["z"] if z is not None else [])
    leaves = dict(zip(names, [q, k, v, *kw.values(), h0] + ([z] if z is not None else [])))
    mine = {n: t.float().requires_grad_() for n, t in leaves.items()}
    ref = {n: t.clone().requires_grad_() for n, t in leaves.items()}
    w_o = _rand(1, T, HV, V, seed=10)
    outs = []
    for fn, ts in ((linattn.compile(spec), mine), (lambda *a, **kw: recurrent(spec, *a, **kw), ref)):
        extra = {n: ts[n] for n in kw}
        o, s = fn(ts["q"], ts["k"], ts["v"], initial_state=ts["h0"], output_final_state=True, cu_seqlens=cu,
                  z=ts.get("z"), **extra)
        ((o * w_o.to(o.dtype)).sum() + (s * s).sum()).backward()
        outs.append((o, s))
    (o, s), (o_ref, s_ref) = outs
    assert ((o.double() - o_ref).abs().max() / o_ref.abs().max()).item() <= 2e-5
    assert ((s.double() - s_ref).abs().max() / s_ref.abs().max()).item() <= 2e-5
    for n in names:
        err = ((mine[n].grad.double() - ref[n].grad).abs().max() / ref[n].grad.abs().max()).item()
        assert err <= 1e-4, (n, err)
    state = h0.float().clone()
    with torch.no_grad():
        y = linattn.compile(spec).step(q.float(), k.float(), v.float(), state, cu_seqlens=cu,
                                       z=None if z is None else z.float(), **{n: t.float() for n, t in kw.items()})
    assert ((y.double() - o_ref).abs().max() / o_ref.abs().max()).item() <= 2e-5
    assert ((state.double() - s_ref).abs().max() / s_ref.abs().max()).item() <= 2e-5


def test_chunk_gated_delta_product_drop_in():
    """fla's signature exactly; against fla's naive recurrence, with and without decay."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fla_chunk = pytest.importorskip("fla.ops.gated_delta_product")
        naive = pytest.importorskip("fla.ops.gated_delta_product.naive")
    ours = inspect.signature(ops.chunk_gated_delta_product).parameters
    theirs = inspect.signature(fla_chunk.chunk_gated_delta_product).parameters
    assert [(p.name, p.kind, p.default) for p in ours.values()] == [(p.name, p.kind, p.default) for p in theirs.values()]
    q, k, v, kw = _family_inputs(specs.DELTA_PRODUCT, T=30, dtype=torch.float32)
    h0 = _rand(2, 2, 16, 16, seed=5, dtype=torch.float32)
    for g in (kw["g"], None):
        o, s = ops.chunk_gated_delta_product(q, k, v, g, kw["beta"], 2, initial_state=h0, output_final_state=True)
        o_ref, s_ref = naive.naive_recurrent_gated_delta_product(
            q, k, v, g, kw["beta"], 16 ** -0.5, initial_state=h0.clone(), output_final_state=True, num_householder=2)
        assert ((o - o_ref).abs().max() / o_ref.abs().max()).item() <= 1e-5
        assert ((s - s_ref).abs().max() / s_ref.abs().max()).item() <= 1e-5
    with pytest.raises(ValueError, match="num_householder: expected a positive int"):
        ops.chunk_gated_delta_product(q, k, v, kw["g"], kw["beta"], 0)
    with pytest.raises(TypeError):
        ops.chunk_gated_delta_product(q, k, v, kw["g"], kw["beta"], 2, head_first=False)


def _check_compiled(spec, leaves, kw_names, T, HV, V, cu, z=None, tol=2e-5, gtol=1e-4):
    """The compiled op (fp32, Triton's interpreter) against the float64 oracle: outputs, final
    states and every input's gradient under a random loss; then the decode step from the same
    initial states. ``leaves``: float64 tensors by name (q, k, v, the spec's inputs, h0[, z])."""
    mine = {n: t.float().requires_grad_() for n, t in leaves.items()}
    ref = {n: t.clone().requires_grad_() for n, t in leaves.items()}
    w_o = _rand(*leaves["q"].shape[:2], HV, V, seed=10)
    outs = []
    for fn, ts in ((linattn.compile(spec), mine), (lambda *a, **kw: recurrent(spec, *a, **kw), ref)):
        o, s = fn(ts["q"], ts["k"], ts["v"], initial_state=ts["h0"], output_final_state=True, cu_seqlens=cu,
                  z=ts.get("z"), **{n: ts[n] for n in kw_names})
        ((o * w_o.to(o.dtype)).sum() + (s * s).sum()).backward()
        outs.append((o, s))
    (o, s), (o_ref, s_ref) = outs
    assert ((o.double() - o_ref).abs().max() / o_ref.abs().max()).item() <= tol
    assert ((s.double() - s_ref).abs().max() / s_ref.abs().max()).item() <= tol
    for n in leaves:
        err = ((mine[n].grad.double() - ref[n].grad).abs().max() / ref[n].grad.abs().max()).item()
        assert err <= gtol, (n, err)
    state = leaves["h0"].float().clone()
    with torch.no_grad():
        y = linattn.compile(spec).step(*(leaves[n].float() for n in "qkv"), state, cu_seqlens=cu,
                                       z=None if z is None else z.float(), **{n: leaves[n].float() for n in kw_names})
    assert ((y.double() - o_ref).abs().max() / o_ref.abs().max()).item() <= tol
    assert ((state.double() - s_ref).abs().max() / s_ref.abs().max()).item() <= tol


@pytest.mark.parametrize("variant", ["scalar-gva-l2-varlen", "channel-gated", "none-nobeta"])
def test_comba_compiled_forward_gradients_and_decode(variant):
    """Comba on the generated kernels (its read key p in Akk's rows and W), every decay."""
    T, K, V, H = 37, 16, 16, 1
    HV = 2 if variant.startswith("scalar") else 1
    if variant == "channel-gated":
        spec = Spec(decay="channel", correction="comba", beta=term("sigmoid(b)", b="token"),
                    gate=term("-exp(A_log) * softplus(a)", a="token_channel", A_log="head"), output_gate="silu")
        kw = {"b": _rand(1, T, HV, seed=4), "a": _rand(1, T, HV, K, seed=5), "A_log": _rand(HV, seed=6) / 2}
    elif variant == "none-nobeta":
        spec = Spec(correction="comba")
        kw = {}
    else:
        spec = Spec(decay="scalar", correction="comba", beta=True, qk_l2norm=True)
        kw = {"g": -torch.rand(1, T, HV, dtype=F64), "beta": torch.rand(1, T, HV, dtype=F64)}
    kw["p"] = _rand(1, T, H, K, seed=9) / 3
    z = _rand(1, T, HV, V, seed=7) if spec.output_gate.value == "silu" else None
    leaves = {"q": _rand(1, T, H, K, seed=1), "k": _rand(1, T, H, K, seed=2) / 3, "v": _rand(1, T, HV, V, seed=3),
              **kw, "h0": _rand(2, HV, K, V, seed=8), **({"z": z} if z is not None else {})}
    _check_compiled(spec, leaves, list(kw), T, HV, V, torch.tensor([0, 15, 37], dtype=torch.int32), z=z)


def test_comba_drop_ins():
    """fla's signatures exactly (``fused_recurrent_comba`` takes ``q, k, p, v``); against fla's
    naive recurrence, chunk and recurrent modes, with and without decay; p = None is k."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fla_comba = pytest.importorskip("fla.ops.comba")
        naive = pytest.importorskip("fla.ops.comba.naive")
    for name in ("chunk_comba", "fused_recurrent_comba"):
        ours = inspect.signature(getattr(ops, name)).parameters
        theirs = inspect.signature(getattr(fla_comba, name)).parameters
        assert [(p.name, p.kind, p.default) for p in ours.values()] == \
            [(p.name, p.kind, p.default) for p in theirs.values()], name
    q, k, v, kw = _family_inputs(specs.COMBA, T=30, dtype=torch.float32)
    p, beta, g = kw["p"], kw["beta"], kw["g"]
    h0 = _rand(2, 2, 16, 16, seed=5, dtype=torch.float32)
    for gg in (g, None):
        o_ref, s_ref = naive.naive_recurrent_comba(q, k, v, p, beta, torch.zeros_like(beta) if gg is None else gg,
                                                   initial_state=h0.clone(), output_final_state=True)
        for o, s in (ops.chunk_comba(q, k, v, p, gg, beta, initial_state=h0, output_final_state=True),
                     ops.fused_recurrent_comba(q, k, p, v, gg, beta, initial_state=h0, output_final_state=True)):
            assert ((o - o_ref).abs().max() / o_ref.abs().max()).item() <= 1e-5
            assert ((s - s_ref).abs().max() / s_ref.abs().max()).item() <= 1e-5
    o_k, _ = ops.chunk_comba(q, k, v, None, g, beta)
    o_gdn, _ = ops.chunk_gated_delta_rule(q, k, v, g, beta)
    assert ((o_k - o_gdn).abs().max() / o_gdn.abs().max()).item() <= 1e-5
    with pytest.raises(ValueError, match="p: required"):
        ops.fused_recurrent_comba(q, k, None, v, g, beta)
    with pytest.raises(ValueError, match=r"p: expected shape"):
        ops.chunk_comba(q, k, v, p[:, :4], g, beta)
    with pytest.raises(TypeError):
        ops.chunk_comba(q, k, v, p, g, beta, head_first=False)


@pytest.mark.parametrize("variant", ["dplr-channel-gva-varlen", "iplr", "rwkv7-gated-silu", "dplr-scalar-l2"])
def test_dplr_compiled_forward_gradients_and_decode(variant):
    """DPLR on Comba's generated kernels (two rows per token, the read before the decay): every
    decay, a gate term evaluated first, GVA, packed sequences, the L2 norm, the output gate."""
    T, K, V = 37, 16, 16
    H, HV = (1, 2) if variant.startswith("dplr-channel") else (2, 2)
    spec = {
        "dplr-channel-gva-varlen": specs.DPLR,
        "iplr": specs.IPLR,
        "rwkv7-gated-silu": Spec(decay="channel", correction="dplr", gate=term("-0.6 * sigmoid(w)", w="token_channel"),
                                 default_scale=1.0, output_gate="silu"),
        "dplr-scalar-l2": Spec(decay="scalar", correction="dplr", qk_l2norm=True),
    }[variant]
    kw = {}
    if spec.decay.value == "channel":
        name = spec.gate.operands[0].name
        kw[name] = _rand(1, T, HV, K, seed=4) if variant.startswith("rwkv7") else -2 * torch.rand(1, T, HV, K, dtype=F64)
    elif spec.decay.value == "scalar":
        kw["g"] = -torch.rand(1, T, HV, dtype=F64)
    kappa = _unit(1, T, H, K, seed=5)
    kw["a"], kw["b"] = -kappa, kappa * torch.rand(1, T, H, K, dtype=F64)
    z = _rand(1, T, HV, V, seed=7) if spec.output_gate.value == "silu" else None
    leaves = {"q": _rand(1, T, H, K, seed=1), "k": _rand(1, T, H, K, seed=2) / 3, "v": _rand(1, T, HV, V, seed=3),
              **kw, "h0": _rand(2, HV, K, V, seed=8), **({"z": z} if z is not None else {})}
    _check_compiled(spec, leaves, list(kw), T, HV, V, torch.tensor([0, 15, 37], dtype=torch.int32), z=z)


def test_dplr_drop_ins():
    """fla's seven signatures exactly; against fla's naive DPLR/IPLR recurrences (and the RWKV-7
    forms, which are DPLR with q = r, gk = w): chunk and recurrent modes, reverse, varlen."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fla_ops = pytest.importorskip("fla.ops")
        fla_rwkv7 = pytest.importorskip("fla.ops.rwkv7")
        dplr = pytest.importorskip("fla.ops.generalized_delta_rule.dplr.naive")
        iplr = pytest.importorskip("fla.ops.generalized_delta_rule.iplr.naive")
    names = ("chunk_dplr_delta_rule", "chunk_iplr_delta_rule", "fused_recurrent_dplr_delta_rule",
             "fused_recurrent_iplr_delta_rule", "chunk_rwkv7", "fused_recurrent_rwkv7", "fused_mul_recurrent_rwkv7")
    for name in names:
        theirs = getattr(fla_ops, name, None) or getattr(fla_rwkv7, name)
        assert [(p.name, p.kind, p.default) for p in inspect.signature(getattr(ops, name)).parameters.values()] == \
            [(p.name, p.kind, p.default) for p in inspect.signature(theirs).parameters.values()], name
    q, k, v, kw = _family_inputs(specs.DPLR, T=30, dtype=torch.float32)
    a, b, gk = kw["a"], kw["b"], kw["gk"]

    def f(x):  # fla's naive references are head-first
        return x.transpose(1, 2)

    def close(o, s, o_ref, s_ref, what):
        assert ((o - o_ref).abs().max() / o_ref.abs().max()).item() <= 1e-5, what
        assert ((s - s_ref).abs().max() / s_ref.abs().max()).item() <= 1e-5, what

    o_ref, s_ref = dplr.dplr_recurrence(f(q), f(k), f(v), f(a), f(b), f(gk))
    o_ref = f(o_ref)
    for o, s in (ops.chunk_dplr_delta_rule(q, k, v, a, b, gk, output_final_state=True),
                 ops.fused_recurrent_dplr_delta_rule(q, k, v, a, b, gk, output_final_state=True),
                 ops.chunk_rwkv7(q, gk, k, v, a, b, scale=16 ** -0.5, output_final_state=True),
                 ops.fused_recurrent_rwkv7(q, gk, k, v, a, b)):
        close(o, s, o_ref, s_ref, "dplr")
    kk = -a  # fused_mul: read along -kk, write along kk ⊙ a-gate
    gate = torch.rand(q.shape, generator=torch.Generator().manual_seed(11))
    o_ref2, s_ref2 = dplr.dplr_recurrence(f(q), f(k), f(v), f(-kk), f(kk * gate), f(gk))
    close(*ops.fused_mul_recurrent_rwkv7(q, gk, k, v, kk, gate, scale=16 ** -0.5, output_final_state=True),
          f(o_ref2), s_ref2, "fused_mul")
    o_ref, s_ref = iplr.iplr_recurrence(f(q), f(k), f(v), f(a), f(b))
    o_ref = f(o_ref)
    for o, s in (ops.chunk_iplr_delta_rule(q, k, v, a, b, output_final_state=True),
                 ops.fused_recurrent_iplr_delta_rule(q, k, v, a, b, output_final_state=True)):
        close(o, s, o_ref, s_ref, "iplr")
    # reverse, packed: each sequence runs from its last token, as the reversed sequence would
    cu = torch.tensor([0, 12, 30], dtype=torch.int64)
    one = lambda x: x[:1]  # noqa: E731
    o, _ = ops.fused_recurrent_dplr_delta_rule(*(one(x) for x in (q, k, v, a, b, gk)), reverse=True, cu_seqlens=cu)
    for lo, hi in ((0, 12), (12, 30)):
        seg = [one(x)[:, lo:hi].flip(1) for x in (q, k, v, a, b, gk)]
        o_seg, _ = ops.fused_recurrent_dplr_delta_rule(*seg)
        assert ((o[:, lo:hi] - o_seg.flip(1)).abs().max() / o_seg.abs().max()).item() <= 1e-6
    with pytest.raises(ValueError, match=r"chunk_dplr_delta_rule: unsupported argument\(s\) \['head_first'\]"):
        ops.chunk_dplr_delta_rule(q, k, v, a, b, gk, head_first=False)
    with pytest.raises(ValueError, match="cp_context"):
        ops.chunk_rwkv7(q, gk, k, v, a, b, cp_context=object())
    with pytest.raises(ValueError, match=r"a: expected shape"):
        ops.chunk_iplr_delta_rule(q, k, v, a[:, :4], b)


def test_dplr_drop_ins_have_every_gradient():
    """fla's fused DPLR / RWKV-7 ops have no backward; ours run the chunk kernels under autograd:
    every input's gradient against autograd through the float64 oracle (fused_mul's kk and a
    through the read and write vectors it builds from them)."""
    T, H, K, V = 20, 2, 16, 16
    gen = torch.Generator().manual_seed(12)
    leaves = {"r": _rand(1, T, H, K, seed=1), "w": -torch.rand(1, T, H, K, generator=gen, dtype=F64),
              "k": _rand(1, T, H, K, seed=2) / 3, "v": _rand(1, T, H, V, seed=3), "kk": _unit(1, T, H, K, seed=4),
              "a": torch.rand(1, T, H, K, generator=gen, dtype=F64), "h0": _rand(1, H, K, V, seed=5)}
    mine = {n: t.clone().requires_grad_() for n, t in leaves.items()}
    ref = {n: t.clone().requires_grad_() for n, t in leaves.items()}
    w_o = _rand(1, T, H, V, seed=6)
    o, s = ops.fused_mul_recurrent_rwkv7(mine["r"], mine["w"], mine["k"], mine["v"], mine["kk"], mine["a"],
                                         initial_state=mine["h0"], output_final_state=True)
    o_ref, s_ref = recurrent(specs.RWKV7, ref["r"], ref["k"], ref["v"], a=-ref["kk"], b=ref["kk"] * ref["a"],
                             w=ref["w"], initial_state=ref["h0"], output_final_state=True)
    for out, st in ((o, s), (o_ref, s_ref)):
        ((out * w_o).sum() + (st * st).sum()).backward()
    assert ((o - o_ref).abs().max() / o_ref.abs().max()).item() <= 1e-10
    for n in leaves:
        err = ((mine[n].grad - ref[n].grad).abs().max() / ref[n].grad.abs().max()).item()
        assert err <= 1e-10, (n, err)
