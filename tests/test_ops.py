"""Drop-in ops: fla's and mamba_ssm's semantics, written out independently in torch."""
import pytest
import torch
import torch.nn.functional as F

from linattn import ops, specs
from linattn.reference import recurrent

from helpers import assert_close

TOL = 2e-5


def _rand(*shape, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * scale


def _l2(x):
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + 1e-6)


def _inputs(B=1, T=50, H=2, HV=4, K=16, V=16, seed=0):
    q, k, v = _rand(B, T, H, K, seed=seed), _rand(B, T, H, K, seed=seed + 1) / 4, _rand(B, T, HV, V, seed=seed + 2)
    return q, k, v


def _d(*ts):
    return [None if t is None else t.double() for t in ts]


@pytest.mark.parametrize("fused", [False, True])
def test_chunk_gated_delta_rule(fused):
    q, k, v = _inputs()
    B, T, HV = 1, 50, 4
    a, b = _rand(B, T, HV, seed=5), _rand(B, T, HV, seed=6)
    A_log, dt_bias = torch.rand(HV) * 2, _rand(HV, seed=7)
    h0 = _rand(1, HV, 16, 16, seed=8)
    with torch.no_grad():
        if fused:
            o, ht = ops.chunk_gated_delta_rule(
                q, k, v, a, b, initial_state=h0, output_final_state=True, use_qk_l2norm_in_kernel=True,
                use_beta_sigmoid_in_kernel=True, use_gate_in_kernel=True, A_log=A_log, dt_bias=dt_bias,
            )
            g, beta, qq, kk = -A_log.exp() * F.softplus(a + dt_bias), b.sigmoid(), _l2(q), _l2(k)
        else:
            g, beta = -torch.rand(B, T, HV), torch.rand(B, T, HV)
            o, ht = ops.chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True)
            qq, kk = q, k
    qq, kk, vv, g, beta, h0 = _d(qq, kk, v, g, beta, h0)
    o_ref, s_ref = recurrent(specs.GDN, qq, kk, vv, g=g, beta=beta, initial_state=h0, output_final_state=True)
    assert_close("o", o, o_ref, TOL)
    assert_close("final state", ht, s_ref, TOL)


def test_state_layout_and_int64_cu_seqlens():
    q, k, v = _inputs(T=40)
    g, beta = -torch.rand(1, 40, 4), torch.rand(1, 40, 4)
    cu = torch.tensor([0, 15, 40])  # int64, as fla users pass it
    h0 = _rand(2, 4, 16, 16, seed=3)
    with torch.no_grad():
        o1, s1 = ops.chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True, cu_seqlens=cu)
        o2, s2 = ops.chunk_gated_delta_rule(
            q, k, v, g, beta, initial_state=h0.transpose(-1, -2).contiguous(), output_final_state=True,
            cu_seqlens=cu.int(), state_v_first=True,
        )
    assert torch.equal(o1, o2) and torch.equal(s1, s2.transpose(-1, -2))
    o_ref, s_ref = recurrent(specs.GDN, *_d(q, k, v), g=g.double(), beta=beta.double(), initial_state=h0.double(),
                             output_final_state=True, cu_seqlens=cu.int())
    assert_close("o", o1, o_ref, TOL)
    assert_close("states", s1, s_ref, TOL)


@pytest.mark.parametrize("gate", ["plain", "softplus", "lower_bound", "lower_bound_no_A"])
def test_chunk_kda(gate):
    q, k, v = _inputs()
    B, T, HV, K = 1, 50, 4, 16
    raw, b = _rand(B, T, HV, K, seed=5), _rand(B, T, HV, seed=6)
    A_log, dt_bias = torch.rand(HV), _rand(HV * K, seed=7)
    kw = dict(use_qk_l2norm_in_kernel=True, use_beta_sigmoid_in_kernel=True)
    with torch.no_grad():
        if gate == "plain":
            g = -torch.rand(B, T, HV, K) * 3
            o, ht = ops.chunk_kda(q, k, v, g, b, output_final_state=True, **kw)
        elif gate == "softplus":
            o, ht = ops.chunk_kda(q, k, v, raw, b, output_final_state=True, use_gate_in_kernel=True, A_log=A_log,
                                  dt_bias=dt_bias, **kw)
            g = -A_log.exp()[:, None] * F.softplus(raw + dt_bias.view(HV, K))
        elif gate == "lower_bound":
            o, ht = ops.chunk_kda(q, k, v, raw, b, output_final_state=True, use_gate_in_kernel=True, A_log=A_log,
                                  dt_bias=dt_bias, lower_bound=-5.0, safe_gate=True, **kw)
            g = -5.0 * torch.sigmoid(A_log.exp()[:, None] * (raw + dt_bias.view(HV, K)))
        else:
            o, ht = ops.chunk_kda(q, k, v, raw, b, output_final_state=True, use_gate_in_kernel=True, lower_bound=-3.0,
                                  **kw)
            g = -3.0 * torch.sigmoid(raw)
    o_ref, s_ref = recurrent(specs.KDA, *_d(_l2(q), _l2(k), v), g=g.double(), beta=b.sigmoid().double(),
                             output_final_state=True)
    assert_close("o", o, o_ref, TOL)
    assert_close("final state", ht, s_ref, TOL)


@pytest.mark.parametrize("which", ["g", "g_gamma", "both", "none"])
def test_chunk_simple_gla(which):
    q, k, v = _inputs(HV=2)
    g, gamma = -torch.rand(1, 50, 2), -torch.rand(2)
    args = {"g": g if which in ("g", "both") else None, "g_gamma": gamma if which in ("g_gamma", "both") else None}
    with torch.no_grad():
        o, ht = ops.chunk_simple_gla(q, k, v, **args, output_final_state=True)
    total = torch.zeros(1, 50, 2)
    if args["g"] is not None:
        total = total + g
    if args["g_gamma"] is not None:
        total = total + gamma
    o_ref, s_ref = recurrent(specs.SIMPLE_GLA, *_d(q, k, v), g=total.double(), output_final_state=True)
    assert_close("o", o, o_ref, TOL)
    assert_close("final state", ht, s_ref, TOL)


def _ssd_naive(x, dt, A, B, C, D, z, h0):
    """Mamba-2's recurrence written out: h = exp(dt A) h + dt x Bᵀ (h: [p, n]), y = h C + D x."""
    b, L, h, p = x.shape
    rep = h // B.shape[2]
    Bh, Ch = B.repeat_interleave(rep, 2), C.repeat_interleave(rep, 2)
    state = h0.clone() if h0 is not None else x.new_zeros(b, h, p, B.shape[-1])
    ys = []
    for t in range(L):
        decay = torch.exp(dt[:, t] * A)[..., None, None]
        state = decay * state + (dt[:, t, :, None, None] * x[:, t, :, :, None] * Bh[:, t, :, None, :])
        y = torch.einsum("bhpn,bhn->bhp", state, Ch[:, t])
        if D is not None:
            y = y + (D[:, None] if D.dim() == 1 else D) * x[:, t]
        if z is not None:
            y = y * F.silu(z[:, t])
        ys.append(y)
    return torch.stack(ys, 1), state


@pytest.mark.parametrize("variant", ["plain", "softplus_bias_D_z", "limit_Dchannel"])
def test_mamba_chunk_scan_combined(variant):
    b, L, h, p, g, n = 2, 45, 4, 16, 2, 16
    x, B, C = _rand(b, L, h, p, seed=1), _rand(b, L, g, n, seed=2) / 4, _rand(b, L, g, n, seed=3)
    A = -torch.rand(h) * 2 - 0.5
    dt_raw = _rand(b, L, h, seed=4)
    h0 = _rand(b, h, p, n, seed=5)
    kw, D, z = {}, None, None
    if variant == "plain":
        dt = torch.rand(b, L, h) * 0.5
        dt_eff = dt
    elif variant == "softplus_bias_D_z":
        dt, bias = dt_raw, _rand(h, seed=6)
        D, z = _rand(h, seed=7), _rand(b, L, h, p, seed=8)
        kw = dict(dt_bias=bias, dt_softplus=True)
        dt_eff = F.softplus(dt + bias)
    else:
        dt, bias, D = dt_raw, _rand(h, seed=6), _rand(h, p, seed=7)
        kw = dict(dt_bias=bias, dt_softplus=True, dt_limit=(0.1, 0.6))
        dt_eff = F.softplus(dt + bias).clamp(0.1, 0.6)
    with torch.no_grad():
        out, final = ops.mamba_chunk_scan_combined(x, dt, A, B, C, 64, D=D, z=z, initial_states=h0,
                                                   return_final_states=True, **kw)
    y_ref, s_ref = _ssd_naive(*_d(x, dt_eff, A, B, C, D, z, h0))
    assert_close("out", out, y_ref, TOL)
    assert_close("final states", final, s_ref, TOL)


def test_mamba_varlen_states():
    x, B, C = _rand(1, 40, 2, 16, seed=1), _rand(1, 40, 1, 16, seed=2) / 4, _rand(1, 40, 1, 16, seed=3)
    dt, A = torch.rand(1, 40, 2) * 0.5, -torch.rand(2) - 0.5
    cu = torch.tensor([0, 12, 40], dtype=torch.int32)
    seq_idx = torch.tensor([[0] * 12 + [1] * 28], dtype=torch.int32)
    with torch.no_grad():
        out, final, varlen = ops.mamba_chunk_scan_combined(x, dt, A, B, C, 64, seq_idx=seq_idx, cu_seqlens=cu,
                                                           return_final_states=True, return_varlen_states=True)
    parts = [_ssd_naive(*_d(x[:, s:e], dt[:, s:e], A, B[:, s:e], C[:, s:e], None, None, None)) for s, e in ((0, 12), (12, 40))]
    assert_close("out", out, torch.cat([parts[0][0], parts[1][0]], 1), TOL)
    assert_close("varlen states", varlen, torch.cat([parts[0][1], parts[1][1]], 0), TOL)
    assert_close("final state", final, parts[1][1], TOL)


@pytest.mark.parametrize("variant", ["broadcast", "pool_z_Dchannel"])
def test_selective_state_update(variant):
    """mamba_ssm's decode step, as transformers calls it (dt, A, D, dt_bias broadcast along
    the head and state sizes) or with a state pool, a gate and a skip per channel: three
    steps against the float64 recurrence from the same state."""
    b, h, p, g, n, steps = 3, 4, 16, 2, 16, 3
    x, B, C = _rand(b, steps, h, p, seed=1), _rand(b, steps, g, n, seed=2) / 4, _rand(b, steps, g, n, seed=3)
    dt, bias, A = _rand(b, steps, h, seed=4), _rand(h, seed=5), -torch.rand(h) * 2 - 0.5
    h0 = _rand(b, h, p, n, seed=6)
    pooled = variant != "broadcast"
    D = _rand(h, p, seed=7) if pooled else _rand(h, seed=7)[:, None].expand(h, p)
    z = _rand(b, steps, h, p, seed=8) if pooled else None
    rows = torch.tensor([4, 0, 2]) if pooled else None
    state = torch.zeros(6 if pooled else b, h, p, n)
    state[rows if pooled else slice(None)] = h0
    untouched = state[[1, 3, 5]].clone() if pooled else None
    ys = []
    for t in range(steps):
        ys.append(ops.selective_state_update(
            state, x[:, t], dt[:, t, :, None].expand(b, h, p), A[:, None, None].expand(h, p, n), B[:, t], C[:, t],
            D=D, z=None if z is None else z[:, t], dt_bias=bias[:, None].expand(h, p), dt_softplus=True,
            state_batch_indices=rows,
        ))
    y_ref, s_ref = _ssd_naive(*_d(x, F.softplus(dt + bias), A, B, C, D.contiguous(), z, h0))
    assert_close("y", torch.stack(ys, 1), y_ref, TOL)
    assert_close("state", state[rows] if pooled else state, s_ref, TOL)
    if pooled:
        assert torch.equal(state[[1, 3, 5]], untouched)


def test_selective_state_update_errors():
    state, x, B, C = torch.zeros(2, 2, 16, 8), _rand(2, 2, 16), _rand(2, 1, 8), _rand(2, 1, 8)
    dt, A = torch.rand(2, 2, 1).expand(2, 2, 16), -torch.rand(2, 1, 1).expand(2, 16, 8)
    with pytest.raises(ValueError, match="dt: must be the same along headdim"):
        ops.selective_state_update(state, x, torch.rand(2, 2, 16), A, B, C)
    with pytest.raises(ValueError, match="A: must be the same along headdim and dstate"):
        ops.selective_state_update(state, x, dt, -torch.rand(2, 16, 8), B, C)
    with pytest.raises(ValueError, match=r"state: expected a 4-D tensor"):
        ops.selective_state_update(state[:, 0], x[:, 0], dt[:, 0], A[0], B[:, 0], C[:, 0])
    with pytest.raises(ValueError, match=r"state: expected shape \[S, 2, 16, 8\]"):
        ops.selective_state_update(torch.zeros(2, 2, 8, 8), x, dt, A, B, C)
    with pytest.raises(ValueError, match=r"B: expected shape \[2, ngroups, 8\]"):
        ops.selective_state_update(state, x, dt, A, B[..., :4], C)
    with pytest.raises(ValueError, match="state: 2 rows for 3 sequences"):
        ops.selective_state_update(state, _rand(3, 2, 16), dt[:1].expand(3, 2, 16), A, B[:1].expand(3, 1, 8),
                                   C[:1].expand(3, 1, 8))


def test_gradients_through_a_drop_in_op():
    q, k, v = (t.requires_grad_() for t in _inputs(T=30))
    a, b = _rand(1, 30, 4, seed=5).requires_grad_(), _rand(1, 30, 4, seed=6).requires_grad_()
    A_log, dt_bias = (torch.rand(4)).requires_grad_(), _rand(4, seed=7).requires_grad_()
    o, _ = ops.chunk_gated_delta_rule(q, k, v, a, b, use_qk_l2norm_in_kernel=True, use_beta_sigmoid_in_kernel=True,
                                      use_gate_in_kernel=True, A_log=A_log, dt_bias=dt_bias)
    o.square().sum().backward()
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v, a, b, A_log, dt_bias)]
    qd, kd, vd, ad, bd, Ad, dd = leaves
    o2, _ = recurrent(specs.GDN, _l2(qd), _l2(kd), vd, g=-Ad.exp() * F.softplus(ad + dd), beta=bd.sigmoid())
    o2.square().sum().backward()
    for name, mine, ref in zip("q k v a b A_log dt_bias".split(), (q, k, v, a, b, A_log, dt_bias), leaves):
        assert_close(f"d{name}", mine.grad, ref.grad, 1e-4)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda q, k, v, g, b: ops.chunk_gated_delta_rule(q, k, v, g, b, head_first=True), r"unsupported argument\(s\) \['head_first'\]"),
        (lambda q, k, v, g, b: ops.chunk_gated_delta_rule(q, k, v, g, b, cp_context=object()), "cp_context: fla's context object"),
        (lambda q, k, v, g, b: ops.chunk_gated_delta_rule(q, k, v, g, b, chunk_size=128), "chunk_size must be one of"),
        (lambda q, k, v, g, b: ops.chunk_gated_delta_rule(q, k, v, g, b, use_gate_in_kernel=True), "A_log: required"),
        (lambda q, k, v, g, b: ops.chunk_gated_delta_rule(q, k, v, g, b, A_log=g[0, 0]), "A_log: only used with"),
        (lambda q, k, v, g, b: ops.chunk_gated_delta_rule(q, k, v, g, b, allow_neg_eigval=True), "allow_neg_eigval: requires"),
        (lambda q, k, v, g, b: ops.chunk_gated_delta_rule(q, k, v, g, b, cu_seqlens=torch.tensor([0.0, 50.0])), "cu_seqlens: expected dtype"),
        (lambda q, k, v, g, b: ops.chunk_gated_delta_rule(q, k, v, g[..., :3], b), r"g: expected shape \[1, 50, 4\]"),
        (lambda q, k, v, g, b: ops.chunk_kda(q, k, v, g, b, return_intermediate_states=True), "return_intermediate_states"),
    ],
)
def test_drop_in_errors(call, message):
    q, k, v = _inputs()
    with pytest.raises(ValueError, match=message):
        call(q, k, v, -torch.rand(1, 50, 4), torch.rand(1, 50, 4))


def _op_args(name):
    """Valid positional arguments of each public op (small shapes)."""
    q, k, v = _inputs(T=10)
    g, b, gk = -torch.rand(1, 10, 4), torch.rand(1, 10, 4), -torch.rand(1, 10, 4, 16)
    x, B, C = _rand(1, 10, 2, 16), _rand(1, 10, 1, 16), _rand(1, 10, 1, 16)
    return {
        "chunk_gated_delta_rule": (q, k, v, g, b),
        "chunk_gated_delta_product": (q, torch.cat([k, k], 1), torch.cat([v, v], 1), g, torch.cat([b, b], 1), 2),
        "fused_recurrent_gated_delta_rule": (q, k, v, g),
        "chunk_comba": (q, k, v, k, g, b),
        "fused_recurrent_comba": (q, k, k, v, g, b),
        "chunk_dplr_delta_rule": (q, k, v, -k, k, gk),
        "chunk_iplr_delta_rule": (q, k, v, -k, k),
        "fused_recurrent_dplr_delta_rule": (q, k, v, -k, k, gk),
        "fused_recurrent_iplr_delta_rule": (q, k, v, -k, k),
        "chunk_rwkv7": (q, gk, k, v, -k, k),
        "fused_recurrent_rwkv7": (q, gk, k, v, -k, k),
        "fused_mul_recurrent_rwkv7": (q, gk, k, v, k, torch.rand(1, 10, 4, 16)),
        "chunk_kda": (q, k, v, gk, b),
        "fused_recurrent_kda": (q, k, v, gk, b),
        "chunk_simple_gla": (q, k, v, g),
        "mamba_chunk_scan_combined": (x, torch.rand(1, 10, 2), -torch.rand(2), B, C, 64),
        "selective_state_update": (torch.zeros(1, 2, 16, 16), x[:, 0], torch.rand(1, 2, 16), -torch.rand(2, 16, 16),
                                   B[:, 0], C[:, 0]),
    }[name]


@pytest.mark.parametrize("name", ops.__all__)
def test_unknown_keywords_rejected_by_every_op(name):
    """One vocabulary: every op with a catch-all names the keywords it does not take in the
    same ValueError; an op whose peer has no catch-all keeps the peer's exact signature
    (Python's TypeError)."""
    import inspect

    fn = getattr(ops, name)
    if not any(p.kind is p.VAR_KEYWORD for p in inspect.signature(fn).parameters.values()):
        with pytest.raises(TypeError, match="unexpected keyword argument 'head_first'"):
            fn(*_op_args(name), head_first=False)
        return
    with pytest.raises(ValueError, match=rf"^{name}: unsupported argument\(s\) \['bogus', 'head_first'\]$"):
        fn(*_op_args(name), head_first=False, bogus=1)


@pytest.mark.parametrize("name", ops.__all__)
def test_every_op_documents_every_argument(name):
    import inspect

    fn = getattr(ops, name)
    doc = inspect.getdoc(fn) or ""
    assert "\nArgs:\n" in doc and "\nReturns:\n" in doc and "\nRaises:\n" in doc, name
    args = doc.split("\nArgs:\n", 1)[1].split("\nReturns:\n", 1)[0]
    for p in inspect.signature(fn).parameters.values():
        label = f"**{p.name}:" if p.kind is p.VAR_KEYWORD else f"{p.name}:"
        assert f"\n    {label}" in "\n" + args, f"{name}: {p.name} is not documented"


def test_one_compiled_op_per_option_set():
    """Option sets are keyed by value (a frozen dataclass); each compiles once."""
    key = ops._OpKey(decay="scalar", correction="delta", beta=True, chunk_size=32)
    again = ops._OpKey(decay="scalar", correction="delta", beta=True, chunk_size=32)
    assert key == again and hash(key) == hash(again)
    assert ops._compiled(key) is ops._compiled(again)
    assert ops._compiled(key) is not ops._compiled(ops._OpKey(decay="scalar", correction="delta", beta=True))
    with pytest.raises(AttributeError):
        key.chunk_size = 64  # frozen


def test_mamba_errors():
    x, B, C = _rand(1, 10, 2, 16), _rand(1, 10, 1, 16), _rand(1, 10, 1, 16)
    dt, A = torch.rand(1, 10, 2), -torch.rand(2)
    with pytest.raises(ValueError, match="seq_idx, cu_seqlens: packed sequences need both"):
        ops.mamba_chunk_scan_combined(x, dt, A, B, C, 64, cu_seqlens=torch.tensor([0, 10], dtype=torch.int32))
    with pytest.raises(ValueError, match="chunk_size: expected a positive int"):
        ops.mamba_chunk_scan_combined(x, dt, A, B, C, 0)
    with pytest.raises(ValueError, match=r"dt: expected shape \[1, 10, 2\]"):
        ops.mamba_chunk_scan_combined(x, dt[:, :5], A, B, C, 64)


@pytest.mark.parametrize("fused", [False, True])
def test_fused_recurrent_gated_delta_rule(fused):
    q, k, v = _inputs(T=20)
    B, T, HV = 1, 20, 4
    a, b = _rand(B, T, HV, seed=5), _rand(B, T, HV, seed=6)
    A_log, dt_bias = torch.rand(HV), _rand(HV, seed=7)
    h0 = _rand(1, HV, 16, 16, seed=8)
    kw = dict(use_qk_l2norm_in_kernel=True, use_beta_sigmoid_in_kernel=True, use_gate_in_kernel=True, A_log=A_log,
              dt_bias=dt_bias) if fused else {}
    g, beta = (a, b) if fused else (-torch.rand(B, T, HV), torch.rand(B, T, HV))
    with torch.no_grad():
        o, ht = ops.fused_recurrent_gated_delta_rule(q, k, v, g, beta=beta, initial_state=h0, output_final_state=True, **kw)
        o2, ht2 = ops.chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True, **kw)
    assert_close("o vs chunk", o, o2, TOL)
    assert_close("state vs chunk", ht, ht2, TOL)
    # the recurrent kernel and the chunk kernels agree with the oracle independently
    gg, bb, qq, kk = (-A_log.exp() * F.softplus(a + dt_bias), b.sigmoid(), _l2(q), _l2(k)) if fused else (g, beta, q, k)
    o_ref, s_ref = recurrent(specs.GDN, *_d(qq, kk, v), g=gg.double(), beta=bb.double(), initial_state=h0.double(),
                             output_final_state=True)
    assert_close("o", o, o_ref, TOL)
    assert_close("final state", ht, s_ref, TOL)


def test_fused_recurrent_gk_and_no_beta_and_backward():
    q, k, v = (t.requires_grad_() for t in _inputs(T=20))
    gk = (-torch.rand(1, 20, 4, 16)).requires_grad_()
    o, ht = ops.fused_recurrent_gated_delta_rule(q, k, v, gk=gk, output_final_state=True)
    (o.sum() + ht.sum()).backward()
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v, gk)]
    o2, s2 = recurrent(specs.KDA.replace(beta=False), *leaves[:3], g=leaves[3], output_final_state=True)
    (o2.sum() + s2.sum()).backward()
    for name, mine, ref in zip("q k v gk".split(), (q, k, v, gk), leaves):
        assert_close(f"d{name}", mine.grad, ref.grad, 1e-4)


def test_fused_recurrent_kda_varlen():
    q, k, v = _inputs(T=30)
    raw, b = _rand(1, 30, 4, 16, seed=5), _rand(1, 30, 4, seed=6)
    A_log, dt_bias = torch.rand(4), _rand(64, seed=7)
    cu = torch.tensor([0, 7, 30])
    h0 = _rand(2, 4, 16, 16, seed=9)
    with torch.no_grad():
        o, ht = ops.fused_recurrent_kda(q, k, v, raw, b, A_log=A_log, dt_bias=dt_bias, initial_state=h0,
                                        output_final_state=True, use_gate_in_kernel=True, use_beta_sigmoid_in_kernel=True,
                                        use_qk_l2norm_in_kernel=True, cu_seqlens=cu)
    g = -A_log.exp()[:, None] * F.softplus(raw + dt_bias.view(4, 16))
    o_ref, s_ref = recurrent(specs.KDA, *_d(_l2(q), _l2(k), v), g=g.double(), beta=b.sigmoid().double(),
                             initial_state=h0.double(), output_final_state=True, cu_seqlens=cu.int())
    assert_close("o", o, o_ref, TOL)
    assert_close("final states", ht, s_ref, TOL)


@pytest.mark.parametrize(
    "spec, K, V",
    [(specs.KIMI_KDA, 16, 16), (specs.QWEN3_NEXT_GDN, 16, 16), (specs.NEMOTRON_MAMBA2, 16, 16),
     (specs.QWEN3_NEXT_GDN, 128, 80)],  # the step's narrow V tile: 32 columns, three tiles, one partial
    ids=lambda x: getattr(x, "name", str(x)),
)
def test_step_kernel_with_a_state_pool(spec, K, V):
    """Decoding: two tokens at a time for three sequences whose states live in a pool of six;
    two calls continue where the first left off; the other rows of the pool are untouched."""
    import linattn
    from helpers import make_inputs

    op = linattn.compile(spec)
    x = make_inputs(spec, B=3, T=4, H=1, HV=2, K=K, V=V, dtype=torch.float32, h0=True, seed=3)
    h0 = x.kwargs.pop("initial_state")
    pool = _rand(6, 2, K, V, seed=4)
    idx = torch.tensor([4, 0, 2], dtype=torch.int32)
    pool[idx.long()] = h0
    others = pool[[1, 3, 5]].clone()
    outs = []
    for sl in (slice(0, 2), slice(2, 4)):
        part = {n: (t[:, sl] if isinstance(t, torch.Tensor) and t.dim() >= 3 else t) for n, t in x.kwargs.items()}
        outs.append(op.step(x.q[:, sl], x.k[:, sl], x.v[:, sl], pool, state_indices=idx, **part))
    up = {n: (t.double() if isinstance(t, torch.Tensor) else t) for n, t in x.kwargs.items()}
    o_ref, s_ref = recurrent(spec, *_d(x.q, x.k, x.v), initial_state=h0.double(), output_final_state=True, **up)
    assert_close("o", torch.cat(outs, 1), o_ref, TOL)
    assert_close("states", pool[idx.long()], s_ref, TOL)
    assert torch.equal(pool[[1, 3, 5]], others)


def test_step_errors():
    import linattn

    op = linattn.compile(specs.GDN)
    q, k, v = _inputs(B=2, T=1)
    g, beta = -torch.rand(2, 1, 4), torch.rand(2, 1, 4)
    state = torch.zeros(2, 4, 16, 16)
    with pytest.raises(ValueError, match="state: expected a torch.float32 tensor"):
        op.step(q, k, v, state.double(), g=g, beta=beta)
    with pytest.raises(ValueError, match=r"state: expected a contiguous \[S, 4, 16, 16\]"):
        op.step(q, k, v, state[:, :2], g=g, beta=beta)
    with pytest.raises(ValueError, match="state_indices: expected an int32 or int64 tensor"):
        op.step(q, k, v, state, state_indices=torch.tensor([0.0, 1.0]), g=g, beta=beta)
    with pytest.raises(ValueError, match=r"state_indices: expected shape \[2\]"):
        op.step(q, k, v, state, state_indices=torch.tensor([0, 1, 1]), g=g, beta=beta)
    with pytest.raises(ValueError, match="state: 1 rows for 2 sequences"):
        op.step(q, k, v, state[:1], g=g, beta=beta)


class _Layer(torch.nn.Module):
    """A layer calling drop-in ops the way Qwen3-Next's and Nemotron-H's mixers do."""

    def __init__(self):
        super().__init__()
        self.A_log = torch.nn.Parameter(torch.rand(4))
        self.dt_bias = torch.nn.Parameter(_rand(4, seed=11))
        self.A = torch.nn.Parameter(-torch.rand(4) - 0.5)
        self.D = torch.nn.Parameter(_rand(4, seed=12))

    def forward(self, q, k, v, a, b, cu):
        o, ht = ops.chunk_gated_delta_rule(
            q, k, v, a, b, use_qk_l2norm_in_kernel=True, use_beta_sigmoid_in_kernel=True, use_gate_in_kernel=True,
            A_log=self.A_log, dt_bias=self.dt_bias, output_final_state=True, cu_seqlens=cu,
        )
        y = ops.mamba_chunk_scan_combined(v, a.sigmoid(), self.A, k, q, 64, D=self.D, dt_bias=self.dt_bias,
                                          dt_softplus=True)
        return torch.tanh(o) + y, ht


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_torch_compile_fullgraph(backend):
    """torch.compile(fullgraph=True) of a layer calling the ops: no graph break, same results."""
    torch._dynamo.reset()
    layer = _Layer()
    q, k, v = _inputs(T=30)
    a, b = _rand(1, 30, 4, seed=5), _rand(1, 30, 4, seed=6)
    cu = torch.tensor([0, 11, 30], dtype=torch.int32)
    with torch.no_grad():
        ref = layer(q, k, v, a, b, cu)
        out = torch.compile(layer, fullgraph=True, backend=backend)(q, k, v, a, b, cu)
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])


def test_against_fla_naive_references():
    """fla's own pure-torch references (fla-core, a test extra) on the same inputs."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gdn_naive = pytest.importorskip("fla.ops.gated_delta_rule.naive")
        kda_naive = pytest.importorskip("fla.ops.kda.naive")
        gla_naive = pytest.importorskip("fla.ops.simple_gla.naive")
    q, k, v = _inputs(H=4, T=40)
    k = F.normalize(k, dim=-1)
    g, beta = -torch.rand(1, 40, 4), torch.rand(1, 40, 4)
    h0 = _rand(1, 4, 16, 16, seed=3)
    with torch.no_grad():
        o, ht = ops.chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True)
        o_f, ht_f = ops.fused_recurrent_gated_delta_rule(q, k, v, g, beta=beta, initial_state=h0, output_final_state=True)
    o_ref, s_ref = gdn_naive.naive_recurrent_gated_delta_rule(q, k, v, beta, g, initial_state=h0, output_final_state=True)
    for name, mine, ref in (("o", o, o_ref), ("state", ht, s_ref), ("o recurrent", o_f, o_ref), ("state recurrent", ht_f, s_ref)):
        assert_close(f"GDN {name}", mine, ref.float(), 1e-5)

    gk = -torch.rand(1, 40, 4, 16) * 2
    q2, k2, v2 = _inputs(H=2, HV=4, T=40, seed=9)
    h2 = _rand(1, 4, 16, 16, seed=4)
    with torch.no_grad():
        o, ht = ops.chunk_kda(q2, k2, v2, gk, beta, initial_state=h2, output_final_state=True)
    o_ref, s_ref = kda_naive.naive_recurrent_kda(q2, k2, v2, gk, beta, initial_state=h2, output_final_state=True)
    assert_close("KDA o", o, o_ref.float(), 1e-5)
    assert_close("KDA state", ht, s_ref.float(), 1e-5)

    q3, k3, v3 = _inputs(H=2, HV=2, T=40, seed=12)
    gs = -torch.rand(1, 40, 2)
    with torch.no_grad():
        o, ht = ops.chunk_simple_gla(q3, k3, v3, g=gs, output_final_state=True)
    o_ref, s_ref = gla_naive.naive_recurrent_simple_gla(q3, k3, v3, gs, output_final_state=True)
    assert_close("simple GLA o", o, o_ref.float(), 1e-5)
    assert_close("simple GLA state", ht, s_ref.float(), 1e-5)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_torch_compile_training(backend):
    """Gradients through the compiled layer equal eager ones (the custom op's registered backward)."""
    torch._dynamo.reset()
    q, k, v = _inputs(T=30)
    a, b = _rand(1, 30, 4, seed=5), _rand(1, 30, 4, seed=6)
    cu = torch.tensor([0, 11, 30], dtype=torch.int32)
    grads = []
    for compiled in (False, True):
        torch.manual_seed(0)
        layer = _Layer()
        xs = [t.clone().requires_grad_() for t in (q, k, v, a, b)]
        fn = torch.compile(layer, fullgraph=True, backend=backend) if compiled else layer
        o, ht = fn(*xs, cu)
        (o.square().sum() + ht.sum()).backward()
        grads.append([t.grad for t in xs] + [p.grad for p in layer.parameters()])
    for g_eager, g_compiled in zip(*grads):
        assert g_eager is not None and torch.allclose(g_eager, g_compiled, rtol=1e-6, atol=1e-7)
