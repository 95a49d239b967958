"""The transformer pieces the three hybrids share: norms, attention, MLPs, expert dispatch.

Each follows the arithmetic of the reference implementations exactly (where they compute
in fp32 and where they cast back), so fp32 logits agree to rounding and bf16 ones to bf16.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["RMSNorm", "GatedMLP", "activation", "attention", "dispatch_experts", "rotate_half_rope"]


def activation(name: str):
    """The activation function called ``name`` in the checkpoints' configs."""
    if name in ("silu", "swish"):
        return F.silu
    if name == "relu2":
        return lambda x: torch.square(F.relu(x))
    if name == "gelu":
        return F.gelu
    if name == "sigmoid":
        return torch.sigmoid
    raise ValueError(f"activation: unsupported activation {name!r}")


class RMSNorm(nn.Module):
    """``x / rms(x) · w`` computed in fp32.

    ``zero_centered`` stores ``w - 1`` (Qwen3-Next: the scale is ``1 + weight`` and the
    product happens before the cast back); otherwise the normalised value is cast back
    to the input dtype first and then scaled (Llama's order).
    """

    def __init__(self, size: int, eps: float = 1e-6, zero_centered: bool = False) -> None:
        super().__init__()
        self.eps = eps
        self.zero_centered = zero_centered
        self.weight = nn.Parameter(torch.zeros(size) if zero_centered else torch.ones(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.zero_centered:
            return (h * (1.0 + self.weight.float())).to(x.dtype)
        return self.weight * h.to(x.dtype)


class GatedMLP(nn.Module):
    """``down(act(gate(x)) · up(x))`` — the SwiGLU MLP of Qwen3-Next and Kimi Linear."""

    def __init__(self, hidden: int, intermediate: int, act: str = "silu") -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)
        self.act = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


def dispatch_experts(x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, experts: nn.ModuleList) -> torch.Tensor:
    """``Σ_j weights[:, j] · experts[indices[:, j]](x)`` for tokens ``x`` ``[N, hidden]``.

    Each expert runs once on the tokens routed to it (a gather, the expert's MLP and a
    scatter-add), so the cost follows the routing, not the number of experts.
    """
    out = torch.zeros_like(x)
    flat = indices.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=len(experts)).tolist()
    token = order // indices.shape[1]
    scale = weights.reshape(-1)[order]
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        rows = token[start:start + n]
        y = experts[e](x[rows]) * scale[start:start + n, None].to(x.dtype)
        out.index_add_(0, rows, y)
        start += n
    return out


def rotate_half_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding in the "rotate half" layout on the first ``cos.shape[-1]`` dims of ``x``.

    ``x`` ``[B, T, H, D]``, ``cos``/``sin`` ``[B or 1, T, R]`` with R <= D (partial RoPE
    leaves the remaining ``D - R`` dims untouched).
    """
    R = cos.shape[-1]
    rot, rest = x[..., :R], x[..., R:]
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    a, b = rot[..., : R // 2], rot[..., R // 2:]
    rotated = torch.cat((-b, a), dim=-1)
    return torch.cat((rot * cos + rotated * sin, rest), dim=-1)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention of ``q`` ``[B, Tq, H, D]`` over ``k, v`` ``[B, Tk, Hkv, D(v)]``.

    The queries are the last ``Tq`` of the ``Tk`` positions (a decode step sees the whole
    cache); ``H`` must be a multiple of ``Hkv`` (grouped-query attention). Runs
    ``scaled_dot_product_attention``; returns ``[B, Tq, H, Dv]``.
    """
    Tq, Tk = q.shape[1], k.shape[1]
    H, Hkv = q.shape[2], k.shape[2]
    if H % Hkv:
        raise ValueError(f"k: its {Hkv} heads must divide q's {H} heads")
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    if Hkv != H:
        k = k.repeat_interleave(H // Hkv, dim=1)
        v = v.repeat_interleave(H // Hkv, dim=1)
    if Tq == Tk:
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    else:
        mask = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(Tk - Tq)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return o.transpose(1, 2)
