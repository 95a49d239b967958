"""Nemotron-H: a hybrid of Mamba-2, attention, squared-ReLU MLP and MoE layers.

Every layer is ``x + mixer(RMSNorm(x))`` where the mixer is one of four kinds, chosen by
the config's layer pattern:

* Mamba-2 (``M``): ``in_proj`` gives ``[z, xBC, dt]``; ``xBC`` runs through a causal
  depthwise conv with SiLU and splits into ``x, B, C``; the SSD recurrence (q = C, k = B,
  v = x, ``n_groups`` groups of B/C shared by the heads) runs as one linattn op with the
  step size ``dt = clamp(softplus(dt + dt_bias))``, ``A = -exp(A_log)`` and the D skip
  fused; its output is gated by ``silu(z)``, RMS-normalised per group and projected out.
* attention (``*``): grouped-query attention without any positional encoding.
* MLP (``-``): ``down(relu(up(x))²)``.
* MoE (``E``): sigmoid router with a score-correction bias used only to choose the
  experts (group-limited top-k), squared-ReLU experts, an always-on shared expert and
  optional latent projections around the routed experts.

Parameter names follow the Hugging Face checkpoints (``backbone.layers.N.mixer.*``), so
``state_dict()`` names are the checkpoint's own. Multi-token-prediction heads (``mtp.*``)
are not part of this model and are skipped when loading.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import linattn
from linattn import gates
from linattn.op import CompiledOp
from linattn.spec import Spec
from linattn.specs import NEMOTRON_MAMBA2

from .cache import Cache, attend, run_conv, run_recurrence
from .checkpoint import config_dtype
from .generation import CausalLM
from .layers import BiasedRouter, activation, dispatch_experts, gated_rms_norm

__all__ = ["NemotronHConfig", "NemotronHForCausalLM"]

log = logging.getLogger(__name__)

#: Our layer kinds, and every spelling the configs use for them.
_KINDS = {
    "mamba": "mamba",
    "linear_attention": "mamba",
    "attention": "attention",
    "full_attention": "attention",
    "mlp": "mlp",
    "moe": "moe",
}
#: The characters of the Hub's ``hybrid_override_pattern``.
_PATTERN = {"M": "mamba", "*": "attention", "-": "mlp", "E": "moe"}
#: Older Hub key names and the field each one sets.
_RENAMED = {
    "mamba_n_groups": "n_groups",
    "mamba_d_conv": "conv_kernel",
    "mamba_expand": "expand",
    "mamba_dt_min": "time_step_min",
    "mamba_dt_max": "time_step_max",
    "mamba_dt_limit": "time_step_limit",
    "mamba_conv_bias": "use_conv_bias",
    "mamba_chunk_size": "chunk_size",
    "num_local_experts": "n_routed_experts",
}


def _number(value: Any, name: str) -> float:
    """A float from a config value, including the ways JSON spells infinity."""
    if isinstance(value, dict) and "__float__" in value:
        value = value["__float__"]
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"{name}: expected a number, got {value!r}") from None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    raise ValueError(f"{name}: expected a number, got {value!r}")


@dataclass
class NemotronHConfig:
    """The fields of a Nemotron-H checkpoint's ``config.json`` that define the computation."""

    vocab_size: int = 131072
    hidden_size: int = 4096
    #: one of "mamba", "attention", "mlp", "moe" per layer
    layer_types: tuple[str, ...] = ("mamba", "moe", "attention", "mlp")
    # attention
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int = 128
    attention_bias: bool = False
    # MLP and experts
    intermediate_size: int = 21504
    mlp_hidden_act: str = "relu2"
    mlp_bias: bool = False
    # Mamba-2
    ssm_state_size: int = 128
    mamba_num_heads: int = 128
    mamba_head_dim: int = 64
    mamba_hidden_act: str = "silu"
    n_groups: int = 8
    conv_kernel: int = 4
    use_conv_bias: bool = True
    use_bias: bool = False
    chunk_size: int = 128
    time_step_min: float = 0.001
    time_step_limit: tuple[float, float] = (0.0, math.inf)
    # MoE
    n_routed_experts: int = 8
    moe_intermediate_size: int = 7688
    moe_shared_expert_intermediate_size: int = 7688
    moe_latent_size: int | None = None
    num_experts_per_tok: int = 2
    routed_scaling_factor: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    # the rest
    layer_norm_epsilon: float = 1e-5
    residual_in_fp32: bool = False
    tie_word_embeddings: bool = False
    dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        self.layer_types = tuple(self.layer_types)
        self.time_step_limit = tuple(self.time_step_limit)
        self.validate()

    @property
    def num_hidden_layers(self) -> int:
        return len(self.layer_types)

    @property
    def mamba_intermediate_size(self) -> int:
        return self.mamba_num_heads * self.mamba_head_dim

    @property
    def dt_limit(self) -> tuple[float, float]:
        """The interval the Mamba step size is clamped to.

        Below by ``time_step_min`` (as the reference implementation's chunked path does),
        and within ``time_step_limit``.
        """
        lo, hi = self.time_step_limit
        return max(lo, self.time_step_min), hi

    def validate(self) -> None:
        """Raise ValueError naming the first inconsistent field."""
        if not self.layer_types:
            raise ValueError("layer_types: needs at least one layer")
        bad = [t for t in self.layer_types if t not in ("mamba", "attention", "mlp", "moe")]
        if bad:
            raise ValueError(f"layer_types: unknown layer kinds {bad}")
        for name in ("vocab_size", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                     "intermediate_size", "ssm_state_size", "mamba_num_heads", "mamba_head_dim", "n_groups",
                     "conv_kernel", "n_routed_experts", "moe_intermediate_size",
                     "moe_shared_expert_intermediate_size", "num_experts_per_tok", "n_group", "topk_group"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_key_value_heads: {self.num_key_value_heads} must divide "
                             f"num_attention_heads {self.num_attention_heads}")
        if self.mamba_num_heads % self.n_groups:
            raise ValueError(f"n_groups: {self.n_groups} must divide mamba_num_heads {self.mamba_num_heads}")
        if self.mamba_hidden_act not in ("silu", "swish"):
            raise ValueError(f"mamba_hidden_act: only 'silu' is supported, got {self.mamba_hidden_act!r}")
        activation(self.mlp_hidden_act)  # raises for an unknown activation
        if self.moe_latent_size is not None and (not isinstance(self.moe_latent_size, int) or self.moe_latent_size < 1):
            raise ValueError(f"moe_latent_size: expected None or a positive int, got {self.moe_latent_size!r}")
        if self.n_routed_experts % self.n_group:
            raise ValueError(f"n_group: {self.n_group} must divide n_routed_experts {self.n_routed_experts}")
        if "moe" in self.layer_types and self.n_routed_experts // self.n_group < 2:
            raise ValueError(f"n_group: each of the {self.n_group} expert groups needs at least 2 experts")
        if self.topk_group > self.n_group:
            raise ValueError(f"topk_group: {self.topk_group} exceeds n_group {self.n_group}")
        if self.num_experts_per_tok > (self.n_routed_experts // self.n_group) * self.topk_group:
            raise ValueError(f"num_experts_per_tok: {self.num_experts_per_tok} exceeds the experts of "
                             f"the {self.topk_group} chosen groups")
        if len(self.time_step_limit) != 2 or not self.time_step_limit[0] <= self.time_step_limit[1]:
            raise ValueError(f"time_step_limit: expected (low, high) with low <= high, got {self.time_step_limit}")
        if not isinstance(self.dtype, torch.dtype) or not self.dtype.is_floating_point:
            raise ValueError(f"dtype: expected a floating torch.dtype, got {self.dtype!r}")

    @classmethod
    def from_dict(cls, d: dict) -> "NemotronHConfig":
        """The config of a checkpoint's ``config.json``, in either dialect.

        The layer kinds come from ``layers_block_type`` / ``layer_types`` (a list, with
        "mamba"/"linear_attention", "attention"/"full_attention", "mlp", "moe") or from
        the Hub's ``hybrid_override_pattern`` string (``M``, ``*``, ``-``, ``E``); older
        ``mamba_*`` key names are accepted for the Mamba fields. Unrelated keys are ignored.
        """
        if not isinstance(d, dict):
            raise ValueError(f"d: expected a dict, got {type(d).__name__}")
        d = dict(d)
        for old, new in _RENAMED.items():
            if old in d:
                value = d.pop(old)
                if new in d and d[new] != value:
                    raise ValueError(f"{old}: {value!r} disagrees with {new} {d[new]!r}")
                d[new] = value

        kinds = cls._layer_kinds(d)
        n_layers = d.get("num_hidden_layers")
        if n_layers is not None and n_layers != len(kinds):
            raise ValueError(f"num_hidden_layers: {n_layers} disagrees with the {len(kinds)} layers of the pattern")
        if d.get("n_shared_experts", 1) != 1:
            raise ValueError(f"n_shared_experts: only one shared expert is supported, got {d['n_shared_experts']!r}")

        fields = {f.name for f in dataclasses.fields(cls)} - {"layer_types", "dtype", "time_step_limit"}
        kwargs: dict[str, Any] = {k: d[k] for k in fields if k in d and d[k] is not None}
        kwargs["layer_types"] = kinds
        if d.get("head_dim") is None and "num_attention_heads" in d and "hidden_size" in d:
            kwargs["head_dim"] = d["hidden_size"] // d["num_attention_heads"]
        if d.get("num_key_value_heads") is None and "num_attention_heads" in d:
            kwargs["num_key_value_heads"] = d["num_attention_heads"]
        if "moe_latent_size" in d:
            kwargs["moe_latent_size"] = d["moe_latent_size"]
        for name in ("time_step_min", "routed_scaling_factor", "layer_norm_epsilon"):
            if name in kwargs:
                kwargs[name] = _number(kwargs[name], name)
        limit = d.get("time_step_limit")
        if limit is not None:
            if not isinstance(limit, (list, tuple)) or len(limit) != 2:
                raise ValueError(f"time_step_limit: expected [low, high], got {limit!r}")
            kwargs["time_step_limit"] = tuple(_number(v, "time_step_limit") for v in limit)
        dtype = config_dtype(d)
        if dtype is not None:
            kwargs["dtype"] = dtype
        return cls(**kwargs)

    @staticmethod
    def _layer_kinds(d: dict) -> tuple[str, ...]:
        """The layer kinds named by whichever of the pattern keys ``d`` holds (all must agree)."""
        found: dict[str, tuple[str, ...]] = {}
        for key in ("layers_block_type", "layer_types"):
            if d.get(key) is not None:
                value = d[key]
                if not isinstance(value, (list, tuple)) or not all(isinstance(t, str) for t in value):
                    raise ValueError(f"{key}: expected a list of layer kinds, got {value!r}")
                unknown = sorted({t for t in value if t not in _KINDS})
                if unknown:
                    raise ValueError(f"{key}: unknown layer kinds {unknown}; expected one of {sorted(_KINDS)}")
                found[key] = tuple(_KINDS[t] for t in value)
        if d.get("hybrid_override_pattern") is not None:
            pattern = d["hybrid_override_pattern"]
            if not isinstance(pattern, str):
                raise ValueError(f"hybrid_override_pattern: expected a string, got {pattern!r}")
            unknown = sorted(set(pattern) - set(_PATTERN))
            if unknown:
                raise ValueError(f"hybrid_override_pattern: unknown characters {unknown}; expected M, *, - or E")
            found["hybrid_override_pattern"] = tuple(_PATTERN[c] for c in pattern)
        if not found:
            raise ValueError("layers_block_type: the config names no layer pattern "
                             "(layers_block_type, layer_types or hybrid_override_pattern)")
        (first, kinds), *rest = found.items()
        for key, other in rest:
            if other != kinds:
                raise ValueError(f"{key}: disagrees with {first}")
        return kinds


# ----------------------------------------------------------------------------- pieces


class NemotronHRMSNorm(nn.Module):
    """RMSNorm whose scale multiplies in fp32 before the cast back (Nemotron's order)."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.float() * h).to(x.dtype)


class NemotronHGatedRMSNorm(nn.Module):
    """``RMSNorm(y · silu(z))`` normalised over groups of ``group_size`` channels, in fp32."""

    def __init__(self, size: int, group_size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.group_size = group_size
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return gated_rms_norm(y, z, self.weight, self.eps, self.group_size)


@functools.lru_cache(maxsize=None)
def _ssd_op(limited: bool) -> CompiledOp:
    """The compiled SSD recurrence, with the step-size clamp fused when there is one."""
    if not limited:
        return linattn.compile(NEMOTRON_MAMBA2)
    spec = Spec(
        decay="scalar",
        gate=gates.mamba_gate(limit=True),
        beta=gates.mamba_dt(limit=True),
        skip="head",
        default_scale=1.0,
        name="NEMOTRON_MAMBA2_LIMITED",
    )
    return linattn.compile(spec)


class NemotronHMamba2Mixer(nn.Module):
    """The Mamba-2 mixer; its conv and SSM states live in the cache under the layer's index."""

    def __init__(self, config: NemotronHConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.heads, self.head_dim = config.mamba_num_heads, config.mamba_head_dim
        self.groups, self.state_size = config.n_groups, config.ssm_state_size
        self.inner = config.mamba_intermediate_size
        self.conv_dim = self.inner + 2 * self.groups * self.state_size
        self.in_proj = nn.Linear(config.hidden_size, self.inner + self.conv_dim + self.heads, bias=config.use_bias)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, config.conv_kernel, groups=self.conv_dim,
                                padding=config.conv_kernel - 1, bias=config.use_conv_bias)
        self.dt_bias = nn.Parameter(torch.ones(self.heads))
        self.A_log = nn.Parameter(torch.zeros(self.heads))
        self.D = nn.Parameter(torch.ones(self.heads))
        self.norm = NemotronHGatedRMSNorm(self.inner, self.inner // self.groups, config.layer_norm_epsilon)
        self.out_proj = nn.Linear(self.inner, config.hidden_size, bias=config.use_bias)
        lo, hi = config.dt_limit
        self.limit = {} if lo == 0.0 and hi == math.inf else {"dt_min": lo, "dt_max": hi}
        self.op = _ssd_op(bool(self.limit))

    def forward(self, x: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        z, xbc, dt = self.in_proj(x).split([self.inner, self.conv_dim, self.heads], dim=-1)
        xbc = run_conv(f"{self.layer_idx}.conv", cache, xbc, self.conv1d.weight[:, 0], self.conv1d.bias, "silu")
        xs, b, c = xbc.split([self.inner, self.groups * self.state_size, self.groups * self.state_size], dim=-1)
        y = run_recurrence(
            f"{self.layer_idx}.ssm",
            cache,
            self.op,
            c.reshape(B, T, self.groups, self.state_size),
            b.reshape(B, T, self.groups, self.state_size),
            xs.reshape(B, T, self.heads, self.head_dim),
            D=self.D,
            dt=dt,
            dt_bias=self.dt_bias,
            A=-torch.exp(self.A_log.float()),
            **self.limit,
        )
        y = self.norm(y.reshape(B, T, self.inner), z)
        return self.out_proj(y.to(x.dtype))


class NemotronHAttention(nn.Module):
    """Causal grouped-query attention with no positional encoding; keys/values go to the cache."""

    def __init__(self, config: NemotronHConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.heads * self.head_dim, config.hidden_size, bias=bias)

    def forward(self, x: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.kv_heads, self.head_dim)
        o = attend(f"{self.layer_idx}.attn", cache, q, k, v, self.head_dim**-0.5)
        return self.o_proj(o.reshape(B, T, self.heads * self.head_dim))


class NemotronHMLP(nn.Module):
    """``down(act(up(x)))``: the non-gated MLP of the ``-`` layers, the experts and the shared expert."""

    expert_projections = {"up": "up_proj", "down": "down_proj"}  # for dispatch_experts

    def __init__(self, size: int, intermediate: int, act: str, bias: bool) -> None:
        super().__init__()
        self.up_proj = nn.Linear(size, intermediate, bias=bias)
        self.down_proj = nn.Linear(intermediate, size, bias=bias)
        self.act = activation(act)

    def forward(self, x: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
        return self.down_proj(self.act(self.up_proj(x)))


class NemotronHMoE(nn.Module):
    """Routed squared-ReLU experts (optionally in a smaller latent width) plus a shared expert."""

    def __init__(self, config: NemotronHConfig, layer_idx: int) -> None:
        super().__init__()
        width = config.moe_latent_size or config.hidden_size
        self.gate = BiasedRouter(
            config.hidden_size, config.n_routed_experts, config.num_experts_per_tok, n_group=config.n_group,
            topk_group=config.topk_group, renormalize=config.norm_topk_prob, scaling=config.routed_scaling_factor,
        )
        self.experts = nn.ModuleList(
            NemotronHMLP(width, config.moe_intermediate_size, config.mlp_hidden_act, config.mlp_bias)
            for _ in range(config.n_routed_experts)
        )
        self.shared_experts = NemotronHMLP(config.hidden_size, config.moe_shared_expert_intermediate_size,
                                           config.mlp_hidden_act, config.mlp_bias)
        self.latent = config.moe_latent_size is not None
        if self.latent:
            self.fc1_latent_proj = nn.Linear(config.hidden_size, width, bias=config.mlp_bias)
            self.fc2_latent_proj = nn.Linear(width, config.hidden_size, bias=config.mlp_bias)

    def forward(self, x: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        weights, indices = self.gate(flat)
        h = self.fc1_latent_proj(flat) if self.latent else flat
        h = dispatch_experts(h, weights, indices, self.experts)
        if self.latent:
            h = self.fc2_latent_proj(h)
        return h.view(x.shape) + self.shared_experts(x)


class NemotronHBlock(nn.Module):
    """``x + mixer(RMSNorm(x))``, the residual optionally kept in fp32."""

    def __init__(self, config: NemotronHConfig, layer_idx: int) -> None:
        super().__init__()
        self.kind = config.layer_types[layer_idx]
        self.residual_in_fp32 = config.residual_in_fp32
        self.norm = NemotronHRMSNorm(config.hidden_size, config.layer_norm_epsilon)
        if self.kind == "mamba":
            self.mixer = NemotronHMamba2Mixer(config, layer_idx)
        elif self.kind == "attention":
            self.mixer = NemotronHAttention(config, layer_idx)
        elif self.kind == "mlp":
            self.mixer = NemotronHMLP(config.hidden_size, config.intermediate_size, config.mlp_hidden_act,
                                      config.mlp_bias)
        else:
            self.mixer = NemotronHMoE(config, layer_idx)

    def forward(self, x: torch.Tensor, cache: Cache | None) -> torch.Tensor:
        residual = x.float() if self.residual_in_fp32 else x
        return residual + self.mixer(self.norm(x.to(self.norm.weight.dtype)), cache)


class NemotronHBackbone(nn.Module):
    def __init__(self, config: NemotronHConfig) -> None:
        super().__init__()
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(NemotronHBlock(config, i) for i in range(config.num_hidden_layers))
        self.norm_f = NemotronHRMSNorm(config.hidden_size, config.layer_norm_epsilon)


class NemotronHForCausalLM(CausalLM):
    """Nemotron-H over linattn's fused Mamba-2 op, loading Hugging Face checkpoints."""

    config_class = NemotronHConfig
    fp32_names = ("mixer.gate.weight", "mixer.gate.e_score_correction_bias")  # the MoE routers

    def __init__(self, config: NemotronHConfig) -> None:
        super().__init__()
        if not isinstance(config, NemotronHConfig):
            raise ValueError(f"config: expected a NemotronHConfig, got {type(config).__name__}")
        self.config = config
        self.backbone = NemotronHBackbone(config)
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size,
                                                                         bias=False)

    def forward(
        self, input_ids: torch.Tensor, cache: Cache | None = None, *, cu_seqlens: torch.Tensor | None = None,
        cp_group: object | None = None,
    ) -> torch.Tensor:
        """Logits ``[B, T, vocab]`` (fp32) of ``input_ids`` ``[B, T]``, continuing ``cache`` if
        given; ``cu_seqlens`` packs sequences into batch 1; ``cp_group``: context parallelism
        (see :meth:`CausalLM._begin`)."""
        ctx = self._begin(input_ids, cache, cu_seqlens, cp_group)
        h = self.backbone.embeddings(input_ids)
        for layer in self.backbone.layers:
            h = layer(h, ctx)
        h = self.backbone.norm_f(h)
        head = self.backbone.embeddings.weight if self.lm_head is None else self.lm_head.weight
        logits = F.linear(h.to(head.dtype), head).float()
        self._end(ctx, input_ids.shape[1])
        return logits

    @staticmethod
    def checkpoint_name(name: str) -> str | None:
        """Drop the multi-token-prediction heads; accept ``model.`` for ``backbone.``."""
        if name.startswith("mtp."):
            return None
        if name.startswith("model."):
            return "backbone." + name[len("model."):]
        return name
