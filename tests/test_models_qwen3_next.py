"""Qwen3-Next over linattn ops against transformers' implementation (tiny random checkpoints)."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from helpers import GREEDY_MARGIN, assert_same_model, max_rel, token_ids, top2_margin
from hf_reference import build_reference, check_bf16_drift, gradient_errors
from linattn.models.cache import STEP_TOKENS
from linattn.models.qwen3_next import Qwen3NextConfig, Qwen3NextForCausalLM

VOCAB = 97
TINY = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
    moe_intermediate_size=32, shared_expert_intermediate_size=48, num_experts=4, num_experts_per_tok=2,
    layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention"],
    mlp_only_layers=[2], partial_rotary_factor=0.5,
)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen3_next")
    ref = build_reference("Qwen3NextConfig", "Qwen3NextForCausalLM", folder, **TINY)
    ours = Qwen3NextForCausalLM.from_pretrained(folder)
    ids = token_ids(2, 40, 1, VOCAB)
    with torch.no_grad():
        logits, hidden = ours(ids, return_hidden=True)
    return folder, ref, ours, ids, logits, hidden


def test_logits_match_transformers(setup):
    folder, ref, ours, ids, logits, hidden = setup
    with torch.no_grad():
        out = ref(ids)
        ref_hidden = ref.model(ids).last_hidden_state
    assert logits.shape == (2, 40, VOCAB)
    err = max_rel(logits, out.logits)
    print(f"fp32 T=40 rel err {err:.2e}")
    assert err <= 1e-4
    assert max_rel(hidden, ref_hidden) <= 1e-4


def test_logits_across_a_chunk_boundary(setup):
    folder, ref, ours, *_ = setup
    ids = token_ids(1, 70, 2, VOCAB)
    with torch.no_grad():
        err = max_rel(ours(ids), ref(ids).logits)
    print(f"fp32 T=70 rel err {err:.2e}")
    assert err <= 1e-4


def test_greedy_generate_matches_transformers(setup):
    folder, ref, ours, ids, *_ = setup
    prompt = ids[:, :12]
    with torch.no_grad():
        expected = ref.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=None, eos_token_id=None)
    assert expected.shape == (2, 20)
    # ids from two implementations agree only where no step is a near-tie: assert the margin
    with torch.no_grad():
        margin = top2_margin(ref(expected).logits[:, 11:-1])
    print(f"greedy top-2 margin {margin:.1e} of the largest logit")
    assert margin >= GREEDY_MARGIN, margin
    got = ours.generate(prompt, 8)
    assert torch.equal(got, expected)


def test_prefill_then_decode_equals_full_forward(setup):
    folder, ref, ours, ids, logits, _ = setup
    P = 30
    cache = ours.new_cache()
    with torch.no_grad():
        parts = [ours(ids[:, :P], cache)]
        for t in range(P, ids.shape[1]):
            parts.append(ours(ids[:, t:t + 1], cache))
    assert cache.seen == ids.shape[1]
    assert max_rel(torch.cat(parts, 1), logits) <= 1e-4

    # a continuation longer than STEP_TOKENS on a warm cache goes through the chunk kernels
    longer = torch.cat([ids, token_ids(2, STEP_TOKENS + 4, 3, VOCAB)], 1)
    with torch.no_grad():
        full = ours(longer)
        cont = ours(longer[:, ids.shape[1]:], cache)
    assert max_rel(cont, full[:, ids.shape[1]:]) <= 1e-4


def _hub_config(folder) -> dict:
    cfg = json.loads((folder / "config.json").read_text())
    rope = cfg.pop("rope_parameters")
    del cfg["layer_types"], cfg["dtype"]
    cfg.update(full_attention_interval=2, rope_theta=rope["rope_theta"], rope_scaling=None,
               partial_rotary_factor=rope["partial_rotary_factor"], torch_dtype="float32",
               use_sliding_window=False, max_window_layers=4, architectures=["Qwen3NextForCausalLM"])
    return cfg


def test_hub_config_dialect_gives_the_same_model(setup, tmp_path):
    folder, ref, ours, ids, logits, _ = setup
    shutil.copy(folder / "model.safetensors", tmp_path / "model.safetensors")
    hub = _hub_config(folder)
    (tmp_path / "config.json").write_text(json.dumps(hub))
    assert Qwen3NextConfig.from_dict(hub) == ours.config
    assert ours.config.partial_rotary_factor == 0.5 and ours.config.rotary_dim == 8
    model = Qwen3NextForCausalLM.from_pretrained(tmp_path)
    print(f"same weights, two dialects: {assert_same_model(model, ours, ids, logits):.1e}")


def test_config_errors(setup):
    folder, *_ = setup
    base = json.loads((folder / "config.json").read_text())
    hub = _hub_config(folder)
    with pytest.raises(ValueError, match="rope_theta"):
        Qwen3NextConfig.from_dict({**base, "rope_theta": 123.0})
    with pytest.raises(ValueError, match="rope_scaling"):
        Qwen3NextConfig.from_dict({**hub, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(ValueError, match="rope_parameters"):
        Qwen3NextConfig.from_dict({**base, "rope_parameters": {"rope_type": "linear", "factor": 2.0}})
    with pytest.raises(ValueError, match="layer_types"):
        Qwen3NextConfig.from_dict({**base, "full_attention_interval": 4})
    with pytest.raises(ValueError, match="layer_types"):
        Qwen3NextConfig.from_dict({**base, "layer_types": ["linear_attention"] * 3})
    with pytest.raises(ValueError, match="linear_num_key_heads"):
        Qwen3NextConfig.from_dict({**base, "linear_num_key_heads": 3})
    with pytest.raises(ValueError, match="dtype"):
        Qwen3NextConfig.from_dict({**base, "dtype": "int8"})
    assert Qwen3NextConfig.from_dict({**hub, "torch_dtype": "bfloat16"}).dtype == torch.bfloat16
    # without either spelling every 4th layer is full attention
    defaults = Qwen3NextConfig.from_dict({k: v for k, v in hub.items() if k != "full_attention_interval"})
    assert defaults.layer_types == ["linear_attention"] * 3 + ["full_attention"]


def test_strict_loading_and_mtp_tensors(setup, tmp_path):
    folder, ref, ours, *_ = setup
    shutil.copy(folder / "config.json", tmp_path / "config.json")
    tensors = load_file(str(folder / "model.safetensors"))

    def write(t):
        save_file(t, str(tmp_path / "model.safetensors"))

    write({**tensors, "model.layers.0.linear_attn.extra": torch.zeros(2)})
    with pytest.raises(ValueError, match=r"unknown checkpoint tensors: model\.layers\.0\.linear_attn\.extra"):
        Qwen3NextForCausalLM.from_pretrained(tmp_path)
    write({n: t for n, t in tensors.items() if n != "model.layers.1.self_attn.q_norm.weight"})
    with pytest.raises(ValueError, match=r"missing parameters: model\.layers\.1\.self_attn\.q_norm\.weight"):
        Qwen3NextForCausalLM.from_pretrained(tmp_path)

    # the multi-token-prediction tensors are skipped by a model without an mtp module ...
    mtp = {"mtp.fc.weight": torch.randn(64, 128), "mtp.norm.weight": torch.randn(64)}
    write({**tensors, **mtp})
    model = Qwen3NextForCausalLM.from_pretrained(tmp_path)
    for n, t in model.state_dict().items():  # bitwise: the same bytes, read from two files
        assert torch.equal(t, ours.state_dict()[n])

    # ... and land on one that has it
    class WithMTP(Qwen3NextForCausalLM):
        def __init__(self, config):
            super().__init__(config)
            self.mtp = nn.Module()
            self.mtp.fc = nn.Linear(128, 64, bias=False)
            self.mtp.norm = nn.Module()
            self.mtp.norm.weight = nn.Parameter(torch.zeros(64))

    model = WithMTP.from_pretrained(tmp_path)
    assert torch.equal(model.mtp.fc.weight, mtp["mtp.fc.weight"])
    assert torch.equal(model.mtp.norm.weight, mtp["mtp.norm.weight"])


def test_bad_input_ids(setup):
    ours = setup[2]
    with pytest.raises(ValueError, match="input_ids"):
        ours(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="input_ids"):
        ours(torch.zeros(4, dtype=torch.long))


def test_bf16_smoke(setup):
    """bf16 logits stay as close to fp32 as transformers' own bf16 logits do.

    The tiny random model amplifies rounding (transformers' bf16 run differs from its fp32
    one by tens of percent of the largest logit at some tokens, through flipped expert
    choices), so the bound is relative to transformers' drift, measured here.
    """
    folder, ref, ours, ids, logits, _ = setup
    model = Qwen3NextForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    assert model.lm_head.weight.dtype == torch.bfloat16
    with torch.no_grad():
        out = model(ids)
    check_bf16_drift(out, ref, folder, ids, fp32=logits)


def test_gradients_match_transformers(setup):
    """Training through the model: a next-token loss's parameter gradients equal transformers'."""
    folder, ref, ours_loaded, *_ = setup
    ours = type(ours_loaded).from_pretrained(folder)
    errors = gradient_errors(ours, ref, token_ids(2, 30, 7, VOCAB))
    assert len(errors) >= 10 and any(".A_log" in n for n in errors)
    worst = max(errors, key=errors.get)
    print(f"{len(errors)} parameters; worst gradient rel err {errors[worst]:.2e} ({worst})")
    assert errors[worst] <= 1e-3, worst
