"""transformers' Qwen3-Next, Kimi Linear and Nemotron-H on linattn's kernels.

transformers' modeling files pick a fast kernel for each recurrence and convolution when
its module is imported (``use_kernel_func_from_hub_with_fallback``: fla, mamba_ssm or
causal_conv1d if installed, else slow torch code that cannot keep packed sequences
apart). The layers look these functions up as globals of their modeling module at every
call, so :func:`enable` rebinds those globals to adapters over :mod:`linattn.ops` and
:mod:`linattn.models.conv`, and :func:`disable` puts the originals back. No file of
transformers changes, and models already built switch too::

    import linattn.integrations.transformers as lt
    names = lt.enable()   # the hub names switched
    ...                   # any Qwen3-Next / Kimi Linear / Nemotron-H model, built before or after
    lt.disable()          # transformers' own choice again

The adapters take transformers' calling conventions and translate them:

- Packed sequences as ``DataCollatorWithFlattening(return_flash_attn_kwargs=True,
  return_seq_idx=True)`` gives them: sequence bounds from ``cu_seqlens`` (Qwen3-Next passes
  it), else ``cu_seq_lens_q``, else ``seq_idx`` (Kimi and Nemotron-H pass the collator's
  keywords through). Every recurrence and convolution then keeps the sequences apart. A
  cached state (batch 1) continues the first packed sequence and the state handed back to
  the cache is the last sequence's, as mamba_ssm does.
- Decode through transformers' cache: its conv state keeps W columns (linattn's keeps
  W - 1; any L >= W - 1 works); its Mamba decode step receives ``dt``, ``A``, ``D`` and
  ``dt_bias`` broadcast over the head and state sizes and does not clamp ``dt``.
- Training: every adapter is differentiable (the compiled ops' registered backward).

Requires transformers >= 5.23 (checked by :func:`enable`).
"""
from __future__ import annotations

import ast
import functools
import importlib
import inspect
import logging
import threading
from typing import Callable

import torch
import torch.nn.functional as F

from .. import ops
from ..models.conv import causal_conv1d, causal_conv1d_update
from ..models.layers import gated_rms_norm

__all__ = ["MIN_VERSION", "MODULES", "enable", "disable", "enabled"]

logger = logging.getLogger(__name__)

#: the oldest transformers release whose modeling files these adapters follow
MIN_VERSION = (5, 23)
#: the modeling modules switched
MODULES = (
    "transformers.models.qwen3_next.modeling_qwen3_next",
    "transformers.models.kimi_linear.modeling_kimi_linear",
    "transformers.models.nemotron_h.modeling_nemotron_h",
)
_DECORATOR = "use_kernel_func_from_hub_with_fallback"

_lock = threading.Lock()
#: (module name, global name) -> the function transformers had bound there
_saved: dict[tuple[str, str], Callable] = {}


# ----------------------------------------------------------------------------- packing
def _bounds(extra: dict, batch: int, T: int, device: torch.device) -> torch.Tensor | None:
    """The packed sequences' offsets ``[N + 1]`` from transformers' keywords, or None."""
    cu = extra.get("cu_seqlens")
    if cu is None:
        cu = extra.get("cu_seq_lens_q")
    seq_idx = extra.get("seq_idx")
    if cu is None and seq_idx is None:
        return None
    if batch != 1:
        raise ValueError(f"cu_seqlens: packed sequences need batch 1, got {batch}")
    if cu is None:
        if not isinstance(seq_idx, torch.Tensor) or tuple(seq_idx.shape) != (1, T):
            raise ValueError(f"seq_idx: expected a [1, {T}] tensor, got {getattr(seq_idx, 'shape', seq_idx)!r}")
        starts = torch.nonzero(seq_idx[0, 1:] != seq_idx[0, :-1]).flatten() + 1
        edges = torch.tensor([0, T], dtype=starts.dtype, device=device)
        cu = torch.cat([edges[:1], starts, edges[1:]])
    return cu.to(device=device)


def _seq_idx(cu: torch.Tensor, T: int) -> torch.Tensor:
    """mamba's ``seq_idx`` ``[1, T]`` of the offsets ``cu`` (computed on the device)."""
    tokens = torch.arange(T, device=cu.device, dtype=cu.dtype)
    return torch.searchsorted(cu[1:], tokens, right=True).to(torch.int32)[None]


def _state_in(h0: torch.Tensor | None, cu: torch.Tensor | None) -> tuple[torch.Tensor | None, bool]:
    """A cache's state (one row) for packed sequences: it continues the first one, the
    others start from zeros. Returns the states and whether the caller wants one row back."""
    if h0 is None or cu is None:
        return h0, cu is not None
    N = cu.numel() - 1
    if h0.shape[0] == N:
        return h0, N == 1
    if h0.shape[0] != 1:
        raise ValueError(f"initial_state: expected 1 or {N} rows for {N} packed sequences, got {h0.shape[0]}")
    return torch.cat([h0, h0.new_zeros(N - 1, *h0.shape[1:])]), True


def _state_out(ht: torch.Tensor | None, one_row: bool) -> torch.Tensor | None:
    return ht[-1:] if ht is not None and one_row else ht


# ----------------------------------------------------------------------------- convolution
def conv_fn(hidden_states, weight, bias=None, activation=None, **extra):
    """causal_conv1d's prefill, ``[B, D, L]`` -> ``[B, D, L]``, packed sequences apart.

    Columns before the first packed sequence (a cache's previous inputs, or zero padding
    that transformers adds before a prompt shorter than W) continue that sequence.
    """
    B, _, L = hidden_states.shape
    x = hidden_states.transpose(1, 2)
    cu = _bounds(extra, B, L, x.device)
    if cu is not None:
        bounds = cu.tolist()
        if bounds[-1] > L or bounds[0] != 0:
            raise ValueError(f"cu_seqlens: offsets {bounds} do not fit {L} columns")
        lead = L - bounds[-1]
        cu = torch.tensor([0] + [b + lead for b in bounds[1:]], dtype=torch.int64, device=x.device)
    y, _ = causal_conv1d(x, weight, bias, activation, cu_seqlens=cu)
    return y.transpose(1, 2)


def conv_update(hidden_states, conv_state, weight, bias=None, activation=None, **extra):
    """causal_conv1d's decode update: ``[B, D, T]`` new inputs, ``conv_state`` ``[B, D, L]``
    (L >= W - 1; transformers keeps W) shifted in place."""
    y = causal_conv1d_update(hidden_states.transpose(1, 2), conv_state, weight, bias, activation)
    return y.transpose(1, 2)


# ----------------------------------------------------------------------------- delta rules
def _delta_rule(op, query, key, value, g, beta, initial_state=None, output_final_state=False,
                use_qk_l2norm_in_kernel=False, **extra):
    cu = _bounds(extra, query.shape[0], query.shape[1], query.device)
    h0, one_row = _state_in(initial_state, cu)
    o, ht = op(query, key, value, g=g, beta=beta, initial_state=h0, output_final_state=output_final_state,
               use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel, cu_seqlens=cu)
    return o, _state_out(ht, one_row)


def gdn_chunk(query, key, value, g, beta, chunk_size=64, initial_state=None, output_final_state=False,
              use_qk_l2norm_in_kernel=False, **extra):
    """Gated DeltaNet over a prompt (fla's ``chunk_gated_delta_rule``)."""
    return _delta_rule(ops.chunk_gated_delta_rule, query, key, value, g, beta, initial_state,
                       output_final_state, use_qk_l2norm_in_kernel, **extra)


def gdn_recurrent(query, key, value, g, beta, initial_state=None, output_final_state=False,
                  use_qk_l2norm_in_kernel=False, **extra):
    """Gated DeltaNet decode (fla's ``fused_recurrent_gated_delta_rule``)."""
    return _delta_rule(ops.fused_recurrent_gated_delta_rule, query, key, value, g, beta, initial_state,
                       output_final_state, use_qk_l2norm_in_kernel, **extra)


def kda_chunk(query, key, value, g, beta, chunk_size=64, initial_state=None, output_final_state=False,
              use_qk_l2norm_in_kernel=False, **extra):
    """Kimi Delta Attention over a prompt (fla's ``chunk_kda``)."""
    return _delta_rule(ops.chunk_kda, query, key, value, g, beta, initial_state, output_final_state,
                       use_qk_l2norm_in_kernel, **extra)


def kda_recurrent(query, key, value, g, beta, initial_state=None, output_final_state=False,
                  use_qk_l2norm_in_kernel=False, **extra):
    """Kimi Delta Attention decode (fla's ``fused_recurrent_kda``)."""
    return _delta_rule(ops.fused_recurrent_kda, query, key, value, g, beta, initial_state,
                       output_final_state, use_qk_l2norm_in_kernel, **extra)


# ----------------------------------------------------------------------------- Mamba-2
def _scan(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, dt_softplus, dt_limit, return_final_states,
          extra: dict):
    cu = _bounds(extra, x.shape[0], x.shape[1], x.device)
    packed = {} if cu is None else {"cu_seqlens": cu, "seq_idx": _seq_idx(cu, x.shape[1])}
    # packed: mamba's initial state is the first sequence's, its final state the last one's
    result = ops.mamba_chunk_scan_combined(
        x, dt, A, B, C, chunk_size, D=D, z=z, dt_bias=dt_bias, initial_states=initial_states, dt_softplus=dt_softplus,
        dt_limit=tuple(dt_limit), return_final_states=return_final_states and not packed,
        return_varlen_states=return_final_states and bool(packed), **packed,
    )
    if not return_final_states:
        return result
    out, states = result
    return out, _state_out(states, bool(packed))


def mamba_chunk_scan(hidden_states, dt, A, B, C, chunk_size, D=None, dt_bias=None, initial_states=None,
                     dt_softplus=False, dt_limit=(0.0, float("inf")), return_final_states=False, **extra):
    """Mamba-2's SSD scan (mamba_ssm's ``mamba_chunk_scan_combined``)."""
    return _scan(hidden_states, dt, A, B, C, chunk_size, D, extra.pop("z", None), dt_bias, initial_states,
                 dt_softplus, dt_limit, return_final_states, extra)


def mamba_state_update(state, hidden_states, dt, A, B, C, D=None, dt_bias=None, dt_softplus=False, z=None, **extra):
    """Mamba-2's decode step (mamba_ssm's ``selective_state_update``); no ``dt`` clamp, as there."""
    return ops.selective_state_update(state, hidden_states, dt, A, B, C, D=D, z=z, dt_bias=dt_bias,
                                      dt_softplus=dt_softplus)


def mamba_split_conv_scan(zxbcdt, conv1d_weight, conv1d_bias, dt_bias, A, D, chunk_size, initial_states=None,
                          dt_limit=(0.0, float("inf")), return_final_states=False, activation="silu",
                          rmsnorm_weight=None, rmsnorm_eps=1e-6, outproj_weight=None, outproj_bias=None,
                          headdim=None, ngroups=1, norm_before_gate=True, **extra):
    """Mamba-2's training path in one call (mamba_ssm's ``mamba_split_conv1d_scan_combined``):
    split the input projection, conv, SSD scan, gated RMSNorm and output projection."""
    if D.dim() == 1:
        if headdim is None:
            raise ValueError("headdim: required when D is per head")
        nheads = D.shape[0]
    else:
        nheads, headdim = D.shape
    batch, T, width = zxbcdt.shape
    dim = nheads * headdim
    dstate = (conv1d_weight.shape[0] - dim) // ngroups // 2
    extra_mlp = (width - 2 * dim - 2 * ngroups * dstate - nheads) // 2
    if extra_mlp < 0 or width != 2 * extra_mlp + 2 * dim + 2 * ngroups * dstate + nheads:
        raise ValueError(f"zxbcdt: width {width} does not split into z, x, B, C and dt of these sizes")
    zx0, z, xbc, dt = zxbcdt.split([2 * extra_mlp, dim, dim + 2 * ngroups * dstate, nheads], dim=-1)
    xbc = conv_fn(xbc.transpose(1, 2), conv1d_weight, conv1d_bias, activation, **extra).transpose(1, 2)
    x, B, C = xbc.split([dim, ngroups * dstate, ngroups * dstate], dim=-1)
    z = z.reshape(batch, T, nheads, headdim)
    result = _scan(
        x.reshape(batch, T, nheads, headdim), dt, A, B.reshape(batch, T, ngroups, dstate),
        C.reshape(batch, T, ngroups, dstate), chunk_size, D, None if rmsnorm_weight is not None else z, dt_bias,
        initial_states, True, dt_limit, return_final_states, extra,
    )
    y, states = result if return_final_states else (result, None)
    y = y.reshape(batch, T, dim)
    if rmsnorm_weight is not None:
        y = gated_rms_norm(y, z.reshape(batch, T, dim), rmsnorm_weight, rmsnorm_eps, dim // ngroups, norm_before_gate)
    if extra_mlp:
        first, second = zx0.chunk(2, dim=-1)
        y = torch.cat([F.silu(first) * second, y], dim=-1)
    if outproj_weight is not None:
        y = F.linear(y.to(outproj_weight.dtype), outproj_weight, outproj_bias)
    return (y, states) if return_final_states else y


#: hub name -> adapter
ADAPTERS: dict[str, Callable] = {
    "causal_conv1d_fn": conv_fn,
    "causal_conv1d_update": conv_update,
    "chunk_gated_delta_rule": gdn_chunk,
    "fused_recurrent_gated_delta_rule": gdn_recurrent,
    "chunk_kda": kda_chunk,
    "fused_recurrent_kda": kda_recurrent,
    "mamba_chunk_scan_combined": mamba_chunk_scan,
    "selective_state_update": mamba_state_update,
    "mamba_split_conv1d_scan_combined": mamba_split_conv_scan,
}


# ----------------------------------------------------------------------------- switching
def _check_version() -> None:
    try:
        import transformers
    except ImportError as e:
        raise ImportError("linattn.integrations.transformers: transformers is not installed "
                          f"(needs >= {'.'.join(map(str, MIN_VERSION))})") from e
    found = transformers.__version__
    numbers = []
    for part in found.split(".")[:2]:
        digits = "".join(ch for ch in part if ch.isdigit())
        numbers.append(int(digits) if digits else 0)
    if tuple(numbers) < MIN_VERSION:
        raise ImportError(f"linattn.integrations.transformers: needs transformers >= "
                          f"{'.'.join(map(str, MIN_VERSION))}, found {found}")


@functools.cache
def _decorated(module_name: str) -> tuple[tuple[str, str], ...]:
    """(global name, hub name) of every function of the module that transformers decorates
    with a kernel choice, read from the module's source."""
    module = importlib.import_module(module_name)
    found = []
    for node in ast.parse(inspect.getsource(module)).body:
        if not isinstance(node, ast.FunctionDef):
            continue
        for dec in node.decorator_list:
            func = dec.func if isinstance(dec, ast.Call) else None
            name = getattr(func, "id", getattr(func, "attr", None))
            if name == _DECORATOR and dec.args and isinstance(dec.args[0], ast.Constant):
                found.append((node.name, dec.args[0].value))
    return tuple(found)


def _switched(original: Callable, adapter: Callable, hub: str) -> Callable:
    """``adapter`` behind ``original``'s signature: transformers' positional and keyword
    arguments bound by its own parameter names, whatever the call passes positionally."""
    signature = inspect.signature(inspect.unwrap(original))
    var_kw = next((p.name for p in signature.parameters.values() if p.kind is p.VAR_KEYWORD), None)

    @functools.wraps(original)
    def run(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        named = dict(bound.arguments)
        extra = named.pop(var_kw, {}) if var_kw else {}
        return adapter(**named, **extra)

    run.linattn_hub_name = hub
    run.linattn_original = original
    return run


def enable() -> list[str]:
    """Run transformers' Qwen3-Next, Kimi Linear and Nemotron-H on linattn's kernels.

    Imports the three modeling modules (if not yet imported) and rebinds each function
    that transformers decorates with a kernel choice to its linattn adapter. Idempotent.
    Returns the sorted hub names switched (``chunk_gated_delta_rule``, ``chunk_kda``,
    ``mamba_chunk_scan_combined``, ``causal_conv1d_fn``, ...).

    Raises:
        ImportError: transformers is missing or older than :data:`MIN_VERSION`.
    """
    _check_version()
    names = set()
    with _lock:
        for module_name in MODULES:
            module = importlib.import_module(module_name)
            for attr, hub in _decorated(module_name):
                adapter = ADAPTERS.get(hub)
                current = getattr(module, attr, None)
                if adapter is None or current is None:
                    logger.debug("%s.%s (%s): no linattn adapter, left as is", module_name, attr, hub)
                    continue
                if (module_name, attr) not in _saved:
                    _saved[(module_name, attr)] = current
                    setattr(module, attr, _switched(current, adapter, hub))
                names.add(hub)
    logger.info("linattn runs transformers' %s", ", ".join(sorted(names)))
    return sorted(names)


def disable() -> None:
    """Put back every function :func:`enable` switched (transformers' own choice, exactly)."""
    with _lock:
        for (module_name, attr), original in _saved.items():
            setattr(importlib.import_module(module_name), attr, original)
        _saved.clear()


def enabled() -> bool:
    """Whether :func:`enable` is in effect."""
    return bool(_saved)
