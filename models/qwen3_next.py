"""Qwen3-Next: Gated DeltaNet layers interleaved with gated full attention, MoE MLPs.

Three of every four layers mix tokens with a Gated DeltaNet (a delta-rule recurrence
with a per-head scalar decay, run by :data:`linattn.specs.QWEN3_NEXT_GDN` with the gate,
β and q/k L2 norms fused in the kernel); the fourth is softmax attention with an output
gate, per-head q/k norms and partial RoPE. The MLPs are sparse mixtures of SwiGLU experts
with a sigmoid-gated shared expert (or dense SwiGLU on the layers the config names).

Module names mirror the checkpoints' tensor names, so ``state_dict()`` keys are the
checkpoint's keys. The checkpoints' multi-token-prediction tensors (``mtp.*``) load into
the ``mtp`` module when the config asks for one (``mtp_num_hidden_layers``), which drafts
a token ahead for :meth:`~models.generation.CausalLM.generate_speculative`; otherwise
they are skipped.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

import linattn
from linattn.op import CompiledOp
from linattn.specs import QWEN3_NEXT_GDN

from .cache import Cache, attend, run_conv, run_recurrence
from .checkpoint import config_dtype
from .generation import CausalLM
from .layers import GatedMLP, RMSNorm, dispatch_experts, rotate_half_rope

__all__ = ["Qwen3NextConfig", "Qwen3NextForCausalLM", "Qwen3NextDecoderLayer", "Qwen3NextMTP"]

log = logging.getLogger(__name__)

LINEAR_ATTENTION = "linear_attention"
FULL_ATTENTION = "full_attention"

def _agree(key: str, *values: Any) -> Any:
    """The one value the config gives for ``key`` in its possibly several spellings."""
    given = [v for v in values if v is not None]
    if any(v != given[0] for v in given[1:]):
        raise ValueError(f"{key}: inconsistent values {given}")
    return given[0] if given else None


@dataclass
class Qwen3NextConfig:
    """The fields of a Qwen3-Next ``config.json`` that shape the model (defaults: those of transformers)."""

    vocab_size: int = 151936
    hidden_size: int = 2048
    intermediate_size: int = 5632
    num_hidden_layers: int = 48
    num_attention_heads: int = 16
    num_key_value_heads: int = 2
    head_dim: int = 256
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 0.25
    layer_types: list[str] = field(default_factory=list)
    linear_conv_kernel_dim: int = 4
    linear_key_head_dim: int = 128
    linear_value_head_dim: int = 128
    linear_num_key_heads: int = 16
    linear_num_value_heads: int = 32
    decoder_sparse_step: int = 1
    moe_intermediate_size: int = 512
    shared_expert_intermediate_size: int = 512
    num_experts_per_tok: int = 10
    num_experts: int = 512
    norm_topk_prob: bool = True
    mlp_only_layers: list[int] = field(default_factory=list)
    #: multi-token-prediction layers (the Hub's ``mtp_num_hidden_layers``; 0: no ``mtp`` module)
    mtp_num_hidden_layers: int = 0
    dtype: torch.dtype = torch.float32

    #: keys of ``config.json`` read by :meth:`from_dict` besides the fields themselves
    _DIALECT_KEYS: ClassVar[tuple[str, ...]] = (
        "full_attention_interval", "rope_parameters", "rope_scaling", "torch_dtype", "use_sliding_window",
        "num_nextn_predict_layers", "mtp_use_dedicated_embeddings",
    )

    def __post_init__(self) -> None:
        if not self.layer_types:
            self.layer_types = layer_types_from_interval(self.num_hidden_layers, 4)
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first field that contradicts the others."""
        positive = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                    "head_dim", "linear_conv_kernel_dim", "linear_key_head_dim", "linear_value_head_dim",
                    "linear_num_key_heads", "linear_num_value_heads", "decoder_sparse_step")
        for key in positive:
            if int(getattr(self, key)) < 1:
                raise ValueError(f"{key}: must be >= 1, got {getattr(self, key)}")
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(f"layer_types: {len(self.layer_types)} entries for {self.num_hidden_layers} layers")
        for kind in self.layer_types:
            if kind not in (LINEAR_ATTENTION, FULL_ATTENTION):
                raise ValueError(f"layer_types: unknown layer type {kind!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_key_value_heads: must divide num_attention_heads")
        if self.linear_num_value_heads % self.linear_num_key_heads:
            raise ValueError("linear_num_key_heads: must divide linear_num_value_heads")
        rotary = int(self.head_dim * self.partial_rotary_factor)
        if not 0 < self.partial_rotary_factor <= 1 or rotary % 2:
            raise ValueError(f"partial_rotary_factor: {self.partial_rotary_factor} of head_dim {self.head_dim} "
                             "must give an even number of rotary dims")
        if self.num_experts < 0:
            raise ValueError(f"num_experts: must be >= 0, got {self.num_experts}")
        if self.num_experts and not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ValueError(f"num_experts_per_tok: must be in [1, num_experts], got {self.num_experts_per_tok}")
        for i in self.mlp_only_layers:
            if not 0 <= i < self.num_hidden_layers:
                raise ValueError(f"mlp_only_layers: layer {i} out of range")
        if self.mtp_num_hidden_layers < 0:
            raise ValueError(f"mtp_num_hidden_layers: must be >= 0, got {self.mtp_num_hidden_layers}")
        if self.hidden_act not in ("silu", "swish"):
            raise ValueError(f"hidden_act: Qwen3-Next's conv and MLPs use SiLU; got {self.hidden_act!r}")

    @property
    def rotary_dim(self) -> int:
        """The leading dims of each attention head that RoPE rotates."""
        return int(self.head_dim * self.partial_rotary_factor)

    def is_sparse(self, layer: int) -> bool:
        """Whether layer ``layer``'s MLP is the mixture of experts (else the dense SwiGLU)."""
        return (layer not in self.mlp_only_layers and self.num_experts > 0
                and (layer + 1) % self.decoder_sparse_step == 0)

    @classmethod
    def from_dict(cls, d: dict) -> "Qwen3NextConfig":
        """Read either dialect of ``config.json``.

        transformers 5 writes ``layer_types`` and ``rope_parameters``; the Hub checkpoints
        give ``full_attention_interval``, top-level ``rope_theta`` / ``partial_rotary_factor``
        and ``rope_scaling``. Only the default RoPE is implemented.
        """
        if not isinstance(d, dict):
            raise ValueError(f"d: expected a dict, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        special = ("dtype", "rope_theta", "partial_rotary_factor")
        kwargs = {k: v for k, v in d.items() if k in names and k not in special}
        ignored = sorted(set(d) - names - set(cls._DIALECT_KEYS))
        if ignored:
            log.debug("Qwen3NextConfig: ignoring keys %s", ignored)
        if d.get("use_sliding_window"):
            raise ValueError("use_sliding_window: sliding-window attention is not implemented")

        rope = d.get("rope_parameters") or {}
        if not isinstance(rope, dict):
            raise ValueError(f"rope_parameters: expected a dict, got {rope!r}")
        scaling = d.get("rope_scaling") or {}
        for key, params in (("rope_parameters", rope), ("rope_scaling", scaling)):
            kind = params.get("rope_type", params.get("type")) if isinstance(params, dict) else params
            if kind not in (None, "default"):
                raise ValueError(f"{key}: rope type {kind!r} is not implemented (only the default RoPE)")
        theta = _agree("rope_theta", rope.get("rope_theta"), d.get("rope_theta"))
        partial = _agree("partial_rotary_factor", rope.get("partial_rotary_factor"), d.get("partial_rotary_factor"))
        if theta is not None:
            kwargs["rope_theta"] = float(theta)
        if partial is not None:
            kwargs["partial_rotary_factor"] = float(partial)

        layers = int(d.get("num_hidden_layers", cls.num_hidden_layers))
        interval = d.get("full_attention_interval")
        if interval is not None:
            if int(interval) < 1:
                raise ValueError(f"full_attention_interval: must be >= 1, got {interval}")
            from_interval = layer_types_from_interval(layers, int(interval))
            if d.get("layer_types") is not None and list(d["layer_types"]) != from_interval:
                raise ValueError("layer_types: inconsistent with full_attention_interval")
            kwargs["layer_types"] = from_interval
        if kwargs.get("layer_types") is not None:
            kwargs["layer_types"] = list(kwargs["layer_types"])
        else:
            kwargs.pop("layer_types", None)
        if kwargs.get("mlp_only_layers") is None:
            kwargs.pop("mlp_only_layers", None)
        else:
            kwargs["mlp_only_layers"] = [int(i) for i in kwargs["mlp_only_layers"]]

        mtp = _agree("mtp_num_hidden_layers", d.get("mtp_num_hidden_layers"), d.get("num_nextn_predict_layers"))
        if mtp is not None:
            kwargs["mtp_num_hidden_layers"] = int(mtp)
        if d.get("mtp_use_dedicated_embeddings"):
            raise ValueError("mtp_use_dedicated_embeddings: an MTP module with its own embeddings is not implemented")

        dtype = config_dtype(d)
        if dtype is not None:
            kwargs["dtype"] = dtype
        return cls(**kwargs)


def layer_types_from_interval(layers: int, interval: int) -> list[str]:
    """Every ``interval``-th layer (1-based) is full attention, the rest Gated DeltaNet."""
    return [FULL_ATTENTION if (i + 1) % interval == 0 else LINEAR_ATTENTION for i in range(layers)]


_GDN_OP: CompiledOp | None = None


def _gdn_op() -> CompiledOp:
    """The compiled Gated DeltaNet op, shared by all layers (kernels are built per dtype on first use)."""
    global _GDN_OP
    if _GDN_OP is None:
        _GDN_OP = linattn.compile(QWEN3_NEXT_GDN)
    return _GDN_OP


class GatedRMSNorm(nn.Module):
    """``rms_norm(x) · w · silu(z)`` per value head.

    The normalised value is cast back to the input dtype before the (ones-centred) scale;
    the SiLU gate multiplies in fp32 and the product is cast back last.
    """

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        h = self.weight * h.to(x.dtype)
        return (h * F.silu(z.float())).to(x.dtype)


class GatedDeltaNet(nn.Module):
    """The linear-attention token mixer: grouped projections, short conv, gated delta rule.

    ``in_proj_qkvz`` is laid out per key head: ``[q (K), k (K), v (G·V), z (G·V)]`` for
    each of the H key heads, with G = HV / H value heads per key head; ``in_proj_ba`` the
    same way with ``[b (G), a (G)]``. Value head j reads q/k head ``j // G``.
    """

    def __init__(self, config: Qwen3NextConfig, name: str) -> None:
        super().__init__()
        self.name = name
        self.H, self.HV = config.linear_num_key_heads, config.linear_num_value_heads
        self.K, self.V = config.linear_key_head_dim, config.linear_value_head_dim
        self.G = self.HV // self.H
        conv_dim = 2 * self.H * self.K + self.HV * self.V
        W = config.linear_conv_kernel_dim
        hidden = config.hidden_size
        self.in_proj_qkvz = nn.Linear(hidden, 2 * self.H * self.K + 2 * self.HV * self.V, bias=False)
        self.in_proj_ba = nn.Linear(hidden, 2 * self.HV, bias=False)
        self.conv1d = nn.Conv1d(conv_dim, conv_dim, W, groups=conv_dim, padding=W - 1, bias=False)
        self.dt_bias = nn.Parameter(torch.ones(self.HV))
        self.A_log = nn.Parameter(torch.zeros(self.HV))
        self.norm = GatedRMSNorm(self.V, config.rms_norm_eps)
        self.out_proj = nn.Linear(self.HV * self.V, hidden, bias=False)

    def forward(self, x: torch.Tensor, cache: Cache | None) -> torch.Tensor:
        B, T, _ = x.shape
        H, HV, K, V, G = self.H, self.HV, self.K, self.V, self.G
        qkvz = self.in_proj_qkvz(x).view(B, T, H, 2 * K + 2 * G * V)
        q, k, v, z = torch.split(qkvz, [K, K, G * V, G * V], dim=-1)
        ba = self.in_proj_ba(x).view(B, T, H, 2 * G)
        b, a = ba[..., :G].reshape(B, T, HV), ba[..., G:].reshape(B, T, HV)

        mixed = torch.cat([q.reshape(B, T, H * K), k.reshape(B, T, H * K), v.reshape(B, T, HV * V)], dim=-1)
        mixed = run_conv(f"{self.name}.conv", cache, mixed, self.conv1d.weight[:, 0], None, "silu")
        q, k, v = torch.split(mixed, [H * K, H * K, HV * V], dim=-1)
        o = run_recurrence(
            f"{self.name}.recurrence", cache, _gdn_op(),
            q.reshape(B, T, H, K), k.reshape(B, T, H, K), v.reshape(B, T, HV, V),
            a=a, b=b, A_log=self.A_log, dt_bias=self.dt_bias,
        )
        o = self.norm(o, z.reshape(B, T, HV, V))
        return self.out_proj(o.reshape(B, T, HV * V))


class GatedAttention(nn.Module):
    """Softmax attention with a per-head sigmoid output gate, q/k RMS norms and partial RoPE.

    ``q_proj`` yields, per head, the query (``head_dim``) followed by its gate (``head_dim``).
    """

    def __init__(self, config: Qwen3NextConfig, name: str) -> None:
        super().__init__()
        self.name = name
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        hidden, bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(hidden, self.heads * self.head_dim * 2, bias=bias)
        self.k_proj = nn.Linear(hidden, self.kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, self.kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.heads * self.head_dim, hidden, bias=bias)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps, zero_centered=True)
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps, zero_centered=True)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], cache: Cache | None) -> torch.Tensor:
        B, T, _ = x.shape
        D = self.head_dim
        q, gate = self.q_proj(x).view(B, T, self.heads, 2 * D).split(D, dim=-1)
        q = rotate_half_rope(self.q_norm(q), *rope)
        k = rotate_half_rope(self.k_norm(self.k_proj(x).view(B, T, self.kv_heads, D)), *rope)
        v = self.v_proj(x).view(B, T, self.kv_heads, D)
        o = attend(self.name, cache, q, k, v, D**-0.5).reshape(B, T, self.heads * D)
        return self.o_proj(o * torch.sigmoid(gate.reshape(B, T, self.heads * D)))


class SparseMoE(nn.Module):
    """Top-k softmax routing over SwiGLU experts, plus a shared expert scaled by ``sigmoid(shared_expert_gate(x))``."""

    def __init__(self, config: Qwen3NextConfig) -> None:
        super().__init__()
        self.top_k, self.norm_topk_prob = config.num_experts_per_tok, config.norm_topk_prob
        hidden = config.hidden_size
        self.gate = nn.Linear(hidden, config.num_experts, bias=False)
        self.experts = nn.ModuleList(
            GatedMLP(hidden, config.moe_intermediate_size, config.hidden_act) for _ in range(config.num_experts)
        )
        self.shared_expert = GatedMLP(hidden, config.shared_expert_intermediate_size, config.hidden_act)
        self.shared_expert_gate = nn.Linear(hidden, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        logits = self.gate(x)
        weights, indices = torch.topk(logits.softmax(-1, dtype=torch.float32), self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(-1, keepdim=True)
        routed = dispatch_experts(x, weights.to(logits.dtype), indices, self.experts)
        shared = torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return (routed + shared).reshape(shape)


class Qwen3NextDecoderLayer(nn.Module):
    """Pre-norm residual block: token mixer (Gated DeltaNet or gated attention), then MLP.

    ``name`` keys the layer's state in a :class:`~models.cache.Cache`, so a layer built
    outside the main stack (a multi-token-prediction layer) keeps its own.
    """

    def __init__(self, config: Qwen3NextConfig, layer_type: str, sparse: bool, name: str) -> None:
        super().__init__()
        if layer_type not in (LINEAR_ATTENTION, FULL_ATTENTION):
            raise ValueError(f"layer_type: unknown layer type {layer_type!r}")
        self.layer_type = layer_type
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, zero_centered=True)
        if layer_type == LINEAR_ATTENTION:
            self.linear_attn = GatedDeltaNet(config, name)
        else:
            self.self_attn = GatedAttention(config, name)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, zero_centered=True)
        if sparse:
            self.mlp: nn.Module = SparseMoE(config)
        else:
            self.mlp = GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_act)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], cache: Cache | None) -> torch.Tensor:
        h = self.input_layernorm(x)
        if self.layer_type == LINEAR_ATTENTION:
            h = self.linear_attn(h, cache)
        else:
            h = self.self_attn(h, rope, cache)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x))


class RotaryEmbedding(nn.Module):
    """cos/sin of the default RoPE over the first ``rotary_dim`` dims of each head.

    The frequencies are recomputed in fp32 on each call (a few dozen values), so casting
    the model to bf16 never rounds them.
    """

    def __init__(self, config: Qwen3NextConfig) -> None:
        super().__init__()
        self.dim, self.theta = config.rotary_dim, config.rope_theta

    def forward(
        self, offset: int | torch.Tensor, length: int, like: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin ``[1 or B, length, rotary_dim]`` of positions ``offset ..``; a ``[B]``
        ``offset`` gives each sequence its own (a batch of prompts of different lengths)."""
        steps = torch.arange(length, device=like.device, dtype=torch.float32)
        if isinstance(offset, torch.Tensor):
            positions = offset.to(like.device, torch.float32)[:, None] + steps[None, :]
        else:
            positions = (offset + steps)[None, :]
        return self.at(positions, like)

    def at(self, positions: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of explicit ``positions`` ``[B or 1, T]``."""
        exponents = torch.arange(0, self.dim, 2, dtype=torch.float32, device=like.device) / self.dim
        inv_freq = 1.0 / (self.theta ** exponents)
        freqs = positions.to(like.device, torch.float32)[..., None] * inv_freq
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos().to(like.dtype), emb.sin().to(like.dtype)


class Qwen3NextModel(nn.Module):
    """Embedding, decoder stack and final norm (the checkpoints' ``model.*``)."""

    def __init__(self, config: Qwen3NextConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            Qwen3NextDecoderLayer(config, kind, config.is_sparse(i), str(i))
            for i, kind in enumerate(config.layer_types)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, zero_centered=True)
        self.rotary_emb = RotaryEmbedding(config)

    def forward(self, input_ids: torch.Tensor, cache: Cache | None) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        if cache is not None and cache.cu_seqlens is not None:
            rope = self.rotary_emb.at(cache.packed_positions(), x)
        else:
            rope = self.rotary_emb(cache.seen if cache is not None else 0, input_ids.shape[1], x)
        for layer in self.layers:
            x = layer(x, rope, cache)
        return self.norm(x)


class Qwen3NextMTP(nn.Module):
    """The multi-token-prediction module (the checkpoints' ``mtp.*``): drafts token ``t + 2``.

    For position t it joins the main model's final hidden state ``h_t`` with the embedding
    of the next token ``x_(t+1)``: ``fc([norm_e(embed(x_(t+1))), norm_h(h_t)])``, runs a
    full-attention decoder layer at position t (with its own KV cache), a final norm, and
    the main model's LM head. Only verified pairs enter it, so its cache never rolls back.
    """

    def __init__(self, config: Qwen3NextConfig) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.fc = nn.Linear(2 * hidden, hidden, bias=False)
        self.pre_fc_norm_embedding = RMSNorm(hidden, config.rms_norm_eps, zero_centered=True)
        self.pre_fc_norm_hidden = RMSNorm(hidden, config.rms_norm_eps, zero_centered=True)
        self.layers = nn.ModuleList(
            Qwen3NextDecoderLayer(config, FULL_ATTENTION, config.num_experts > 0, f"mtp.{i}")
            for i in range(config.mtp_num_hidden_layers)
        )
        self.norm = RMSNorm(hidden, config.rms_norm_eps, zero_centered=True)

    def forward(
        self, embedded: torch.Tensor, hidden: torch.Tensor, rotary: "RotaryEmbedding", cache: Cache | None
    ) -> torch.Tensor:
        """Normalised hidden states ``[B, t, hidden]`` of the first MTP layer, for the LM head."""
        layer = self.layers[0]
        x = self.fc(torch.cat([self.pre_fc_norm_embedding(embedded), self.pre_fc_norm_hidden(hidden)], dim=-1))
        keys = cache.keys.get(layer.self_attn.name) if cache is not None else None
        offset = keys.shape[1] if keys is not None else 0
        return self.norm(layer(x, rotary(offset, x.shape[1], x), cache))


class Qwen3NextForCausalLM(CausalLM):
    """Qwen3-Next as a causal LM: ``forward(input_ids, cache) -> logits``."""

    config_class = Qwen3NextConfig

    def __init__(self, config: Qwen3NextConfig) -> None:
        super().__init__()
        if not isinstance(config, Qwen3NextConfig):
            raise ValueError(f"config: expected a Qwen3NextConfig, got {type(config).__name__}")
        self.config = config
        self.model = Qwen3NextModel(config)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.mtp_num_hidden_layers:
            self.mtp = Qwen3NextMTP(config)

    def forward(
        self,
        input_ids: torch.Tensor,
        cache: Cache | None = None,
        *,
        cu_seqlens: torch.Tensor | None = None,
        cp_group: object | None = None,
        return_hidden: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits ``[B, T, vocab]`` of the tokens after ``cache.seen`` earlier ones
        (``cu_seqlens``: sequences packed into batch 1, each from position 0; ``cp_group``:
        context parallelism, see :meth:`CausalLM._begin`).

        With ``return_hidden`` also the final-norm hidden states ``[B, T, hidden]`` (what a
        multi-token-prediction head continues from).
        """
        ctx = self._begin(input_ids, cache, cu_seqlens, cp_group)
        hidden = self.model(input_ids, ctx)
        logits = F.linear(hidden, self._head())
        self._end(ctx, input_ids.shape[1])
        return (logits, hidden) if return_hidden else logits

    def _head(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.config.tie_word_embeddings else self.lm_head.weight

    def draft(self, hidden: torch.Tensor, tokens: torch.Tensor, cache: Cache) -> torch.Tensor:
        """The MTP module's logits for the tokens after ``tokens`` (see :class:`Qwen3NextMTP`)."""
        if not hasattr(self, "mtp"):
            raise ValueError("this Qwen3-Next has no MTP module (its config has mtp_num_hidden_layers = 0)")
        h = self.mtp(self.model.embed_tokens(tokens), hidden, self.model.rotary_emb, cache)
        return F.linear(h, self._head())

    def checkpoint_name(self, name: str) -> str | None:  # type: ignore[override]
        """Checkpoint names are module names; ``mtp.*`` is dropped unless this model has an ``mtp`` submodule."""
        if name.startswith("mtp.") and not isinstance(getattr(self, "mtp", None), nn.Module):
            return None
        return name
