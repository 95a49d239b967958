"""The decode cache of a hybrid model, and the two ways a layer runs with it.

A hybrid keeps three kinds of state between calls: the last ``W - 1`` inputs of each
short convolution, the fp32 matrix state of each recurrence and the keys and values of
each attention layer. Linear layers prefill through the chunk kernels (which return the
final state) and decode through the step kernels (which update it in place).
"""
from __future__ import annotations

import torch

from linattn.op import CompiledOp

from .conv import causal_conv1d, causal_conv1d_update

__all__ = ["Cache", "run_conv", "run_recurrence", "STEP_TOKENS"]

#: Continuations up to this many tokens per sequence run through the step kernel; longer
#: ones (a second prompt on a warm cache) through the chunk kernels from the cached state.
STEP_TOKENS = 16


class Cache:
    """Per-layer states, keyed by a layer's name, and the number of tokens seen so far.

    ``seen`` is an int, or a ``[B]`` tensor when the sequences of a batch have different
    lengths (a :meth:`merge` of caches prefilled one prompt at a time); then the key/value
    caches are padded after each sequence's own keys and ``pad_mask`` marks the real ones.
    """

    def __init__(self) -> None:
        self.seen: int | torch.Tensor = 0
        self.conv: dict[str, torch.Tensor] = {}
        self.recurrent: dict[str, torch.Tensor] = {}
        self.keys: dict[str, torch.Tensor] = {}
        self.values: dict[str, torch.Tensor] = {}
        self.pad_mask: torch.Tensor | None = None

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
        lengths = [c.seen for c in caches]
        out.seen = torch.tensor(lengths, dtype=torch.long)
        for name in first.keys:
            longest = max(c.keys[name].shape[1] for c in caches)
            pad = lambda t: torch.nn.functional.pad(t, (0, 0, 0, 0, 0, longest - t.shape[1]))  # noqa: E731
            out.keys[name] = torch.cat([pad(c.keys[name]) for c in caches], dim=0)
            out.values[name] = torch.cat([pad(c.values[name]) for c in caches], dim=0)
            if out.pad_mask is None:
                out.pad_mask = torch.arange(longest)[None, :] < torch.tensor([c.keys[name].shape[1] for c in caches])[:, None]
                out.pad_mask = out.pad_mask.to(out.keys[name].device)
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
        copy.seen = self.seen
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
    state = cache.conv.get(name)
    if state is None:
        y, cache.conv[name] = causal_conv1d(x, weight, bias, activation, output_final_state=True)
        return y
    return causal_conv1d_update(x, state, weight, bias, activation)


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
    if cache is None:
        return op(q, k, v, **kwargs)[0]
    state = cache.recurrent.get(name)
    if state is not None and q.shape[1] <= STEP_TOKENS:
        return op.step(q, k, v, state, **kwargs)
    o, cache.recurrent[name] = op(q, k, v, initial_state=state, output_final_state=True, **kwargs)
    return o
