"""The oracle itself, checked against independent closed forms of the same mathematics."""
import pytest
import torch

from linattn import Spec, specs
from linattn.reference import recurrent

from helpers import assert_close, make_inputs


def quadratic_form(q, k, v, g, beta, h0, scale, decay):
    """Non-delta recurrences unrolled: o_t = scale Σ_{s<=t} (q_t ⊙ e^{G_t - G_s})ᵀ k_s β_s v_s + scale (q_t ⊙ e^{G_t})ᵀ S_0."""
    B, T, H, K = q.shape
    G = torch.zeros(B, T, H, K, dtype=q.dtype) if g is None else torch.cumsum(g, 1)
    if decay == "scalar":
        G = G[..., None].expand(B, T, H, K)
    w = v if beta is None else beta[..., None] * v
    diff = G[:, :, None] - G[:, None, :]  # [B, t, s, H, K]
    mask = torch.ones(T, T, dtype=torch.bool).tril()[None, :, :, None, None]
    scores = torch.einsum("bthk,bshk,btshk->btsh", q, k, torch.exp(diff.masked_fill(~mask, -torch.inf)))
    o = scale * torch.einsum("btsh,bshv->bthv", scores, w)
    if h0 is not None:
        o = o + scale * torch.einsum("bthk,bhkv->bthv", q * torch.exp(G), h0)
    return o


@pytest.mark.parametrize("spec", [specs.LINEAR, specs.SIMPLE_GLA, specs.GLA, Spec(beta=True), Spec(decay="channel", beta=True)], ids=repr)
def test_non_delta_matches_quadratic_form(spec):
    x = make_inputs(spec, B=2, T=33, H=3, K=8, V=5, h0=True, seed=1)
    o, _ = recurrent(spec, x.q, x.k, x.v, **x.kwargs)
    g = x.kwargs.get("g")
    ref = quadratic_form(x.q, x.k, x.v, g, x.kwargs.get("beta"), x.kwargs["initial_state"], 8**-0.5, spec.decay.value)
    assert_close("o", o, ref, 1e-12)


@pytest.mark.parametrize("spec", [specs.DELTANET, specs.GDN, specs.KDA], ids=repr)
def test_delta_rule_matches_explicit_transition_matrices(spec):
    """S_t = (I - β k kᵀ) Diag(a_t) S_(t-1) + β k vᵀ with the K x K matrices built explicitly."""
    x = make_inputs(spec, B=1, T=20, H=2, K=6, V=4, h0=True, seed=2)
    o, sT = recurrent(spec, x.q, x.k, x.v, output_final_state=True, **x.kwargs)
    K = 6
    eye = torch.eye(K, dtype=torch.float64)
    S = x.kwargs["initial_state"][0].clone()
    outs = []
    for t in range(20):
        step = []
        for h in range(2):
            kt, b = x.k[0, t, h], x.kwargs["beta"][0, t, h]
            if spec.decay.value == "none":
                a = torch.ones(K, dtype=torch.float64)
            elif spec.decay.value == "scalar":
                a = torch.exp(x.kwargs["g"][0, t, h]).expand(K)
            else:
                a = torch.exp(x.kwargs["g"][0, t, h])
            S[h] = (eye - b * torch.outer(kt, kt)) @ torch.diag(a) @ S[h] + b * torch.outer(kt, x.v[0, t, h])
            step.append(K**-0.5 * S[h].T @ x.q[0, t, h])
        outs.append(torch.stack(step))
    assert_close("o", o[0], torch.stack(outs), 1e-12)
    assert_close("final state", sT[0], S, 1e-12)


def test_grouped_heads_equal_repeated_heads():
    spec = specs.GDN
    x = make_inputs(spec, B=2, T=17, H=2, HV=6, K=8, V=4, seed=3)
    o, s = recurrent(spec, x.q, x.k, x.v, output_final_state=True, **x.kwargs)
    qr, kr = x.q.repeat_interleave(3, dim=2), x.k.repeat_interleave(3, dim=2)
    o2, s2 = recurrent(spec, qr, kr, x.v, output_final_state=True, **x.kwargs)
    torch.testing.assert_close(o, o2, rtol=1e-13, atol=1e-13)  # other memory layouts: not bitwise
    torch.testing.assert_close(s, s2, rtol=1e-13, atol=1e-13)


def test_varlen_equals_separate_sequences():
    spec = specs.KDA
    lengths = [5, 12, 1, 9]
    x = make_inputs(spec, lengths=lengths, h0=True, seed=4)
    o, s = recurrent(spec, x.q, x.k, x.v, output_final_state=True, **x.kwargs)
    start = 0
    for n, L in enumerate(lengths):
        sl = slice(start, start + L)
        on, sn = recurrent(
            spec, x.q[:, sl], x.k[:, sl], x.v[:, sl], g=x.kwargs["g"][:, sl], beta=x.kwargs["beta"][:, sl],
            initial_state=x.kwargs["initial_state"][n : n + 1], output_final_state=True,
        )
        # the same float64 ops on slices at other offsets: BLAS may round differently by alignment
        torch.testing.assert_close(o[:, sl], on, rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(s[n : n + 1], sn, rtol=1e-13, atol=1e-13)
        start += L


def test_layer_side_terms():
    """D skip and silu(z) act on the output exactly as written."""
    base = Spec(decay="scalar", beta=True)
    full = base.replace(skip="channel", output_gate="silu")
    x = make_inputs(full, B=1, T=9, H=2, K=4, V=3, seed=5)
    o, _ = recurrent(full, x.q, x.k, x.v, **x.kwargs)
    core = {n: x.kwargs[n] for n in ("g", "beta")}
    o0, _ = recurrent(base, x.q, x.k, x.v, **core)
    ref = (o0 + x.kwargs["D"] * x.v) * torch.nn.functional.silu(x.kwargs["z"])
    torch.testing.assert_close(o, ref, rtol=1e-14, atol=1e-14)


def test_l2norm_and_default_scale():
    base = specs.DELTANET
    x = make_inputs(base, B=1, T=7, H=1, K=4, V=3, seed=6)
    o, _ = recurrent(base.replace(qk_l2norm=True), x.q, x.k, x.v, scale=0.7, **x.kwargs)
    n = lambda t: t / torch.sqrt((t * t).sum(-1, keepdim=True) + 1e-6)  # noqa: E731
    o2, _ = recurrent(base, n(x.q), n(x.k), x.v, scale=0.7, **x.kwargs)
    torch.testing.assert_close(o, o2, rtol=1e-14, atol=1e-14)
    o3, _ = recurrent(base, x.q, x.k, x.v, **x.kwargs)
    o4, _ = recurrent(base, x.q, x.k, x.v, scale=0.5, **x.kwargs)  # K = 4: default scale is 0.5
    assert torch.equal(o3, o4)


def test_dtype_follows_inputs():
    x = make_inputs(specs.GDN, dtype=torch.bfloat16, T=10)
    o, s = recurrent(specs.GDN, x.q, x.k, x.v, output_final_state=True, **x.kwargs)
    assert o.dtype == torch.bfloat16 and s.dtype == torch.float32
    x = make_inputs(specs.GDN, dtype=torch.float64, T=10)
    o, s = recurrent(specs.GDN, x.q, x.k, x.v, output_final_state=True, **x.kwargs)
    assert o.dtype == torch.float64 and s.dtype == torch.float64
