"""The causal-LM base class: loading from a checkpoint folder and generating tokens.

Prefill runs the prompt through the chunk kernels and fills a :class:`~models.cache.Cache`;
every later token runs through the step kernels. Greedy decoding and sampling
(temperature, top-k, top-p) share one loop.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from .cache import Cache
from .checkpoint import CheckpointTensors, load_state, read_config, read_tensors

__all__ = ["CausalLM", "Speculation", "sample_next"]

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
    config) and may override :meth:`checkpoint_name` / :meth:`adapt_checkpoint` to map
    checkpoint tensors and :attr:`fp32_names` to keep some parameters in fp32.
    """

    config_class: ClassVar[Any]

    def forward(
        self, input_ids: torch.Tensor, cache: Cache | None = None, *, cu_seqlens: torch.Tensor | None = None
    ) -> torch.Tensor:  # pragma: no cover
        """Logits ``[B, T, vocab]``; ``cache`` continues earlier calls; ``cu_seqlens``
        packs sequences into batch 1 (training on packed data, or a batched prefill)."""
        raise NotImplementedError

    #: name suffixes of parameters and buffers that stay fp32 whatever dtype the model is
    #: cast to (routers, gate biases: what the checkpoints and transformers keep in fp32)
    fp32_names: ClassVar[tuple[str, ...]] = ()

    def checkpoint_name(self, name: str) -> str | None:
        """The module's name for checkpoint tensor ``name`` (None: not used by this model)."""
        return name

    def adapt_checkpoint(self, tensors: CheckpointTensors) -> CheckpointTensors:
        """The checkpoint's tensors as this model loads them (e.g. a tied head filled in)."""
        return tensors

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
        The model is built on the meta device and each tensor converted and placed as it is
        read, so memory holds the model once, in ``dtype``, on ``device``.
        """
        config = cls.config_class.from_dict(read_config(folder))
        dtype = dtype or getattr(config, "dtype", None) or torch.float32
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"dtype: expected a floating torch.dtype, got {dtype!r}")
        with torch.device("meta"):  # no random initialisation: every tensor comes from the checkpoint
            model = cls(config)
        tensors = model.adapt_checkpoint(read_tensors(folder))
        load_state(model, tensors, rename=model.checkpoint_name, dtype=dtype, device=device or "cpu",
                   fp32_names=model.fp32_names)
        return model.eval()

    def cast(self, dtype: torch.dtype, device: torch.device | str | None = None) -> "CausalLM":
        """Move to ``device`` and cast to ``dtype``, except :attr:`fp32_names`; eval mode."""
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"dtype: expected a floating torch.dtype, got {dtype!r}")
        self.to(device=device)
        with torch.no_grad():
            for name, t in list(self.named_parameters()) + list(self.named_buffers()):
                if t.is_floating_point():
                    t.data = t.data.to(torch.float32 if name.endswith(self.fp32_names) and self.fp32_names else dtype)
        return self.eval()

    def new_cache(self) -> Cache:
        return Cache()

    def draft(self, hidden: torch.Tensor, tokens: torch.Tensor, cache: Cache) -> torch.Tensor:
        """Drafter logits for the tokens after ``tokens`` ``[B, t]``, from the final hidden states
        ``[B, t, hidden]`` of the positions before them (models with a multi-token-prediction
        module implement this; it continues the drafter's own state in ``cache``)."""
        raise ValueError(f"{type(self).__name__} has no multi-token-prediction module to draft with")

    def _prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> tuple[Cache, torch.Tensor]:
        """A cache holding the prompts and the logits after each ``[B, vocab]``."""
        if attention_mask is not None:
            if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
                raise ValueError(f"attention_mask: expected a tensor of input_ids' shape {list(input_ids.shape)}")
            mask = attention_mask.to(torch.long)
            if not bool(((mask == 0) | (mask == 1)).all()):
                raise ValueError("attention_mask: expected zeros (padding) and ones (tokens)")
            if bool((mask[:, 1:] < mask[:, :-1]).any()) or not bool(mask[:, -1].all()):
                raise ValueError("attention_mask: expected left padding (zeros before each prompt's tokens)")
            if not bool(mask.all()):
                # one prefill of the prompts packed without their padding
                lengths = mask.sum(1)
                cu = torch.zeros(len(lengths) + 1, dtype=torch.int32, device=input_ids.device)
                cu[1:] = torch.cumsum(lengths, 0)
                cache = self.new_cache()
                logits = self(input_ids[mask.bool()][None], cache, cu_seqlens=cu)
                return cache, logits[0, cu[1:].long() - 1]
        cache = self.new_cache()
        return cache, self(input_ids, cache)[:, -1]

    @torch.no_grad()
    def generate_speculative(self, input_ids: torch.Tensor, max_new_tokens: int, *, eos_token_id: int | None = None) -> Speculation:
        """Greedy decoding that drafts one token ahead with :meth:`draft` and verifies it.

        Produces exactly the tokens of ``generate(input_ids, max_new_tokens)`` (greedy),
        in fewer model calls when drafts are accepted. One sequence (batch 1).
        """
        self._check_ids(input_ids)
        if input_ids.shape[0] != 1:
            raise ValueError(f"input_ids: speculative decoding takes one sequence, got batch {input_ids.shape[0]}")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens: must be >= 0, got {max_new_tokens}")
        if max_new_tokens == 0:
            return Speculation(input_ids, 0, 0)
        return _speculate(self, input_ids, max_new_tokens, eos_token_id)

    def _begin(
        self, input_ids: torch.Tensor, cache: Cache | None, cu_seqlens: torch.Tensor | None, cp_group: object | None = None
    ) -> Cache | None:
        """Check a call's arguments; its cache context (a transient one for packed sequences without a cache).

        ``cp_group`` (context parallelism, training): ``input_ids`` ``[1, share]`` is this
        rank's share of one packed stream split over the group's ranks in order,
        ``cu_seqlens`` its global offsets (the same on every rank). The recurrences take the
        group (:mod:`linattn.context_parallel`), the convolutions the inputs before the share
        from the ranks before, attention the whole stream's keys and values (one all-gather:
        no ring attention), RoPE global positions; norms, MLPs and MoE are per token. No cache."""
        self._check_ids(input_ids, empty_ok=cp_group is not None)  # a rank's share may be empty
        if cache is not None and not isinstance(cache, Cache):
            raise ValueError(f"cache: expected a models.Cache, got {type(cache).__name__}")
        if cp_group is not None:
            if cu_seqlens is None or cache is not None or input_ids.shape[0] != 1:
                raise ValueError("cp_group: context parallelism takes one packed share (batch 1), cu_seqlens and no cache")
            from linattn.context_parallel import Share

            ctx = Cache(store=False)
            ctx.cu_seqlens = cu_seqlens.to(device=input_ids.device, dtype=torch.int32)
            ctx.cp = Share(cp_group, cu_seqlens, input_ids.shape[1])
            shares = [b - a for a, b in zip(ctx.cp.starts, ctx.cp.starts[1:])]
            if 0 in shares:  # known to every rank after the Share's exchange: all of them raise
                raise ValueError(f"input_ids: under cp_group every rank's share needs a token in a model, got shares {shares}")
            return ctx
        if cu_seqlens is None:
            return cache
        if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.dtype not in (torch.int32, torch.int64):
            raise ValueError("cu_seqlens: expected a 1-D int32/int64 tensor [sequences + 1]")
        if input_ids.shape[0] != 1:
            raise ValueError(f"cu_seqlens: packed sequences need batch 1, got {input_ids.shape[0]}")
        if cu_seqlens.device.type == "cpu":  # a host read of a CUDA tensor would synchronise
            cu = cu_seqlens.tolist()
            if len(cu) < 2 or cu[0] != 0 or cu[-1] != input_ids.shape[1] or any(b <= a for a, b in zip(cu, cu[1:])):
                raise ValueError(f"cu_seqlens: expected 0 = c_0 < c_1 < ... = {input_ids.shape[1]} tokens, got {cu}")
        if cache is not None and not cache.empty():
            raise ValueError("cu_seqlens: packed sequences start a cache (a prefill); they cannot continue one")
        ctx = cache if cache is not None else Cache(store=False)
        ctx.cu_seqlens = cu_seqlens.to(device=input_ids.device, dtype=torch.int32)
        return ctx

    @staticmethod
    def _end(ctx: Cache | None, tokens: int) -> None:
        """Close a call: the cache has seen ``tokens`` more tokens (each packed sequence, its own)."""
        if ctx is None:
            return
        if ctx.cu_seqlens is not None:
            cu = ctx.cu_seqlens.long()
            ctx.seen = cu[1:] - cu[:-1]
            ctx.cu_seqlens = None
        else:
            ctx.seen = ctx.seen + tokens  # never in place: a snapshot may share the tensor

    def _check_ids(self, input_ids: torch.Tensor, empty_ok: bool = False) -> None:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype not in (torch.int32, torch.int64):
            raise ValueError("input_ids: expected an integer tensor [batch, tokens]")
        if input_ids.shape[1] == 0 and not empty_ok:
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
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Prompt ``[B, T]`` followed by up to ``max_new_tokens`` new tokens ``[B, T + n]``.

        Prompts of different lengths come left-padded with an ``attention_mask`` (1: token,
        0: padding), as tokenizers give them: they are prefilled packed without their
        padding (one call, ``cu_seqlens``) and decoded as a batch, so padding never enters
        a recurrent state.
        A sequence that emits ``eos_token_id`` repeats it until every sequence has; the
        loop stops early once all have.
        """
        self._check_ids(input_ids)
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens: must be >= 0, got {max_new_tokens}")
        cache, logits = self._prefill(input_ids, attention_mask)
        out = input_ids
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


@dataclass
class Speculation:
    """What :meth:`CausalLM.generate_speculative` returns: the tokens and how drafting went."""

    tokens: torch.Tensor
    proposed: int
    accepted: int

    @property
    def acceptance(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0


def _speculate(model: "CausalLM", input_ids: torch.Tensor, max_new_tokens: int, eos_token_id: int | None) -> Speculation:
    """Greedy self-speculative decoding with one drafted token per step.

    Invariant at the top of the loop: the model's cache holds tokens ``x_0 .. x_(n-1)``,
    ``pending`` is the greedy token ``x_n`` and ``draft`` the drafter's guess of ``x_(n+1)``
    (the drafter has seen the pairs ``(h_t, x_(t+1))`` for ``t < n``). The model verifies
    ``[x_n, draft]`` in one call: if its greedy choice after ``x_n`` is ``draft``, both are
    kept and the second position gives ``x_(n+2)`` for free; otherwise the cache rolls back
    to before the call and takes ``x_n`` alone. The drafter only ever sees verified pairs,
    so its own cache never rolls back. The tokens equal plain greedy decoding's.
    """
    cache = model.new_cache()
    logits, hidden = model(input_ids, cache, return_hidden=True)
    pending = logits[:, -1].argmax(-1, keepdim=True)
    tokens = torch.cat([input_ids[:, 1:], pending], dim=1)  # x_(t+1) for every prompt position t
    draft = model.draft(hidden, tokens, cache)[:, -1].argmax(-1, keepdim=True)
    out, proposed, accepted = [input_ids], 0, 0
    produced = 0
    while produced < max_new_tokens:
        out.append(pending)
        produced += 1
        if produced == max_new_tokens or (eos_token_id is not None and int(pending) == eos_token_id):
            break
        snapshot = cache.snapshot()
        logits, hidden = model(torch.cat([pending, draft], dim=1), cache, return_hidden=True)
        choice = logits.argmax(-1)  # [1, 2]: greedy tokens after x_n and after the draft
        proposed += 1
        if int(choice[0, 0]) == int(draft):
            accepted += 1
            out.append(draft)
            produced += 1
            if produced == max_new_tokens or (eos_token_id is not None and int(draft) == eos_token_id):
                break
            pending = choice[:, 1:]
            draft = model.draft(hidden, torch.cat([draft, pending], dim=1), cache)[:, -1].argmax(-1, keepdim=True)
        else:
            cache.restore(snapshot)
            logits, hidden = model(pending, cache, return_hidden=True)
            pending = logits[:, -1].argmax(-1, keepdim=True)
            draft = model.draft(hidden, pending, cache)[:, -1].argmax(-1, keepdim=True)
    return Speculation(torch.cat(out, dim=1), proposed, accepted)
