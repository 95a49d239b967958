"""The causal depthwise convolution of the hybrid layers, prefill and decode."""
import pytest
import torch
import torch.nn.functional as F

from linattn.models.conv import causal_conv1d, causal_conv1d_update


def _naive(x, w, b, prev):
    """y_t = Σ_j w_j x_(t - W + 1 + j) + b, written out; prev: the W - 1 inputs before x."""
    D, W = w.shape
    full = torch.cat([prev.transpose(0, 1), x], 0)  # [W - 1 + L, D]
    ys = []
    for t in range(x.shape[0]):
        window = full[t : t + W]  # [W, D]
        ys.append((window * w.transpose(0, 1)).sum(0) + (b if b is not None else 0))
    return torch.stack(ys, 0)


@pytest.mark.parametrize("activation", [None, "silu"])
def test_prefill_varlen_and_states(activation):
    g = torch.Generator().manual_seed(0)
    D, W = 6, 4
    w, b = torch.randn(D, W, generator=g), torch.randn(D, generator=g)
    x = torch.randn(1, 17, D, generator=g)
    cu = torch.tensor([0, 2, 11, 17], dtype=torch.int32)
    h0 = torch.randn(3, D, W - 1, generator=g)
    y, hT = causal_conv1d(x, w, b, activation, initial_state=h0, output_final_state=True, cu_seqlens=cu)
    for n, (s, e) in enumerate(((0, 2), (2, 11), (11, 17))):
        ref = _naive(x[0, s:e], w, b, h0[n])
        ref = F.silu(ref) if activation else ref
        torch.testing.assert_close(y[0, s:e], ref, rtol=1e-5, atol=1e-5)
        full = torch.cat([h0[n], x[0, s:e].transpose(0, 1)], 1)
        torch.testing.assert_close(hT[n], full[:, -(W - 1) :])


def test_decode_continues_prefill_in_a_state_pool():
    g = torch.Generator().manual_seed(1)
    D, W = 5, 4
    w, b = torch.randn(D, W, generator=g), torch.randn(D, generator=g)
    x = torch.randn(2, 12, D, generator=g)
    y_full, _ = causal_conv1d(x, w, b, "silu")
    _, state = causal_conv1d(x[:, :9], w, b, "silu", output_final_state=True)
    pool = torch.zeros(4, D, W - 1)
    idx = torch.tensor([3, 1], dtype=torch.int32)
    pool[idx.long()] = state
    outs = [causal_conv1d_update(x[:, 9], pool, w, b, "silu", state_indices=idx)]
    outs.append(causal_conv1d_update(x[:, 10:12], pool, w, b, "silu", state_indices=idx))
    torch.testing.assert_close(torch.cat([outs[0][:, None], outs[1]], 1), y_full[:, 9:], rtol=1e-5, atol=1e-5)
    assert pool[[0, 2]].abs().sum() == 0


def test_errors():
    x, w = torch.randn(1, 5, 4), torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"weight: expected \[D, W\] with D = 4"):
        causal_conv1d(x, torch.randn(3, 3))
    with pytest.raises(ValueError, match="activation: expected None, 'silu'"):
        causal_conv1d(x, w, activation="gelu")
    with pytest.raises(ValueError, match=r"initial_state: expected shape \[1, 4, 2\]"):
        causal_conv1d(x, w, initial_state=torch.zeros(1, 4, 3))
    with pytest.raises(ValueError, match=r"conv_state: expected \[S, 4, L\] with L >= 2"):
        causal_conv1d_update(x[:, 0], torch.zeros(1, 4, 1), w)


def test_update_keeps_a_longer_state():
    """A state of L > W - 1 columns (transformers keeps W) gives the same outputs and keeps
    the last L inputs."""
    torch.manual_seed(0)
    x, w, b = torch.randn(2, 3, 4), torch.randn(4, 3), torch.randn(4)
    long = torch.randn(2, 4, 5)
    long_state, short = long.clone(), long[:, :, -2:].clone()
    y_long = causal_conv1d_update(x, long_state, w, b, "silu")
    y_short = causal_conv1d_update(x, short, w, b, "silu")
    torch.testing.assert_close(y_long, y_short, rtol=1e-6, atol=1e-6)
    expected = torch.cat([long, x.transpose(1, 2)], 2)[:, :, -5:]
    torch.testing.assert_close(long_state, expected, rtol=0, atol=0)
