"""Kimi Linear over linattn ops against transformers' implementation (tiny random checkpoints)."""
import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import GREEDY_MARGIN, SAME_WEIGHTS_TOL, max_rel, token_ids, top2_margin
from hf_reference import build_reference, check_bf16_drift, gradient_errors, transformers
from linattn.models.cache import STEP_TOKENS
from linattn.models.kimi_linear import KimiLinearConfig, KimiLinearForCausalLM

LAYER_TYPES = ["linear_attention", "full_attention", "linear_attention", "linear_attention"]
CONFIG = dict(
    vocab_size=97, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8,
    v_head_dim=16, qk_nope_head_dim=16, num_experts=4, num_experts_per_token=2, linear_head_dim=16,
    linear_num_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2, layer_types=LAYER_TYPES,
    mlp_layer_types=["dense", "sparse", "sparse", "sparse"],
)


def _hub_config(hf: dict) -> dict:
    """``hf`` (transformers' config.json) rewritten the way the Hub checkpoints spell it."""
    d = {k: v for k, v in hf.items() if k not in (
        "layer_types", "mlp_layer_types", "linear_head_dim", "linear_num_heads", "linear_conv_kernel_dim", "dtype")}
    d["linear_attn_config"] = {
        "kda_layers": [i + 1 for i, t in enumerate(LAYER_TYPES) if t == "linear_attention"],
        "full_attn_layers": [i + 1 for i, t in enumerate(LAYER_TYPES) if t == "full_attention"],
        "num_heads": hf["linear_num_heads"], "head_dim": hf["linear_head_dim"],
        "short_conv_kernel_size": hf["linear_conv_kernel_dim"],
    }
    d.update(first_k_dense_replace=1, moe_layer_freq=1, mla_use_nope=True, moe_router_activation_func="sigmoid",
             use_grouped_topk=True, torch_dtype="float32", num_nextn_predict_layers=0, rope_theta=10000.0)
    return d


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(transformers model, its save_pretrained folder, the same checkpoint in the Hub dialect)."""
    folder = tmp_path_factory.mktemp("kimi_linear")
    ref = build_reference("KimiLinearConfig", "KimiLinearForCausalLM", folder, **CONFIG)
    hub = tmp_path_factory.mktemp("kimi_linear_hub")
    hf_config = json.loads((folder / "config.json").read_text())
    (hub / "config.json").write_text(json.dumps(_hub_config(hf_config)))
    tensors = load_file(folder / "model.safetensors")
    renamed = {k.replace("model.layers.0.block_sparse_moe.", "model.layers.0.mlp."): v for k, v in tensors.items()}
    assert "model.layers.0.mlp.gate_proj.weight" in renamed
    save_file(renamed, hub / "model.safetensors")
    return ref, folder, hub


@pytest.fixture(scope="module")
def model(checkpoint):
    return KimiLinearForCausalLM.from_pretrained(checkpoint[1])


@pytest.fixture(scope="module")
def full(model):
    """Token ids [2, 70] (two chunks of 64 and more) and our fp32 logits for them."""
    ids = token_ids(2, 70, 0, CONFIG["vocab_size"], low=3)
    with torch.no_grad():
        return ids, model(ids)


def test_logits_match_transformers(checkpoint, full):
    ids, got = full
    with torch.no_grad():
        expected = checkpoint[0](ids).logits
    assert got.shape == (2, 70, CONFIG["vocab_size"])
    for T in (40, 70):  # within the first chunk, and across the chunk boundary
        rel = max_rel(got[:, :T], expected[:, :T])
        assert rel <= 1e-4, (T, rel)


def test_greedy_generate_matches_transformers(checkpoint, model):
    ref = checkpoint[0]
    ids = token_ids(2, 12, 1, CONFIG["vocab_size"], low=3)
    with torch.no_grad():
        expected = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, min_new_tokens=8,
                                do_sample=False, eos_token_id=None, pad_token_id=None)
    assert expected.shape == (2, 20)
    # ids from two implementations agree only where no step is a near-tie: assert the margin
    with torch.no_grad():
        margin = top2_margin(ref(expected).logits[:, 11:-1])
    print(f"greedy top-2 margin {margin:.1e} of the largest logit")
    assert margin >= GREEDY_MARGIN, margin
    got = model.generate(ids, 8)
    assert torch.equal(got, expected)


def test_prefill_then_decode_matches_full_forward(model, full):
    ids, expected = full
    P, steps = 40, 3
    assert ids.shape[1] - P - steps > STEP_TOKENS
    with torch.no_grad():
        cache = model.new_cache()
        parts = [model(ids[:, :P], cache)]
        for t in range(P, P + steps):
            parts.append(model(ids[:, t:t + 1], cache))
        parts.append(model(ids[:, P + steps:], cache))  # a chunked continuation on a warm cache
    assert cache.seen == ids.shape[1]
    rel = max_rel(torch.cat(parts, 1), expected)
    assert rel <= 1e-4, rel


def test_hub_dialect_loads_the_same_model(checkpoint, model):
    ref, folder, hub = checkpoint
    hf = KimiLinearConfig.from_dict(json.loads((folder / "config.json").read_text()))
    hb = KimiLinearConfig.from_dict(json.loads((hub / "config.json").read_text()))
    assert hf == hb
    assert hb.layer_types == LAYER_TYPES and hb.mlp_layer_types == CONFIG["mlp_layer_types"]
    other = KimiLinearForCausalLM.from_pretrained(hub)
    for name, tensor in model.state_dict().items():  # bitwise: the same bytes, read from two files
        assert torch.equal(tensor, other.state_dict()[name]), name
    ids = token_ids(1, 8, 3, CONFIG["vocab_size"], low=3)
    with torch.no_grad():
        # the same weights at other addresses may round differently in BLAS: not bitwise
        ours_rel = max_rel(other(ids), model(ids))
        # transformers reads the Hub form too, with the same weights
        hub_ref = transformers.KimiLinearForCausalLM.from_pretrained(hub).eval()
        ref_rel = max_rel(hub_ref(ids).logits, ref(ids).logits)
    print(f"same weights, two dialects: ours {ours_rel:.1e}, transformers {ref_rel:.1e}")
    assert ours_rel <= SAME_WEIGHTS_TOL and ref_rel <= SAME_WEIGHTS_TOL, (ours_rel, ref_rel)


def test_config_aliases_and_validation(checkpoint):
    base = json.loads((checkpoint[1] / "config.json").read_text())
    cfg = KimiLinearConfig.from_dict(base)
    assert (cfg.num_experts, cfg.num_experts_per_token, cfg.linear_head_dim) == (4, 2, 16)
    assert cfg.dtype == torch.float32
    # transformers' attribute spellings
    alias = {k: v for k, v in base.items() if k not in ("num_experts", "num_experts_per_token", "num_expert_group")}
    alias.update(num_local_experts=4, num_experts_per_tok=2, n_group=1)
    assert KimiLinearConfig.from_dict(alias) == cfg
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        KimiLinearConfig.from_dict({**base, "num_experts_per_tok": 3})
    hub = _hub_config(base)
    for lists in ({"kda_layers": [1, 3], "full_attn_layers": [2]},        # layer 4 uncovered
                  {"kda_layers": [1, 2, 3, 4], "full_attn_layers": [2]},  # layer 2 twice
                  {"kda_layers": [0, 1, 3], "full_attn_layers": [2]}):     # not 1-indexed
        with pytest.raises(ValueError, match="linear_attn_config"):
            KimiLinearConfig.from_dict({**hub, "linear_attn_config": {**hub["linear_attn_config"], **lists}})
    with pytest.raises(ValueError, match="layer_types"):
        KimiLinearConfig.from_dict({**hub, "layer_types": list(reversed(LAYER_TYPES))})
    with pytest.raises(ValueError, match="linear_head_dim"):
        KimiLinearConfig.from_dict({**hub, "linear_head_dim": 32})
    with pytest.raises(ValueError, match="mla_use_nope"):
        KimiLinearConfig.from_dict({**hub, "mla_use_nope": False})
    with pytest.raises(ValueError, match="mlp_layer_types"):
        KimiLinearConfig.from_dict({**base, "mlp_layer_types": ["dense", "moe", "sparse", "sparse"]})
    with pytest.raises(ValueError, match="moe_router_activation_func"):
        KimiLinearConfig.from_dict({**hub, "moe_router_activation_func": "relu"})
    with pytest.raises(ValueError, match="topk_group"):
        KimiLinearConfig.from_dict({**base, "topk_group": 2})
    # the Hub's layer pattern: dense below first_k_dense_replace, then every moe_layer_freq-th layer sparse
    mixed = KimiLinearConfig.from_dict({**hub, "first_k_dense_replace": 2, "moe_layer_freq": 1})
    assert mixed.mlp_layer_types == ["dense", "dense", "sparse", "sparse"]


def test_unknown_and_missing_tensors_are_named(checkpoint, tmp_path):
    folder = checkpoint[1]
    shutil.copy(folder / "config.json", tmp_path / "config.json")
    tensors = load_file(folder / "model.safetensors")
    extra = dict(tensors, **{"model.layers.1.self_attn.q_norm.weight": torch.ones(24)})
    save_file(extra, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.q_norm\.weight"):
        KimiLinearForCausalLM.from_pretrained(tmp_path)
    missing = {k: v for k, v in tensors.items() if k != "model.layers.2.self_attn.q_conv1d.weight"}
    save_file(missing, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"model\.layers\.2\.self_attn\.q_conv1d\.weight"):
        KimiLinearForCausalLM.from_pretrained(tmp_path)


def test_bf16_close_to_fp32(tmp_path):
    # At the other tests' spread (0.1) this tiny random model is chaotic in bf16: transformers' own bf16
    # logits land 0.3-0.5 (relative to max) from its fp32 ones as expert choices flip. A checkpoint
    # closer to transformers' initialisation drifts less (0.6-0.8% per token, median), so the bound,
    # relative to transformers' own drift on this machine, is tighter.
    ref = build_reference("KimiLinearConfig", "KimiLinearForCausalLM", tmp_path, spread=0.02, **CONFIG)
    half = KimiLinearForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert half.model.embed_tokens.weight.dtype == torch.bfloat16
    # the router and the decay bias keep fp32
    assert half.model.layers[1].block_sparse_moe.gate.weight.dtype == torch.float32
    assert half.model.layers[0].self_attn.dt_bias.dtype == torch.float32
    ids = token_ids(2, 40, 4, CONFIG["vocab_size"], low=3)
    with torch.no_grad():
        got = half(ids)
    assert got.dtype == torch.bfloat16
    check_bf16_drift(got, ref, tmp_path, ids)


def test_variants_match_transformers(tmp_path):
    """q LoRA, attention biases, tied embeddings and group-limited routing, in one small model."""
    config = dict(CONFIG, num_hidden_layers=2, layer_types=["full_attention", "linear_attention"],
                  mlp_layer_types=["sparse", "sparse"], q_lora_rank=12, attention_bias=True,
                  tie_word_embeddings=True, num_experts=8, num_expert_group=4, topk_group=2,
                  num_experts_per_token=3, num_shared_experts=2)
    ref = build_reference("KimiLinearConfig", "KimiLinearForCausalLM", tmp_path, **config)
    ours = KimiLinearForCausalLM.from_pretrained(tmp_path)
    assert ours.model.layers[1].block_sparse_moe.gate.topk_group < ours.model.layers[1].block_sparse_moe.gate.n_group
    ids = token_ids(1, 24, 5, CONFIG["vocab_size"], low=3)
    with torch.no_grad():
        expected = ref(ids).logits
        rel = max_rel(ours(ids), expected)
    assert rel <= 1e-4, rel
    # transformers keeps this model's head separate even when tied; a checkpoint without one ties it
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["model.embed_tokens.weight"] = tensors.pop("lm_head.weight")
    save_file(tensors, tmp_path / "model.safetensors")
    tied = KimiLinearForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(tied.lm_head.weight, tied.model.embed_tokens.weight)  # one tensor read for both


def test_gradients_match_transformers(checkpoint, model):
    """Training through the model: a next-token loss's parameter gradients equal transformers'."""
    ref, folder, _ = checkpoint
    ours = type(model).from_pretrained(folder)
    # transformers keeps the forget gate's parameters in a submodule in memory
    gate = re.compile(r"self_attn\.(A_log|dt_bias|f_a_proj\.weight|f_b_proj\.weight)$")
    errors = gradient_errors(ours, ref, token_ids(2, 30, 7, CONFIG["vocab_size"]),
                             lambda n: gate.sub(r"self_attn.forget_gate.\1", n))
    assert len(errors) >= 10 and any(".A_log" in n for n in errors)
    worst = max(errors, key=errors.get)
    print(f"{len(errors)} parameters; worst gradient rel err {errors[worst]:.2e} ({worst})")
    assert errors[worst] <= 1e-3, worst
