"""The causal-LM base class: loading from a checkpoint folder and generating tokens.

Prefill runs the prompt through the chunk kernels and fills a :class:`~models.cache.Cache`;
every later token runs through the step kernels. Greedy decoding and sampling
(temperature, top-k, top-p) share one loop.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from .cache import Cache
from .checkpoint import load_state, read_config, read_tensors

__all__ = ["CausalLM", "sample_next"]

log = logging.getLogger(__name__)


def sample_next(
    logits: torch.Tensor,
    *,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The next token ``[B]`` from last-position ``logits`` ``[B, vocab]``."""
    if not do_sample:
        return logits.argmax(-1)
    if temperature <= 0:
        raise ValueError(f"temperature: must be > 0 when sampling, got {temperature}")
    scores = logits.float() / temperature
    if top_k is not None:
        if top_k < 1:
            raise ValueError(f"top_k: must be >= 1, got {top_k}")
        kth = torch.topk(scores, min(top_k, scores.shape[-1]), dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p is not None:
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p: must be in (0, 1], got {top_p}")
        sorted_scores, order = torch.sort(scores, descending=True, dim=-1)
        cumulative = sorted_scores.softmax(-1).cumsum(-1)
        # drop a token when the tokens before it already reach top_p (the first always stays)
        drop = (cumulative - sorted_scores.softmax(-1)) >= top_p
        scores = scores.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = scores.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


class CausalLM(nn.Module):
    """A decoder-only LM over linattn ops: ``forward(input_ids, cache) -> logits``.

    Subclasses set ``config_class`` (with a ``from_dict`` accepting the checkpoint's
    config) and may override :meth:`checkpoint_name` to map checkpoint tensor names.
    """

    config_class: ClassVar[Any]

    def forward(self, input_ids: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    @staticmethod
    def checkpoint_name(name: str) -> str | None:
        """The module's name for checkpoint tensor ``name`` (None: not used by this model)."""
        return name

    @classmethod
    def from_pretrained(
        cls,
        folder: str | Path,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> "CausalLM":
        """Build the model from ``folder``'s ``config.json`` and load its safetensors strictly.

        ``dtype`` defaults to the checkpoint's own (``dtype``/``torch_dtype`` in the config).
        """
        config = cls.config_class.from_dict(read_config(folder))
        model = cls(config)
        load_state(model, read_tensors(folder), rename=cls.checkpoint_name)
        dtype = dtype or getattr(config, "dtype", None) or torch.float32
        return model.to(device=device, dtype=dtype).eval()

    def new_cache(self) -> Cache:
        return Cache()

    def _check_ids(self, input_ids: torch.Tensor) -> None:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype not in (torch.int32, torch.int64):
            raise ValueError("input_ids: expected an integer tensor [batch, tokens]")
        if input_ids.shape[1] == 0:
            raise ValueError("input_ids: needs at least one token")

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        *,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_token_id: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Prompt ``[B, T]`` followed by up to ``max_new_tokens`` new tokens ``[B, T + n]``.

        A sequence that emits ``eos_token_id`` repeats it until every sequence has; the
        loop stops early once all have.
        """
        self._check_ids(input_ids)
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens: must be >= 0, got {max_new_tokens}")
        cache = self.new_cache()
        out, logits = input_ids, self(input_ids, cache)[:, -1]
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for i in range(max_new_tokens):
            token = sample_next(logits, do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
            if eos_token_id is not None:
                token = torch.where(done, torch.full_like(token, eos_token_id), token)
                done |= token == eos_token_id
            out = torch.cat([out, token[:, None].to(out.dtype)], dim=1)
            if i + 1 == max_new_tokens or (eos_token_id is not None and bool(done.all())):
                break
            logits = self(token[:, None].to(input_ids.dtype), cache)[:, -1]
        return out
