"""The short causal depthwise convolution of the hybrid layers, with a decode state.

Mamba-2, Gated DeltaNet and KDA all run their projections through a width-W (usually 4)
causal depthwise convolution, often followed by SiLU. Prefill convolves whole sequences
(packed ones each on its own); decoding keeps the last W - 1 inputs of every sequence as
its state and updates it in place. Plain torch: the convolution is a small fraction of a
layer's time and its bytes are the projection's, which the matmul already streams.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["causal_conv1d", "causal_conv1d_update"]


def _activate(y: torch.Tensor, activation: str | None) -> torch.Tensor:
    if activation is None:
        return y
    if activation in ("silu", "swish"):
        return F.silu(y)
    raise ValueError(f"activation: expected None, 'silu' or 'swish', got {activation!r}")


def _check(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[int, int]:
    if weight.dim() != 2 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"weight: expected [D, W] with D = {x.shape[-1]}, got {list(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (x.shape[-1],):
        raise ValueError(f"bias: expected shape [{x.shape[-1]}], got {list(bias.shape)}")
    return weight.shape


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    *,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``y_t = act(Σ_j w_j · x_(t - W + 1 + j) + b)`` per channel, for ``x`` ``[B, T, D]``.

    ``initial_state`` ``[N, D, W - 1]`` holds the inputs before each sequence (zeros if
    None); with ``cu_seqlens`` (B = 1) the packed sequences are convolved separately.
    Returns ``y`` ``[B, T, D]`` and, if asked, the final states ``[N, D, W - 1]``.
    """
    if x.dim() != 3:
        raise ValueError(f"x: expected [B, T, D], got {list(x.shape)}")
    D, W = _check(x, weight, bias)
    if cu_seqlens is None:
        segments = [(b, 0, x.shape[1]) for b in range(x.shape[0])]
    else:
        if x.shape[0] != 1:
            raise ValueError(f"cu_seqlens: packed sequences need batch 1, got {x.shape[0]}")
        bounds = cu_seqlens.tolist()
        segments = [(0, bounds[i], bounds[i + 1]) for i in range(len(bounds) - 1)]
    N = len(segments)
    if initial_state is not None and tuple(initial_state.shape) != (N, D, W - 1):
        raise ValueError(f"initial_state: expected shape {[N, D, W - 1]}, got {list(initial_state.shape)}")
    ys, finals = [], []
    for n, (b, s, e) in enumerate(segments):
        seq = x[b, s:e].transpose(0, 1)  # [D, L]
        prev = initial_state[n].to(x.dtype) if initial_state is not None else seq.new_zeros(D, W - 1)
        full = torch.cat([prev, seq], dim=1)  # [D, W - 1 + L]
        y = F.conv1d(full[None], weight[:, None, :].to(x.dtype), bias.to(x.dtype) if bias is not None else None, groups=D)
        ys.append(y[0].transpose(0, 1))
        finals.append(full[:, full.shape[1] - (W - 1) :])
    y = torch.cat(ys, 0).reshape(x.shape) if cu_seqlens is not None else torch.stack(ys, 0)
    return _activate(y, activation), (torch.stack(finals, 0) if output_final_state else None)


def causal_conv1d_update(
    x: torch.Tensor,
    conv_state: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    *,
    state_indices: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode: ``x`` ``[N, D]`` (one new token) or ``[N, T, D]``; ``conv_state`` ``[S, D, L]``,
    the last ``L >= W - 1`` inputs (causal_conv1d's layout; transformers keeps ``L = W``),
    updated in place (row ``state_indices[n]`` for sequence n, or row n)."""
    single = x.dim() == 2
    xs = x[:, None] if single else x
    if xs.dim() != 3:
        raise ValueError(f"x: expected [N, D] or [N, T, D], got {list(x.shape)}")
    D, W = _check(xs, weight, bias)
    rows = torch.arange(xs.shape[0], device=x.device) if state_indices is None else state_indices.long()
    if conv_state.dim() != 3 or conv_state.shape[1] != D or conv_state.shape[2] < W - 1:
        raise ValueError(f"conv_state: expected [S, {D}, L] with L >= {W - 1}, got {list(conv_state.shape)}")
    L = conv_state.shape[2]
    state = conv_state[rows]
    full = torch.cat([state.to(x.dtype), xs.transpose(1, 2)], dim=2)  # [N, D, L + T]
    y = F.conv1d(full[:, :, L - (W - 1) :], weight[:, None, :].to(x.dtype),
                 bias.to(x.dtype) if bias is not None else None, groups=D)
    conv_state[rows] = full[:, :, full.shape[2] - L :].to(conv_state.dtype)
    y = _activate(y.transpose(1, 2), activation)
    return y[:, 0] if single else y
