"""Prompts of different lengths, every family: packed sequences (``cu_seqlens``) and
batched generation from left-padded prompts (prefilled packed, decoded as a batch).

A batch must generate exactly what each prompt generates on its own; the padding tokens
must not matter at all; packed logits equal separate calls'. "Exactly" for token ids only
where no greedy step is a near-tie (the batch runs other kernels than a single prompt, and
fp32 rounding differs between them and between machines), which the tests assert first.
"""
import pytest
import torch

from helpers import GREEDY_MARGIN, TINY_MODELS as TINY, tiny_model as _model, top2_margin
from linattn.models.cache import Cache

@pytest.mark.parametrize("family", sorted(TINY))
def test_left_padded_batch_generates_each_prompt_alone(family):
    model = _model(family)
    g = torch.Generator().manual_seed(1)
    lengths, T, n = [9, 4, 6], 9, 5
    prompts = [torch.randint(0, 97, (1, L), generator=g) for L in lengths]
    ids = torch.zeros(len(lengths), T, dtype=torch.long)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, T - p.shape[1]:] = p[0]
        ids[i, : T - p.shape[1]] = 96  # padding tokens: any value must do
        mask[i, T - p.shape[1]:] = 1
    batch = model.generate(ids, n, attention_mask=mask)
    assert batch.shape == (len(lengths), T + n) and torch.equal(batch[:, :T], ids)
    for i, p in enumerate(prompts):
        alone = model.generate(p, n)
        with torch.no_grad():
            margin = top2_margin(model(alone)[:, p.shape[1] - 1:-1])
        assert margin >= GREEDY_MARGIN, (i, margin)
        assert torch.equal(batch[i, T:], alone[0, p.shape[1]:]), f"prompt {i}"
    # logits, not just argmaxes: the merged cache continues each sequence like its own cache
    with torch.no_grad():
        caches = [model.new_cache() for _ in prompts]
        for p, c in zip(prompts, caches):
            model(p, c)
        merged = Cache.merge(caches)
        step = batch[:, T:T + 1]
        together = model(step, merged)
        for i, p in enumerate(prompts):
            own = model.new_cache()
            model(p, own)
            torch.testing.assert_close(together[i], model(step[i:i + 1], own)[0], rtol=1e-4, atol=1e-4)


def test_attention_mask_errors():
    model = _model("qwen3_next")
    ids = torch.randint(0, 97, (2, 5))
    for mask, match in [
        (torch.ones(2, 4), "shape"),
        (torch.full((2, 5), 2), "zeros"),
        (torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]), "left padding"),
    ]:
        with pytest.raises(ValueError, match=f"attention_mask: .*{match}"):
            model.generate(ids, 2, attention_mask=mask)
    same = model.generate(ids, 3, attention_mask=torch.ones(2, 5, dtype=torch.long))
    assert torch.equal(same, model.generate(ids, 3))  # bitwise: a mask of ones takes the unmasked path


@pytest.mark.parametrize("family", sorted(TINY))
def test_packed_sequences_equal_separate_calls(family):
    """``cu_seqlens`` packs sequences into batch 1: every token's logits as if alone (training on packed data)."""
    model = _model(family)
    g = torch.Generator().manual_seed(2)
    lengths = [7, 1, 12]
    seqs = [torch.randint(0, 97, (1, L), generator=g) for L in lengths]
    cu = torch.tensor([0, 7, 8, 20], dtype=torch.int32)
    with torch.no_grad():
        packed = model(torch.cat(seqs, dim=1), cu_seqlens=cu)
        for i, x in enumerate(seqs):
            torch.testing.assert_close(packed[0, cu[i]:cu[i + 1]], model(x)[0], rtol=1e-4, atol=1e-4)
    for bad, match in [(torch.tensor([0, 7, 20]), "cu_seqlens: expected 0 = c_0"), (cu.float(), "int32/int64")]:
        with pytest.raises(ValueError, match=match):
            model(torch.cat(seqs, dim=1)[:, :19] if bad.numel() == 3 else torch.cat(seqs, dim=1), cu_seqlens=bad)
    with pytest.raises(ValueError, match="batch 1"):
        model(torch.zeros(2, 20, dtype=torch.long), cu_seqlens=cu)
    cache = model.new_cache()
    model(seqs[0], cache)
    with pytest.raises(ValueError, match="cannot continue"):
        model(torch.cat(seqs, dim=1), cache, cu_seqlens=cu)
