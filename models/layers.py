"""The transformer pieces the three hybrids share: norms, attention, MLPs, expert dispatch.

Each follows the arithmetic of the reference implementations exactly (where they compute
in fp32 and where they cast back), so fp32 logits agree to rounding and bf16 ones to bf16.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "RMSNorm", "GatedMLP", "BiasedRouter", "activation", "attention", "dispatch_experts", "gated_rms_norm",
    "stacked_experts", "rotate_half_rope",
]


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


def gated_rms_norm(
    y: torch.Tensor,
    z: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
    group_size: int,
    norm_before_gate: bool = False,
) -> torch.Tensor:
    """RMSNorm over groups of ``group_size`` channels with a ``silu(z)`` gate, in fp32:
    ``rms(y · silu(z)) · w`` (Mamba-2's order) or, with ``norm_before_gate``,
    ``rms(y) · w · silu(z)``. Returns ``y``'s dtype."""
    h = y.float()
    gate = None if z is None else F.silu(z.float())
    if gate is not None and not norm_before_gate:
        h = h * gate
    groups = h.unflatten(-1, (-1, group_size))
    h = weight.float() * (groups * torch.rsqrt(groups.pow(2).mean(-1, keepdim=True) + eps)).flatten(-2)
    if gate is not None and norm_before_gate:
        h = h * gate
    return h.to(y.dtype)


class GatedMLP(nn.Module):
    """``down(act(gate(x)) · up(x))`` — the SwiGLU MLP of Qwen3-Next and Kimi Linear."""

    expert_projections = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}  # for dispatch_experts

    def __init__(self, hidden: int, intermediate: int, act: str = "silu") -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)
        self.act = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class BiasedRouter(nn.Module):
    """DeepSeek-V3-style expert choice (Nemotron-H's and Kimi Linear's MoE).

    Scores are ``sigmoid`` (or ``softmax``) of the fp32 router logits; the correction bias
    ``e_score_correction_bias`` is added for the choice only. With ``topk_group < n_group``
    the experts are split into ``n_group`` groups, each group scored by the sum of its two
    best biased scores, and only the best ``topk_group`` groups stay eligible. The chosen
    experts' unbiased scores are the weights, optionally renormalised to sum to one, times
    ``scaling``. Weight and bias are meant to stay fp32 in a low-precision model.
    """

    def __init__(
        self,
        hidden: int,
        experts: int,
        top_k: int,
        *,
        n_group: int = 1,
        topk_group: int = 1,
        renormalize: bool = True,
        scaling: float = 1.0,
        scoring: str = "sigmoid",
    ) -> None:
        super().__init__()
        if scoring not in ("sigmoid", "softmax"):
            raise ValueError(f"scoring: expected 'sigmoid' or 'softmax', got {scoring!r}")
        if experts % n_group:
            raise ValueError(f"n_group: {n_group} groups must divide {experts} experts")
        self.top_k, self.n_group, self.topk_group = top_k, n_group, topk_group
        self.renormalize, self.scaling, self.scoring = renormalize, scaling, scoring
        self.weight = nn.Parameter(torch.zeros(experts, hidden))
        self.register_buffer("e_score_correction_bias", torch.zeros(experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Routing weights (fp32) and expert indices, both ``[N, top_k]``, for tokens ``x`` ``[N, hidden]``."""
        logits = F.linear(x.float(), self.weight.float())
        scores = logits.sigmoid() if self.scoring == "sigmoid" else logits.softmax(-1)
        choice = scores + self.e_score_correction_bias.float()
        if self.topk_group < self.n_group:
            N, E = choice.shape
            by_group = choice.view(N, self.n_group, E // self.n_group)
            group_scores = by_group.topk(2, dim=-1).values.sum(-1)
            keep = torch.zeros_like(group_scores, dtype=torch.bool)
            keep.scatter_(1, group_scores.topk(self.topk_group, dim=-1).indices, True)
            choice = choice.masked_fill(~keep.repeat_interleave(E // self.n_group, dim=1), float("-inf"))
        indices = choice.topk(self.top_k, dim=-1).indices
        weights = scores.gather(1, indices)
        if self.renormalize:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return weights * self.scaling, indices


def dispatch_experts(x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, experts: nn.ModuleList) -> torch.Tensor:
    """``Σ_j weights[:, j] · experts[indices[:, j]](x)`` for tokens ``x`` ``[N, hidden]``.

    Three paths. Without autograd (a decode step, a prefill for generation) nothing is read
    back to the host, so a step can be captured in a CUDA graph:

    - at most one (token, expert) pair per expert: every pair runs its expert on the stacked
      weights (:func:`stacked_experts`) gathered by ``indices`` on the device, reading no
      more weight matrices than there are experts;
    - more pairs: the pairs sorted by expert run as grouped matrix products over the stacked
      weights, the groups' bounds found on the device (:func:`_grouped_experts`), where
      ``torch._grouped_mm`` takes the expert (its projections and their dtype);
    - otherwise, and in training, each expert runs once on the tokens routed to it (a gather,
      the expert's MLP and a scatter-add), so the cost follows the routing, not the number
      of experts; the per-expert token counts are read on the host to slice.
    """
    N, k = indices.shape
    if not torch.is_grad_enabled() and N * k > len(experts):
        out = _grouped_experts(x, weights, indices, experts)
        if out is not None:
            return out
    if N * k <= len(experts) and not torch.is_grad_enabled():
        stack = stacked_experts(experts)
        flat = indices.reshape(-1)
        params = {name: t.index_select(0, flat) for name, t in stack.items()}
        xs = x[:, None].expand(N, k, x.shape[-1]).reshape(N * k, x.shape[-1])
        run = torch.func.vmap(lambda p, xi: torch.func.functional_call(experts[0], p, (xi,)))
        y = run(params, xs).view(N, k, -1)
        return (y * weights[..., None].to(y.dtype)).sum(1).to(x.dtype)
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


def _grouped_experts(x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, experts: nn.ModuleList) -> torch.Tensor | None:
    """The experts as grouped matrix products (``torch._grouped_mm``), or None where it does
    not apply: experts that do not name their linear projections in ``expert_projections``
    (``{"gate": ..., "up": ..., "down": ...}``: ``down(act(gate(x)) · up(x))``; without
    ``"gate"``: ``down(act(up(x)))``), or a product it does not take (CPU: fp32, bf16, fp16;
    CUDA: sm_90 on, bf16, rows of 16-byte multiples). The (token, expert) pairs are sorted
    by expert; group ``e`` ends where the sorted experts pass ``e`` (a search on the device,
    where a bincount would read its size back); each pair's output is put back in its place
    and weighted."""
    if not hasattr(torch, "_grouped_mm"):
        return None
    roles = getattr(experts[0], "expert_projections", None)  # {"gate"?, "up", "down"} -> Linear names
    if not roles or {"up", "down"} - set(roles) or set(roles) - {"gate", "up", "down"}:
        return None
    stack = stacked_experts(experts)
    names = tuple(roles.values())
    if set(stack) - {f"{n}.{kind}" for n in names for kind in ("weight", "bias")}:
        return None
    w = {n: stack[f"{n}.weight"].transpose(1, 2) for n in names}  # [E, in, out]
    takes = {"cpu": (torch.float32, torch.bfloat16, torch.float16), "cuda": (torch.bfloat16,)}.get(x.device.type, ())
    if x.dtype not in takes or any(t.dtype != x.dtype for t in w.values()):
        return None
    if x.device.type == "cuda" and (
        torch.cuda.get_device_capability(x.device) < (9, 0) or any(t.shape[1] % 8 or t.shape[2] % 8 for t in w.values())
    ):
        return None
    N, k = indices.shape
    flat = indices.reshape(-1)
    order = torch.argsort(flat, stable=True)
    experts_sorted = flat.index_select(0, order)
    ends = torch.searchsorted(experts_sorted, torch.arange(len(experts), device=x.device, dtype=flat.dtype), right=True, out_int32=True)

    def project(h: torch.Tensor, name: str) -> torch.Tensor:
        y = torch._grouped_mm(h, w[name], offs=ends)
        bias = stack.get(f"{name}.bias")
        return y if bias is None else y + bias.index_select(0, experts_sorted).to(y.dtype)

    xs = x.index_select(0, order // k)
    act = experts[0].act
    up = project(xs, roles["up"])
    h = act(project(xs, roles["gate"])) * up if "gate" in roles else act(up)
    y = project(h.to(x.dtype), roles["down"])
    y = torch.empty_like(y).index_copy_(0, order, y).view(N, k, -1)
    return (y * weights[..., None].to(y.dtype)).sum(1).to(x.dtype)


def stacked_experts(experts: nn.ModuleList) -> dict[str, torch.Tensor]:
    """The experts' parameters as one ``[E, ...]`` tensor per name (``gate_proj.weight``, ...).

    Built once: each expert's parameter is then re-pointed (its ``.data``) to its row of the
    stack, so the weights are held once, and loading weights in place, or an optimizer step,
    keeps them shared. A move or cast gives the parameters new storage; the first and last
    experts' pointers show it, and the stack is built again.
    """
    names = [n for n, _ in experts[0].named_parameters()]
    stack = experts.__dict__.get("_linattn_stack")
    if stack is not None and all(
        stack[n][i].data_ptr() == experts[i].get_parameter(n).data_ptr() and stack[n].dtype == experts[i].get_parameter(n).dtype
        for n in names for i in (0, len(experts) - 1)
    ):
        return stack
    with torch.no_grad():
        stack = {n: torch.stack([e.get_parameter(n) for e in experts]) for n in names}
        for n, t in stack.items():
            for i, e in enumerate(experts):
                e.get_parameter(n).data = t[i]
    experts.__dict__["_linattn_stack"] = stack
    return stack


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


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    key_mask: torch.Tensor | None = None,
    segments: torch.Tensor | None = None,
    q_start: int | None = None,
) -> torch.Tensor:
    """Causal attention of ``q`` ``[B, Tq, H, D]`` over ``k, v`` ``[B, Tk, Hkv, D(v)]``.

    The queries are the last ``Tq`` of the ``Tk`` positions (a decode step sees the whole
    cache); ``H`` must be a multiple of ``Hkv`` (grouped-query attention); ``key_mask``
    ``[B, Tk]`` (True: attend) hides padding; ``segments`` ``[B, T]`` (sequence index of
    each packed token, Tq = Tk) keeps packed sequences apart. ``q_start``: the queries are
    positions ``q_start ..`` of the keys instead (a share of a stream under context
    parallelism, ``segments`` the keys'). Runs ``scaled_dot_product_attention``; returns
    ``[B, Tq, H, Dv]``.
    """
    Tq, Tk = q.shape[1], k.shape[1]
    H, Hkv = q.shape[2], k.shape[2]
    if H % Hkv:
        raise ValueError(f"k: its {Hkv} heads must divide q's {H} heads")
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    if Hkv != H:
        k = k.repeat_interleave(H // Hkv, dim=1)
        v = v.repeat_interleave(H // Hkv, dim=1)
    if q_start is not None:
        qs = segments[:, q_start : q_start + Tq]
        mask = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(q_start)
        mask = mask & (qs[:, None, :, None] == segments[:, None, None, :])
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    elif Tq == Tk and key_mask is None and segments is None:
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    else:
        mask = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(Tk - Tq)
        if key_mask is not None:
            mask = mask[None, None] & key_mask[:, None, None, :]
        if segments is not None:
            mask = mask & (segments[:, None, :, None] == segments[:, None, None, :])
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return o.transpose(1, 2)
