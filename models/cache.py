"""The decode cache of a hybrid model, and the ways a layer runs with it.

A hybrid keeps three kinds of state between calls: the last ``W - 1`` inputs of each
short convolution, the fp32 matrix state of each recurrence and the keys and values of
each attention layer. Linear layers prefill through the chunk kernels (which return the
final state) and decode through the step kernels (which update it in place).

A call may also carry packed sequences (``cu_seqlens``, batch 1): the cache then holds
them for the call in progress (a transient one when the caller keeps no cache), the
convolutions and recurrences keep the sequences apart, attention is block-diagonal, and
a prefill leaves one state row and one padded key/value row per sequence.
"""
from __future__ import annotations

import warnings

import torch

from linattn.context_parallel import Share
from linattn.op import CompiledOp

from .conv import causal_conv1d, causal_conv1d_update
from .layers import attention

__all__ = ["Cache", "attend", "run_conv", "run_recurrence", "STEP_TOKENS"]

#: Continuations up to this many tokens per sequence run through the step kernel; longer
#: ones (a second prompt on a warm cache) through the chunk kernels from the cached state.
STEP_TOKENS = 16


def _padded_rows(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences ``[L_i, ...]`` as one ``[N, max L, ...]`` tensor padded after each, and the
    ``[N, max L]`` mask of their real positions."""
    longest = max(r.shape[0] for r in rows)
    padded = torch.stack([torch.nn.functional.pad(r, (0, 0) * (r.dim() - 1) + (0, longest - r.shape[0])) for r in rows])
    lengths = torch.tensor([r.shape[0] for r in rows], device=padded.device)
    return padded, torch.arange(longest, device=padded.device)[None, :] < lengths[:, None]


class Cache:
    """Per-layer states, keyed by a layer's name, and the number of tokens seen so far.

    ``seen`` is an int, or a ``[B]`` tensor when the sequences of a batch have different
    lengths (a prefill of packed sequences, or a :meth:`merge` of single-sequence caches);
    then the key/value caches are padded after each sequence's own keys and ``pad_mask``
    marks the real ones.
    """

    def __init__(self, store: bool = True) -> None:
        self.seen: int | torch.Tensor = 0
        self.conv: dict[str, torch.Tensor] = {}
        self.recurrent: dict[str, torch.Tensor] = {}
        self.keys: dict[str, torch.Tensor] = {}
        self.values: dict[str, torch.Tensor] = {}
        self.pad_mask: torch.Tensor | None = None
        #: False: a transient context carrying packed sequences through one call, keeping nothing
        self.store = store
        #: the packed sequences of the call in progress (int32 ``[N + 1]``), else None
        self.cu_seqlens: torch.Tensor | None = None
        #: context parallelism: this rank's share of the packed stream (``cu_seqlens`` global)
        self.cp: Share | None = None

    def empty(self) -> bool:
        return not (self.conv or self.recurrent or self.keys)

    def packed_positions(self) -> torch.Tensor:
        """Each packed token's position in its own sequence ``[1, total]`` (the call's ``cu_seqlens``)."""
        cu = self.cu_seqlens.long()
        lengths = cu[1:] - cu[:-1]
        starts = torch.repeat_interleave(cu[:-1], lengths)
        positions = (torch.arange(int(cu[-1]), device=cu.device) - starts)[None]
        return positions if self.cp is None else positions[:, self.cp.a : self.cp.b]

    def key_mask(self, keys: int) -> torch.Tensor | None:
        """``[B, keys]`` bool, True for real keys (None: no padding). Keys past the merge are all real."""
        if self.pad_mask is None:
            return None
        extra = keys - self.pad_mask.shape[1]
        ones = self.pad_mask.new_ones(self.pad_mask.shape[0], extra)
        return torch.cat([self.pad_mask, ones], dim=1)

    @staticmethod
    def merge(caches: list["Cache"]) -> "Cache":
        """One batch cache from caches of single sequences (of any lengths), in order."""
        if not caches:
            raise ValueError("caches: nothing to merge")
        first = caches[0]
        out = Cache()
        for field in ("conv", "recurrent"):
            for name in getattr(first, field):
                getattr(out, field)[name] = torch.cat([getattr(c, field)[name] for c in caches], dim=0)
        out.seen = torch.tensor([int(c.seen) for c in caches], dtype=torch.long)
        for name in first.keys:
            out.keys[name], out.pad_mask = _padded_rows([c.keys[name][0] for c in caches])
            out.values[name], _ = _padded_rows([c.values[name][0] for c in caches])
        out.seen = out.seen.to(next(iter(out.keys.values())).device) if out.keys else out.seen
        return out

    def extend(self, name: str, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``k, v`` ``[B, T, H, D]`` to layer ``name``'s cache; return all of it."""
        if name in self.keys:
            k = torch.cat([self.keys[name], k], dim=1)
            v = torch.cat([self.values[name], v], dim=1)
        self.keys[name], self.values[name] = k, v
        return k, v

    def snapshot(self) -> "Cache":
        """A copy to roll back to (states are cloned; key/value tensors are never mutated)."""
        copy = Cache()
        copy.seen = self.seen.clone() if isinstance(self.seen, torch.Tensor) else self.seen
        copy.conv = {n: t.clone() for n, t in self.conv.items()}
        copy.recurrent = {n: t.clone() for n, t in self.recurrent.items()}
        copy.keys, copy.values = dict(self.keys), dict(self.values)
        copy.pad_mask = self.pad_mask
        return copy

    def restore(self, snapshot: "Cache") -> None:
        """Return to ``snapshot`` (which must not be used afterwards)."""
        self.seen = snapshot.seen
        self.conv, self.recurrent = snapshot.conv, snapshot.recurrent
        self.keys, self.values = snapshot.keys, snapshot.values
        self.pad_mask = snapshot.pad_mask


def run_conv(
    name: str,
    cache: Cache | None,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str | None,
) -> torch.Tensor:
    """The causal conv of ``x`` ``[B, T, D]``, continuing and updating ``cache`` if given."""
    if cache is None:
        return causal_conv1d(x, weight, bias, activation)[0]
    cu = cache.cu_seqlens
    if cache.cp is not None:
        return _cp_conv(cache.cp, x, weight, bias, activation)
    if not cache.store:
        return causal_conv1d(x, weight, bias, activation, cu_seqlens=cu)[0]
    state = cache.conv.get(name)
    if state is None:
        y, cache.conv[name] = causal_conv1d(x, weight, bias, activation, output_final_state=True, cu_seqlens=cu)
        return y
    return causal_conv1d_update(x, state, weight, bias, activation)


def _cp_conv(cp: Share, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str | None) -> torch.Tensor:
    """The conv of this rank's share: its first sequence continues from the inputs before it
    (up to ``W - 1`` of them, from the ranks before; zeros before the sequence's start)."""
    W = weight.shape[-1]
    n = min(W - 1, cp.a - cp.first_start())
    halo = cp.before(x, n, W - 1)[0].transpose(0, 1)  # [D, n]: every rank takes part in the gather
    cu = cp.local_cu()
    if len(cu) == 1:  # an empty share
        return x * 0
    init = x.new_zeros(len(cu) - 1, x.shape[-1], W - 1)
    init = torch.cat([torch.cat([init[0, :, : W - 1 - n], halo], 1)[None], init[1:]], 0)
    cu_t = torch.tensor(cu, dtype=torch.int32, device=x.device)
    return causal_conv1d(x, weight, bias, activation, initial_state=init, cu_seqlens=cu_t)[0]


def run_recurrence(
    name: str,
    cache: Cache | None,
    op: CompiledOp,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    **kwargs,
) -> torch.Tensor:
    """``op``'s output for ``q, k, v``, continuing and updating ``cache``'s state if given."""
    if q.shape[1] < q.shape[2] and "cu_seqlens" not in kwargs and (cache is None or cache.cu_seqlens is None):
        # a short prompt, [B, T, H, K] by construction: not the head-first mistake the op warns of
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="q: the layout is", category=UserWarning)
            return _run_recurrence(name, cache, op, q, k, v, **kwargs)
    return _run_recurrence(name, cache, op, q, k, v, **kwargs)


def _run_recurrence(name: str, cache: Cache | None, op: CompiledOp, q, k, v, **kwargs) -> torch.Tensor:
    if cache is None:
        return op(q, k, v, **kwargs)[0]
    if cache.cu_seqlens is not None:
        kwargs["cu_seqlens"] = cache.cu_seqlens
    if cache.cp is not None:
        kwargs["cp_group"] = cache.cp.group
    if not cache.store:
        return op(q, k, v, **kwargs)[0]
    state = cache.recurrent.get(name)
    if state is not None and q.shape[1] <= STEP_TOKENS:
        return op.step(q, k, v, state, **kwargs)
    o, cache.recurrent[name] = op(q, k, v, initial_state=state, output_final_state=True, **kwargs)
    return o


def attend(name: str, cache: Cache | None, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention of ``q`` over ``k, v`` and layer ``name``'s cached keys and values.

    Packed sequences attend within themselves; a prefill with them stores each
    sequence's keys and values as one padded row.
    """
    if cache is None:
        return attention(q, k, v, scale)
    if cache.cp is not None:  # the whole stream's keys and values (no ring: one gather)
        cp = cache.cp
        k, v = cp.gather_tokens(k), cp.gather_tokens(v)
        cu = cache.cu_seqlens.long()
        segments = torch.repeat_interleave(torch.arange(cu.numel() - 1, device=q.device), (cu[1:] - cu[:-1]))[None]
        return attention(q, k, v, scale, segments=segments, q_start=cp.a)
    cu = cache.cu_seqlens
    if cu is not None:
        segments = torch.repeat_interleave(
            torch.arange(cu.numel() - 1, device=q.device), (cu[1:] - cu[:-1]).long()
        )[None]
        o = attention(q, k, v, scale, segments=segments)
        if cache.store:
            lengths = (cu[1:] - cu[:-1]).tolist()
            cache.keys[name], cache.pad_mask = _padded_rows(list(k[0].split(lengths)))
            cache.values[name], _ = _padded_rows(list(v[0].split(lengths)))
        return o
    k, v = cache.extend(name, k, v)
    return attention(q, k, v, scale, cache.key_mask(k.shape[1]))
