"""Qwen3-Next's multi-token-prediction module and self-speculative decoding, on their own terms.

transformers drops the ``mtp.*`` tensors, so there is no reference to compare with. What
must hold instead: the module loads strictly under the checkpoints' names, its drafts are
the composition the architecture describes and continue correctly from its cache, and
speculative decoding returns exactly the greedy tokens whatever the drafter proposes, in
fewer model calls when the drafts are right.
"""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from helpers import GREEDY_MARGIN, max_rel, top2_margin
from linattn.models import from_pretrained
from linattn.models.qwen3_next import Qwen3NextConfig, Qwen3NextForCausalLM

VOCAB = 97
TINY = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
    moe_intermediate_size=32, shared_expert_intermediate_size=48, num_experts=4, num_experts_per_tok=2,
    full_attention_interval=2, partial_rotary_factor=0.5, mtp_num_hidden_layers=1,
    model_type="qwen3_next", torch_dtype="float32",
)


def _save(folder, tensors: dict, config: dict):
    folder.mkdir(parents=True, exist_ok=True)
    save_file({n: t.contiguous() for n, t in tensors.items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A random Qwen3-Next with an MTP layer, saved in the Hub's layout and dialect."""
    torch.manual_seed(0)
    model = Qwen3NextForCausalLM(Qwen3NextConfig.from_dict(TINY))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    tensors = {n: t.detach().clone() for n, t in model.state_dict().items()}
    return _save(tmp_path_factory.mktemp("qwen3_next_mtp"), tensors, TINY), tensors


@pytest.fixture(scope="module")
def model(checkpoint):
    return from_pretrained(checkpoint[0])


def _ids(T: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (1, T), generator=torch.Generator().manual_seed(seed))


def test_mtp_loads_strictly(checkpoint, model, tmp_path):
    folder, tensors = checkpoint
    assert isinstance(model, Qwen3NextForCausalLM) and hasattr(model, "mtp")
    names = {n for n in tensors if n.startswith("mtp.")}
    assert {"mtp.fc.weight", "mtp.pre_fc_norm_embedding.weight", "mtp.pre_fc_norm_hidden.weight", "mtp.norm.weight",
            "mtp.layers.0.self_attn.q_proj.weight", "mtp.layers.0.mlp.experts.3.down_proj.weight"} <= names
    for n, t in model.state_dict().items():  # bitwise: the same bytes, saved and read back
        assert torch.equal(t, tensors[n]), n
    # the config asks for an MTP layer: its tensors are required
    partial = {n: t for n, t in tensors.items() if n != "mtp.fc.weight"}
    with pytest.raises(ValueError, match=r"missing parameters: mtp\.fc\.weight"):
        from_pretrained(_save(tmp_path / "partial", partial, TINY))
    # a config without one skips them, and cannot draft
    plain = from_pretrained(_save(tmp_path / "plain", tensors, {**TINY, "mtp_num_hidden_layers": 0}))
    assert not hasattr(plain, "mtp")
    with pytest.raises(ValueError, match="no MTP module"):
        plain.generate_speculative(_ids(4, 0), 3)
    with pytest.raises(ValueError, match="mtp_num_hidden_layers"):
        Qwen3NextConfig.from_dict({**TINY, "num_nextn_predict_layers": 2})


def test_draft_is_the_described_composition(model):
    """``head(norm(layer(fc([norm_e(embed(x_(t+1))), norm_h(h_t)]))))`` at positions 0..t."""
    ids = _ids(12, 1)
    with torch.no_grad():
        _, hidden = model(ids, return_hidden=True)
        nxt = torch.cat([ids[:, 1:], ids[:, :1]], dim=1)
        drafted = model.draft(hidden, nxt, model.new_cache())
        mtp = model.mtp
        joined = torch.cat([mtp.pre_fc_norm_embedding(model.model.embed_tokens(nxt)), mtp.pre_fc_norm_hidden(hidden)], -1)
        x = joined @ mtp.fc.weight.T
        x = mtp.layers[0](x, model.model.rotary_emb(0, 12, x), None)
        expected = F.linear(mtp.norm(x), model.lm_head.weight)
    assert max_rel(drafted, expected) <= 1e-5  # the same terms, other calls (BLAS rounds differently)
    # the order of the joined halves matters: swapping them changes the draft
    with torch.no_grad():
        swapped = torch.cat([mtp.pre_fc_norm_hidden(hidden), mtp.pre_fc_norm_embedding(model.model.embed_tokens(nxt))], -1)
        other = F.linear(mtp.norm(mtp.layers[0](mtp.fc(swapped), model.model.rotary_emb(0, 12, x), None)), model.lm_head.weight)
    assert (other - expected).abs().max() > 1e-2


def test_draft_continues_from_its_cache(model):
    ids = _ids(20, 2)
    with torch.no_grad():
        _, hidden = model(ids, return_hidden=True)
        nxt = torch.cat([ids[:, 1:], ids[:, :1]], dim=1)
        whole = model.draft(hidden, nxt, model.new_cache())
        cache = model.new_cache()
        parts = [model.draft(hidden[:, s:e], nxt[:, s:e], cache) for s, e in [(0, 13), (13, 14), (14, 16), (16, 20)]]
    assert max_rel(torch.cat(parts, 1), whole) <= 1e-4


def _count_calls(model, monkeypatch) -> list[int]:
    calls: list[int] = []
    forward = type(model).forward

    def counted(self, input_ids, cache=None, **kw):
        calls.append(input_ids.shape[1])
        return forward(self, input_ids, cache, **kw)

    monkeypatch.setattr(type(model), "forward", counted)
    return calls


def _margin(model, tokens: torch.Tensor, prompt: int) -> float:
    """:func:`top2_margin` of the logits that chose ``tokens[:, prompt:]``."""
    with torch.no_grad():
        return top2_margin(model(tokens)[:, prompt - 1:-1])


def test_speculative_decoding_equals_greedy(model, monkeypatch):
    ids, n = _ids(10, 8), 12  # (prompt 3 gave a near-tie: a top-2 gap of 8e-5 of the largest logit)
    greedy = model.generate(ids, n)
    assert greedy.shape == (1, 10 + n)
    # speculation verifies two tokens per call (other kernels than greedy's one): the same ids
    # are guaranteed only where no greedy step is a near-tie
    assert _margin(model, greedy, 10) >= GREEDY_MARGIN

    spec = model.generate_speculative(ids, n)  # the (random) MTP module's own drafts
    assert torch.equal(spec.tokens, greedy)
    assert 0 <= spec.accepted <= spec.proposed

    truth = greedy[0]

    def drafter(offset: int):
        def draft(hidden, tokens, cache):
            target = cache.seen + 1  # position of the token after the last of ``tokens``
            logits = torch.zeros(1, tokens.shape[1], VOCAB)
            if target < truth.numel():
                logits[0, -1, (int(truth[target]) + offset) % VOCAB] = 1.0
            return logits
        return draft

    calls = _count_calls(model, monkeypatch)
    monkeypatch.setattr(model, "draft", drafter(0))  # always right: every draft accepted
    right = model.generate_speculative(ids, n)
    assert torch.equal(right.tokens, greedy)
    assert right.accepted == right.proposed > 0
    right_calls = list(calls)
    assert len(right_calls) <= 1 + n // 2 + 1  # prefill, then two tokens per call

    calls.clear()
    monkeypatch.setattr(model, "draft", drafter(1))  # always wrong: every draft rolled back
    wrong = model.generate_speculative(ids, n)
    assert torch.equal(wrong.tokens, greedy)
    assert wrong.accepted == 0 and wrong.proposed == n - 1


def test_speculative_decoding_stops_at_eos(model):
    ids = _ids(10, 4)
    greedy = model.generate(ids, 10)
    assert _margin(model, greedy, 10) >= GREEDY_MARGIN  # (see test_speculative_decoding_equals_greedy)
    eos = int(greedy[0, 13])
    plain = model.generate(ids, 10, eos_token_id=eos)
    first = int((plain[0, 10:] == eos).nonzero()[0]) + 11
    spec = model.generate_speculative(ids, 10, eos_token_id=eos)
    assert torch.equal(spec.tokens[0], plain[0, :first])
    with pytest.raises(ValueError, match="input_ids: speculative decoding takes one sequence"):
        model.generate_speculative(torch.cat([ids, ids]), 3)


def test_sampled_generate(model):
    ids = torch.cat([_ids(10, 5), _ids(10, 6)])
    greedy = model.generate(ids, 6)
    # bitwise: the same model calls on the same tensors give the same logits; top-1 keeps their argmax
    assert torch.equal(model.generate(ids, 6, do_sample=True, top_k=1, generator=torch.Generator().manual_seed(0)), greedy)
    runs = [model.generate(ids, 6, do_sample=True, temperature=1.5, generator=torch.Generator().manual_seed(s)) for s in (1, 1, 2)]
    assert torch.equal(runs[0], runs[1])  # a seeded generator reproduces the draw (same calls, same logits)
    assert runs[0].shape == (2, 16) and torch.equal(runs[0][:, :10], ids)
    assert not torch.equal(runs[0], runs[2]) and not torch.equal(runs[0], greedy)  # (fixed seeds: deterministic)


def test_loading_places_every_tensor_in_the_requested_dtype(checkpoint):
    folder, tensors = checkpoint
    model = from_pretrained(folder, dtype=torch.bfloat16)
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        assert t.device.type == "cpu" and t.dtype == torch.bfloat16, name
        torch.testing.assert_close(t.float(), tensors[name].bfloat16().float(), rtol=0, atol=0)  # one rounding, exact
    with pytest.raises(ValueError, match="dtype"):
        from_pretrained(folder, dtype=torch.int32)


def test_bad_arguments_name_themselves(model, checkpoint, tmp_path):
    ids = _ids(5, 7)
    for bad, match in [(ids[0], "input_ids"), (ids.float(), "input_ids"), (ids[:, :0], "input_ids")]:
        with pytest.raises(ValueError, match=match):
            model.generate(bad, 2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(ids, -1)
    with pytest.raises(ValueError, match="temperature"):
        model.generate(ids, 2, do_sample=True, temperature=0.0)
    folder, tensors = checkpoint
    with pytest.raises(ValueError, match="model_type: 'llama'"):
        from_pretrained(_save(tmp_path / "llama", {}, {**TINY, "model_type": "llama"}))
    with pytest.raises(ValueError, match="no model_type"):
        from_pretrained(_save(tmp_path / "untyped", {"x": torch.zeros(1)}, {k: v for k, v in TINY.items() if k != "model_type"}))
