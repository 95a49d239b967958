"""Nemotron-H over linattn ops against transformers' implementation (tiny random checkpoints)."""
from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import GREEDY_MARGIN, assert_same_model, max_rel, token_ids, top2_margin
from hf_reference import build_reference, check_bf16_drift, gradient_errors
from linattn.models.cache import STEP_TOKENS
from linattn.models.nemotron_h import NemotronHConfig, NemotronHForCausalLM

VOCAB = 97
LAYERS = ["mamba", "moe", "attention", "linear_attention", "mlp", "full_attention"]
TINY = dict(
    vocab_size=VOCAB, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    intermediate_size=96, ssm_state_size=16, mamba_num_heads=8, mamba_head_dim=16, n_groups=2,
    n_routed_experts=4, moe_intermediate_size=32, moe_shared_expert_intermediate_size=48,
    num_experts_per_tok=2, routed_scaling_factor=2.5, chunk_size=16, layers_block_type=LAYERS,
)
PATTERN = "ME*M-*"


def _reference(folder, **config):
    """A saved random reference whose routers' correction biases are non-zero too."""
    ref = build_reference("NemotronHConfig", "NemotronHForCausalLM", folder, **config)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, buf in ref.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(torch.randn(buf.shape, generator=g) * 0.2)
    ref.save_pretrained(folder)
    return ref


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("nemotron_h")
    ref = _reference(folder, **TINY)
    ours = NemotronHForCausalLM.from_pretrained(folder)
    ids = token_ids(2, 40, 1, VOCAB)
    with torch.no_grad():
        logits = ours(ids)
    return folder, ref, ours, ids, logits


def test_logits_match_transformers(setup):
    folder, ref, ours, ids, logits = setup
    assert ours.config.layer_types == ("mamba", "moe", "attention", "mamba", "mlp", "attention")
    with torch.no_grad():
        expected = ref(ids).logits
    assert logits.shape == (2, 40, VOCAB)
    err = max_rel(logits, expected)
    print(f"fp32 T=40 rel err {err:.2e}")
    assert err <= 1e-4


def test_logits_across_a_chunk_boundary(setup):
    folder, ref, ours, *_ = setup
    ids = token_ids(1, 70, 2, VOCAB)
    with torch.no_grad():
        err = max_rel(ours(ids), ref(ids).logits)
    print(f"fp32 T=70 rel err {err:.2e}")
    assert err <= 1e-4


def test_greedy_generate_matches_transformers(setup):
    folder, ref, ours, ids, _ = setup
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
    folder, ref, ours, _, _ = setup
    ids = token_ids(2, 46, 3, VOCAB)
    with torch.no_grad():
        full = ours(ids)
        cache = ours.new_cache()
        parts = [ours(ids[:, :20], cache)]
        for t in range(20, 23):  # one token at a time: the step kernels
            parts.append(ours(ids[:, t:t + 1], cache))
        parts.append(ours(ids[:, 23:27], cache))  # a few tokens at once, still stepped
        long = ids[:, 27:]  # longer than STEP_TOKENS: chunk kernels from the cached state
        assert long.shape[1] > STEP_TOKENS
        parts.append(ours(long, cache))
    assert cache.seen == 46
    err = max_rel(torch.cat(parts, 1), full)
    print(f"prefill+decode vs full rel err {err:.2e}")
    assert err <= 1e-4


def _hub_dialect(src, dst):
    """A copy of ``src`` whose config.json uses the Hub's pattern string and older key names."""
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    del config["layers_block_type"]
    config["hybrid_override_pattern"] = PATTERN
    config["num_hidden_layers"] = len(PATTERN)
    for old, new in (("mamba_n_groups", "n_groups"), ("mamba_d_conv", "conv_kernel"),
                     ("mamba_conv_bias", "use_conv_bias"), ("mamba_chunk_size", "chunk_size"), ("mamba_dt_min", "time_step_min"),
                     ("num_local_experts", "n_routed_experts")):
        config[old] = config.pop(new)
    del config["time_step_limit"]
    config["mamba_dt_limit"] = [0.0, math.inf]  # json writes the bare Infinity of the Hub configs
    config["torch_dtype"] = config.pop("dtype")
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_hub_dialect_gives_the_same_model(setup, tmp_path):
    folder, ref, ours, ids, logits = setup
    hub = _hub_dialect(folder, tmp_path / "hub")
    assert "Infinity" in (hub / "config.json").read_text()
    other = NemotronHForCausalLM.from_pretrained(hub)
    assert other.config == ours.config
    print(f"same weights, two dialects: {assert_same_model(other, ours, ids, logits):.1e}")


def test_config_spellings_and_errors(setup):
    folder, *_ = setup
    base = json.loads((folder / "config.json").read_text())
    config = NemotronHConfig.from_dict(base)
    assert config.time_step_limit == (0.0, math.inf) and config.dt_limit == (0.001, math.inf)
    assert config.dtype == torch.float32 and config.n_routed_experts == 4 and config.routed_scaling_factor == 2.5
    spelled = ["linear_attention", "moe", "full_attention", "mamba", "mlp", "attention"]
    assert NemotronHConfig.from_dict({**base, "layers_block_type": None, "layer_types": spelled}) == config
    assert NemotronHConfig.from_dict({**base, "hybrid_override_pattern": PATTERN}) == config
    assert NemotronHConfig.from_dict({**base, "dtype": "bfloat16"}).dtype == torch.bfloat16
    bad = {
        "num_hidden_layers": {"num_hidden_layers": 5},
        "hybrid_override_pattern": {"hybrid_override_pattern": "ME*M-E"},
        "layers_block_type": {"layers_block_type": ["mamba", "conv"]},
        "mamba_n_groups": {"mamba_n_groups": 4},
        "n_groups": {"n_groups": 3},
        "num_key_value_heads": {"num_key_value_heads": 3},
        "topk_group": {"topk_group": 2},
        "time_step_limit": {"time_step_limit": [1.0, 0.5]},
        "dtype": {"dtype": "int8"},
    }
    for field, change in bad.items():
        with pytest.raises(ValueError, match=field):
            NemotronHConfig.from_dict({**base, **change})
    with pytest.raises(ValueError, match="layers_block_type"):
        NemotronHConfig.from_dict({k: v for k, v in base.items() if k != "layers_block_type"})


def test_unknown_missing_and_mtp_tensors(setup, tmp_path):
    folder, ref, ours, ids, logits = setup
    tensors = load_file(str(folder / "model.safetensors"))

    def folder_with(name, state):
        dst = tmp_path / name
        dst.mkdir()
        shutil.copy(folder / "config.json", dst / "config.json")
        save_file(state, str(dst / "model.safetensors"))
        return dst

    extra = folder_with("extra", {**tensors, "backbone.layers.0.mixer.bogus": torch.zeros(3)})
    with pytest.raises(ValueError, match=r"unknown.*backbone\.layers\.0\.mixer\.bogus"):
        NemotronHForCausalLM.from_pretrained(extra)
    short = {k: v for k, v in tensors.items() if k != "backbone.layers.1.mixer.gate.e_score_correction_bias"}
    with pytest.raises(ValueError, match=r"missing.*backbone\.layers\.1\.mixer\.gate\.e_score_correction_bias"):
        NemotronHForCausalLM.from_pretrained(folder_with("short", short))
    mtp = folder_with("mtp", {**tensors, "mtp.layers.0.norm.weight": torch.ones(64),
                              "mtp.layers.0.mixer.experts.0.up_proj.weight": torch.ones(32, 64)})
    loaded = NemotronHForCausalLM.from_pretrained(mtp)
    for name, t in ours.state_dict().items():  # bitwise: the same bytes, read from two files
        assert torch.equal(loaded.state_dict()[name], t), name


def test_latent_moe_and_group_limited_routing(tmp_path):
    config = {**TINY, "layers_block_type": ["moe", "attention", "moe"], "moe_latent_size": 24, "n_group": 2,
              "topk_group": 1, "norm_topk_prob": False, "routed_scaling_factor": 1.5}
    ref = _reference(tmp_path, **config)
    ours = NemotronHForCausalLM.from_pretrained(tmp_path)
    assert ours.config.moe_latent_size == 24
    ids = token_ids(2, 24, 4, VOCAB)
    with torch.no_grad():
        err = max_rel(ours(ids), ref(ids).logits)
    print(f"latent MoE, group routing rel err {err:.2e}")
    assert err <= 1e-4


def test_bf16_smoke(setup):
    folder, ref, ours, ids, logits = setup
    half = NemotronHForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    assert half.lm_head.weight.dtype == torch.bfloat16
    router = half.backbone.layers[1].mixer.gate
    assert router.weight.dtype == torch.float32 and router.e_score_correction_bias.dtype == torch.float32
    with torch.no_grad():
        out = half(ids)
    check_bf16_drift(out, ref, folder, ids, fp32=logits)


def test_gradients_match_transformers(setup):
    """Training through the model: a next-token loss's parameter gradients equal transformers'."""
    folder, ref, ours_loaded, *_ = setup
    ours = type(ours_loaded).from_pretrained(folder)
    errors = gradient_errors(ours, ref, token_ids(2, 30, 7, VOCAB), lambda n: n.replace("backbone.", "model.", 1))
    assert len(errors) >= 10 and any(".A_log" in n for n in errors)
    worst = max(errors, key=errors.get)
    print(f"{len(errors)} parameters; worst gradient rel err {errors[worst]:.2e} ({worst})")
    assert errors[worst] <= 1e-3, worst
