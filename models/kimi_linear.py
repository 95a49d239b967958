"""Kimi Linear: KDA layers interleaved with position-free MLA, over a DeepSeek-style MoE.

Most layers are Kimi Delta Attention (a delta rule with a per-channel decay) run by the
compiled ``KIMI_KDA`` op, which computes the decay ``-exp(A_log)·softplus(f + dt_bias)``
and ``β = sigmoid(b)`` inside the kernel. Every few layers a multi-head latent attention
layer without positional encoding sees the whole context; its decode cache holds the
expanded keys and values. The feed-forward blocks are a dense SwiGLU MLP in the first
layers and routed experts (sigmoid router, bias used only for the choice) plus shared
experts elsewhere.

Checkpoints come in two dialects: the Hub's (``linear_attn_config`` with 1-indexed layer
lists, ``first_k_dense_replace``, dense MLPs named ``mlp.*``) and the one ``transformers``
writes (``layer_types``, ``mlp_layer_types``, ``linear_*`` fields, every MLP named
``block_sparse_moe.*``). Both load into the same module tree.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

import linattn
from linattn.specs import KIMI_KDA

from .cache import Cache, attend, run_conv, run_recurrence
from .checkpoint import CheckpointTensors, config_dtype
from .generation import CausalLM
from .layers import BiasedRouter, GatedMLP, RMSNorm, activation, dispatch_experts

__all__ = ["KimiLinearConfig", "KimiLinearForCausalLM"]

log = logging.getLogger(__name__)

# Parameters that stay fp32 whatever the model's dtype: the router (its scores pick the
# experts, so rounding them changes the choice) and the decay bias.
_FP32_PARAMS = ("block_sparse_moe.gate.weight", "block_sparse_moe.gate.e_score_correction_bias", "self_attn.dt_bias")


def _pick(d: dict, *names: str, default: Any = None) -> Any:
    """The value of the first of ``names`` in ``d``; spellings present together must agree."""
    found = [(n, d[n]) for n in names if n in d]
    for n, v in found[1:]:
        if v != found[0][1]:
            raise ValueError(f"{n}: {v!r} disagrees with {found[0][0]} = {found[0][1]!r}")
    return found[0][1] if found else default


def _layer_types_from_lists(linear: dict, num_layers: int) -> list[str]:
    """``layer_types`` from the Hub's 1-indexed ``kda_layers`` / ``full_attn_layers``."""
    types: list[str | None] = [None] * num_layers
    for key, kind in (("kda_layers", "linear_attention"), ("full_attn_layers", "full_attention")):
        for layer in linear[key]:
            if not isinstance(layer, int) or not 1 <= layer <= num_layers:
                raise ValueError(f"linear_attn_config: {key} holds {layer!r}, not a layer number in 1..{num_layers}")
            if types[layer - 1] is not None:
                raise ValueError(f"linear_attn_config: layer {layer} is listed twice")
            types[layer - 1] = kind
    absent = [i + 1 for i, t in enumerate(types) if t is None]
    if absent:
        raise ValueError(f"linear_attn_config: layers {absent} are in neither kda_layers nor full_attn_layers")
    return types  # type: ignore[return-value]


@dataclass
class KimiLinearConfig:
    """The fields the model is built from, read from either checkpoint dialect."""

    vocab_size: int = 163840
    hidden_size: int = 2304
    intermediate_size: int = 9216
    moe_intermediate_size: int = 1024
    num_hidden_layers: int = 27
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    q_lora_rank: int | None = None
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    attention_bias: bool = False
    linear_num_heads: int = 32
    linear_head_dim: int = 128
    linear_conv_kernel_dim: int = 4
    layer_types: list[str] = field(default_factory=list)
    mlp_layer_types: list[str] = field(default_factory=list)
    num_experts: int = 256
    num_experts_per_token: int = 8
    num_shared_experts: int = 1
    routed_scaling_factor: float = 2.446
    use_grouped_topk: bool = True
    num_expert_group: int = 1
    topk_group: int = 1
    moe_renormalize: bool = True
    moe_router_activation_func: str = "sigmoid"
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        self.validate()

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def validate(self) -> None:
        """Raise ValueError naming the first field that does not fit the others."""
        n = self.num_hidden_layers
        if not self.layer_types:
            self.layer_types = ["full_attention" if i and i % 4 == 0 else "linear_attention" for i in range(n)]
        if not self.mlp_layer_types:
            self.mlp_layer_types = ["dense" if i < 1 else "sparse" for i in range(n)]
        if len(self.layer_types) != n or not set(self.layer_types) <= {"linear_attention", "full_attention"}:
            raise ValueError(f"layer_types: expected {n} of 'linear_attention' / 'full_attention', "
                             f"got {self.layer_types}")
        if len(self.mlp_layer_types) != n or not set(self.mlp_layer_types) <= {"dense", "sparse"}:
            raise ValueError(f"mlp_layer_types: expected {n} of 'dense'/'sparse', got {self.mlp_layer_types}")
        if self.moe_router_activation_func not in ("sigmoid", "softmax"):
            raise ValueError("moe_router_activation_func: expected 'sigmoid' or 'softmax', "
                             f"got {self.moe_router_activation_func!r}")
        activation(self.hidden_act)
        if "sparse" in self.mlp_layer_types:
            if not 1 <= self.num_experts_per_token <= self.num_experts:
                raise ValueError(f"num_experts_per_token: {self.num_experts_per_token} is not in "
                                 f"1..num_experts ({self.num_experts})")
            if self.num_expert_group < 1 or self.num_experts % self.num_expert_group:
                raise ValueError(f"num_expert_group: {self.num_expert_group} does not divide "
                                 f"num_experts ({self.num_experts})")
            if not 1 <= self.topk_group <= self.num_expert_group:
                raise ValueError(f"topk_group: {self.topk_group} is not in "
                                 f"1..num_expert_group ({self.num_expert_group})")
            if self.topk_group < self.num_expert_group and self.num_experts // self.num_expert_group < 2:
                raise ValueError(f"num_expert_group: groups of {self.num_experts // self.num_expert_group} "
                                 "expert cannot be ranked by their top two")
        for name in ("hidden_size", "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim", "v_head_dim",
                     "linear_num_heads", "linear_head_dim", "linear_conv_kernel_dim", "vocab_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name}: expected a positive integer, got {getattr(self, name)!r}")

    @classmethod
    def from_dict(cls, d: dict) -> "KimiLinearConfig":
        """Read a ``config.json`` dict in the Hub or the transformers dialect (other keys are ignored)."""
        if not isinstance(d, dict):
            raise ValueError(f"d: expected a dict, got {type(d).__name__}")
        if d.get("mla_use_nope") is False:
            raise ValueError("mla_use_nope: only the position-free MLA of Kimi Linear is supported")
        names = {f.name for f in dataclasses.fields(cls)}
        kw: dict[str, Any] = {k: v for k, v in d.items() if k in names and k != "dtype"}
        aliases = {
            "num_experts": ("num_experts", "num_local_experts", "n_routed_experts"),
            "num_experts_per_token": ("num_experts_per_token", "num_experts_per_tok"),
            "num_shared_experts": ("num_shared_experts", "n_shared_experts"),
            "num_expert_group": ("num_expert_group", "n_group"),
            "moe_renormalize": ("moe_renormalize", "norm_topk_prob"),
        }
        for name, spellings in aliases.items():
            value = _pick(d, *spellings)
            if value is not None:
                kw[name] = value
        dtype = config_dtype(d)
        if dtype is not None:
            kw["dtype"] = dtype
        if kw.get("num_key_value_heads") is None:
            kw["num_key_value_heads"] = d.get("num_attention_heads", cls.num_attention_heads)
        if kw.get("num_shared_experts") is None:
            kw["num_shared_experts"] = 0
        num_layers = d.get("num_hidden_layers", cls.num_hidden_layers)

        linear = d.get("linear_attn_config") or {}
        if not isinstance(linear, dict):
            raise ValueError(f"linear_attn_config: expected a dict, got {type(linear).__name__}")
        for key, flat in (("num_heads", "linear_num_heads"), ("head_dim", "linear_head_dim"),
                          ("short_conv_kernel_size", "linear_conv_kernel_dim")):
            if key in linear:
                if flat in d and d[flat] != linear[key]:
                    raise ValueError(f"{flat}: {d[flat]!r} disagrees with linear_attn_config.{key} = {linear[key]!r}")
                kw[flat] = linear[key]
        if "kda_layers" in linear or "full_attn_layers" in linear:
            if "kda_layers" not in linear or "full_attn_layers" not in linear:
                raise ValueError("linear_attn_config: needs both kda_layers and full_attn_layers")
            types = _layer_types_from_lists(linear, num_layers)
            if d.get("layer_types") is not None and list(d["layer_types"]) != types:
                raise ValueError("layer_types: disagrees with linear_attn_config's kda_layers / full_attn_layers")
            kw["layer_types"] = types
        elif d.get("layer_types") is None:
            kw.pop("layer_types", None)

        if d.get("mlp_layer_types") is None:
            kw.pop("mlp_layer_types", None)
            first_dense = d.get("first_k_dense_replace", 1)
            every = d.get("moe_layer_freq", 1) or 1
            sparse = kw.get("num_experts") is not None
            kw["mlp_layer_types"] = [
                "sparse" if sparse and i >= first_dense and i % every == 0 else "dense" for i in range(num_layers)
            ]
        if kw.get("num_experts") is None:
            kw.pop("num_experts", None)
        if kw.get("v_head_dim") is None:
            kw.pop("v_head_dim", None)
        return cls(**kw)


class GatedRMSNorm(nn.Module):
    """``rmsnorm(x) · w · sigmoid(gate)`` per head, all in fp32, cast back at the end."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.float() * h * torch.sigmoid(gate.float())).to(x.dtype)


class ConvWeight(nn.Module):
    """A depthwise conv's weight ``[D, 1, W]`` under the checkpoint's ``<name>.weight``."""

    def __init__(self, channels: int, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(channels, 1, width))


@functools.cache
def _kda_op() -> linattn.CompiledOp:
    return linattn.compile(KIMI_KDA)


class KimiDeltaAttention(nn.Module):
    """KDA: short-conv'd q, k, v; per-channel low-rank decay; gated output norm."""

    def __init__(self, config: KimiLinearConfig, layer_idx: int) -> None:
        super().__init__()
        self.name = str(layer_idx)
        self.num_heads, self.head_dim = config.linear_num_heads, config.linear_head_dim
        width, hidden = config.linear_conv_kernel_dim, config.hidden_size
        inner = config.linear_num_heads * config.linear_head_dim
        self.act = config.hidden_act
        for x in "qkv":
            setattr(self, f"{x}_proj", nn.Linear(hidden, inner, bias=False))
            setattr(self, f"{x}_conv1d", ConvWeight(inner, width))
        self.f_a_proj = nn.Linear(hidden, self.head_dim, bias=False)
        self.f_b_proj = nn.Linear(self.head_dim, inner, bias=False)
        self.A_log = nn.Parameter(torch.zeros(1, 1, self.num_heads, 1))
        self.dt_bias = nn.Parameter(torch.zeros(inner))
        self.b_proj = nn.Linear(hidden, self.num_heads, bias=False)
        self.g_a_proj = nn.Linear(hidden, self.head_dim, bias=False)
        self.g_b_proj = nn.Linear(self.head_dim, inner, bias=False)
        self.o_norm = GatedRMSNorm(self.head_dim, config.rms_norm_eps)
        self.o_proj = nn.Linear(inner, hidden, bias=False)

    def forward(self, x: torch.Tensor, cache: Cache | None) -> torch.Tensor:
        B, T, _ = x.shape
        heads = (B, T, self.num_heads, self.head_dim)
        q, k, v = (
            run_conv(f"{self.name}.{n}_conv", cache, getattr(self, f"{n}_proj")(x),
                     getattr(self, f"{n}_conv1d").weight[:, 0], None, self.act).reshape(heads)
            for n in "qkv"
        )
        o = run_recurrence(
            f"{self.name}.kda", cache, _kda_op(), q, k, v,
            a=self.f_b_proj(self.f_a_proj(x)).view(heads),
            A_log=self.A_log.reshape(self.num_heads),
            dt_bias=self.dt_bias.view(self.num_heads, self.head_dim),
            b=self.b_proj(x),
        )
        o = self.o_norm(o, self.g_b_proj(self.g_a_proj(x)).view(heads))
        return self.o_proj(o.reshape(B, T, -1))


class MultiHeadLatentAttention(nn.Module):
    """MLA without positions: the "rope" slice of the key is shared by all heads, unrotated."""

    def __init__(self, config: KimiLinearConfig, layer_idx: int) -> None:
        super().__init__()
        self.name = str(layer_idx)
        c = config
        self.num_heads, self.q_lora_rank, self.kv_lora_rank = c.num_attention_heads, c.q_lora_rank, c.kv_lora_rank
        self.nope, self.rope, self.v_dim = c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim
        self.scale = c.qk_head_dim ** -0.5
        q_out = c.num_attention_heads * c.qk_head_dim
        if c.q_lora_rank is None:
            self.q_proj = nn.Linear(c.hidden_size, q_out, bias=False)
        else:
            self.q_a_proj = nn.Linear(c.hidden_size, c.q_lora_rank, bias=c.attention_bias)
            self.q_a_layernorm = RMSNorm(c.q_lora_rank, 1e-6)
            self.q_b_proj = nn.Linear(c.q_lora_rank, q_out, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(c.hidden_size, c.kv_lora_rank + c.qk_rope_head_dim, bias=c.attention_bias)
        self.kv_a_layernorm = RMSNorm(c.kv_lora_rank, 1e-6)
        kv_out = c.num_attention_heads * (c.qk_nope_head_dim + c.v_head_dim)
        self.kv_b_proj = nn.Linear(c.kv_lora_rank, kv_out, bias=False)
        self.o_proj = nn.Linear(c.num_attention_heads * c.v_head_dim, c.hidden_size, bias=c.attention_bias)

    def forward(self, x: torch.Tensor, cache: Cache | None) -> torch.Tensor:
        B, T, _ = x.shape
        H = self.num_heads
        q = self.q_proj(x) if self.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(B, T, H, self.nope + self.rope)
        latent, k_shared = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope], dim=-1)
        kv = self.kv_b_proj(self.kv_a_layernorm(latent)).view(B, T, H, self.nope + self.v_dim)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        k = torch.cat([k_nope, k_shared[:, :, None, :].expand(B, T, H, self.rope)], dim=-1)
        o = attend(self.name, cache, q, k, v, self.scale)
        return self.o_proj(o.reshape(B, T, H * self.v_dim))


class Expert(nn.Module):
    """One routed expert: ``w2(act(w1 x) · w3 x)``."""

    expert_projections = {"gate": "w1", "up": "w3", "down": "w2"}  # for dispatch_experts

    def __init__(self, hidden: int, intermediate: int, act: str) -> None:
        super().__init__()
        self.w1 = nn.Linear(hidden, intermediate, bias=False)
        self.w2 = nn.Linear(intermediate, hidden, bias=False)
        self.w3 = nn.Linear(hidden, intermediate, bias=False)
        self.act = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(self.act(self.w1(x)) * self.w3(x))


class SparseMoE(nn.Module):
    """Routed experts plus always-on shared experts."""

    def __init__(self, config: KimiLinearConfig) -> None:
        super().__init__()
        c = config
        # keeping every group is the plain top-k
        grouped = c.use_grouped_topk and c.topk_group < c.num_expert_group
        self.gate = BiasedRouter(
            c.hidden_size, c.num_experts, c.num_experts_per_token,
            n_group=c.num_expert_group if grouped else 1, topk_group=c.topk_group if grouped else 1,
            renormalize=c.moe_renormalize, scaling=c.routed_scaling_factor, scoring=c.moe_router_activation_func,
        )
        self.experts = nn.ModuleList(
            Expert(c.hidden_size, c.moe_intermediate_size, c.hidden_act) for _ in range(c.num_experts)
        )
        self.shared_experts = (
            GatedMLP(c.hidden_size, c.moe_intermediate_size * c.num_shared_experts, c.hidden_act)
            if c.num_shared_experts else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        weights, indices = self.gate(flat)
        out = dispatch_experts(flat, weights, indices, self.experts).view_as(x)
        return out + self.shared_experts(x) if self.shared_experts is not None else out


class DecoderLayer(nn.Module):
    def __init__(self, config: KimiLinearConfig, layer_idx: int) -> None:
        super().__init__()
        if config.layer_types[layer_idx] == "linear_attention":
            self.self_attn: nn.Module = KimiDeltaAttention(config, layer_idx)
        else:
            self.self_attn = MultiHeadLatentAttention(config, layer_idx)
        self.block_sparse_moe: nn.Module = (
            SparseMoE(config) if config.mlp_layer_types[layer_idx] == "sparse"
            else GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_act)
        )
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, cache: Cache | None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cache)
        return x + self.block_sparse_moe(self.post_attention_layernorm(x))


class KimiLinearModel(nn.Module):
    def __init__(self, config: KimiLinearConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class KimiLinearForCausalLM(CausalLM):
    """Kimi Linear's decoder with the checkpoints' parameter names (``model.layers.N.self_attn.*`` ...)."""

    config_class = KimiLinearConfig

    def __init__(self, config: KimiLinearConfig) -> None:
        super().__init__()
        if not isinstance(config, KimiLinearConfig):
            raise ValueError(f"config: expected a KimiLinearConfig, got {type(config).__name__}")
        self.config = config
        self.model = KimiLinearModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    @staticmethod
    def checkpoint_name(name: str) -> str | None:
        """The Hub names a dense layer's MLP ``mlp.*``; here every feed-forward block is ``block_sparse_moe``."""
        return re.sub(r"^(model\.layers\.\d+)\.mlp\.", r"\1.block_sparse_moe.", name)

    fp32_names = _FP32_PARAMS

    def adapt_checkpoint(self, tensors: CheckpointTensors) -> CheckpointTensors:
        """With ``tie_word_embeddings`` a checkpoint without ``lm_head.weight`` reuses the
        embeddings; one that has it keeps its own head (as transformers does)."""
        if self.config.tie_word_embeddings and "lm_head.weight" not in tensors and "model.embed_tokens.weight" in tensors:
            tensors = tensors.with_alias("lm_head.weight", "model.embed_tokens.weight")
        return tensors

    def forward(
        self, input_ids: torch.Tensor, cache: Cache | None = None, *, cu_seqlens: torch.Tensor | None = None,
        cp_group: object | None = None,
    ) -> torch.Tensor:
        """Logits ``[B, T, vocab]``; with ``cache`` the tokens continue the cached ones;
        ``cu_seqlens`` packs sequences into batch 1; ``cp_group``: context parallelism (see
        :meth:`CausalLM._begin`)."""
        ctx = self._begin(input_ids, cache, cu_seqlens, cp_group)
        x = self.model.embed_tokens(input_ids)
        for layer in self.model.layers:
            x = layer(x, ctx)
        x = self.model.norm(x)
        logits = self.lm_head(x)
        self._end(ctx, input_ids.shape[1])
        return logits
