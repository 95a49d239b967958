"""transformers' own Qwen3-Next, Kimi Linear and Nemotron-H models switched onto linattn
(:mod:`linattn.integrations.transformers`), against transformers' pure-torch path."""
from __future__ import annotations

import importlib
import subprocess
import sys
import textwrap

import pytest
import torch

from helpers import GREEDY_MARGIN, max_rel, token_ids, top2_margin
from hf_reference import torch_only

transformers = pytest.importorskip("transformers")
lt = pytest.importorskip("linattn.integrations.transformers")

VOCAB = 97
FAMILIES = {
    "qwen3_next": ("Qwen3NextConfig", "Qwen3NextForCausalLM", dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, linear_key_head_dim=16, linear_value_head_dim=16,
        linear_num_key_heads=2, linear_num_value_heads=4, moe_intermediate_size=32, shared_expert_intermediate_size=48,
        num_experts=4, num_experts_per_tok=2, partial_rotary_factor=0.5,
        layer_types=["linear_attention", "full_attention", "linear_attention"],
    )),
    "kimi_linear": ("KimiLinearConfig", "KimiLinearForCausalLM", dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8,
        v_head_dim=16, qk_nope_head_dim=16, num_experts=4, num_experts_per_token=2, linear_head_dim=16,
        linear_num_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        layer_types=["linear_attention", "full_attention", "linear_attention"], mlp_layer_types=["dense", "sparse", "dense"],
    )),
    "nemotron_h": ("NemotronHConfig", "NemotronHForCausalLM", dict(
        vocab_size=VOCAB, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        intermediate_size=96, ssm_state_size=16, mamba_num_heads=8, mamba_head_dim=16, n_groups=2,
        n_routed_experts=4, moe_intermediate_size=32, moe_shared_expert_intermediate_size=48,
        num_experts_per_tok=2, chunk_size=16, layers_block_type=["mamba", "attention", "mamba", "moe"],
    )),
}
#: every hub name of the three families' decorated functions
HUB_NAMES = sorted([
    "causal_conv1d_fn", "causal_conv1d_update", "chunk_gated_delta_rule", "fused_recurrent_gated_delta_rule",
    "chunk_kda", "fused_recurrent_kda", "mamba_chunk_scan_combined", "mamba_split_conv1d_scan_combined",
    "selective_state_update",
])


@pytest.fixture
def switch():
    """Run the test with the integration off at the start and off again at the end."""
    lt.disable()
    yield
    lt.disable()


def _model(family: str, seed: int = 0):
    """A random transformers model of ``family`` (fp32) on transformers' torch path."""
    config_class, model_class, config = FAMILIES[family]
    cls = getattr(transformers, model_class)
    torch_only(importlib.import_module(cls.__module__))
    torch.manual_seed(seed)
    model = cls(getattr(transformers, config_class)(**config)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def _loss_and_grads(model, labels=None, **batch):
    """A summed next-token loss (so packed and separate runs add up) and its gradients;
    ``labels`` default to the inputs (-100: no loss)."""
    model.zero_grad(set_to_none=True)
    logits = model(**batch, use_cache=False).logits
    keep = (batch["input_ids"] if labels is None else labels)[:, 1:]
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), keep.flatten(), reduction="sum",
                                             ignore_index=-100)
    loss.backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _grad_errors(got: dict, ref: dict) -> dict[str, float]:
    assert got.keys() == ref.keys()
    return {n: ((got[n] - ref[n]).abs().max() / ref[n].abs().max().clamp_min(1e-30)).item() for n in ref}


class _Launches:
    """Counts the generated kernels the compiled ops launch."""

    def __init__(self, monkeypatch):
        from linattn.op import CompiledOp

        self.names: list[str] = []
        launch = CompiledOp._launch

        def counting(gen, mod, names, env, device):
            self.names.extend(names)
            return launch(gen, mod, names, env, device)

        monkeypatch.setattr(CompiledOp, "_launch", staticmethod(counting))

    def backward(self) -> list[str]:
        return [n for n in self.names if "bwd" in n]


def test_enable_switches_every_decorated_function_and_disable_restores_them(switch):
    modules = [importlib.import_module(m) for m in lt.MODULES]
    before = [dict(vars(m)) for m in modules]
    names = lt.enable()
    assert names == HUB_NAMES
    assert lt.enable() == HUB_NAMES  # idempotent
    switched = 0
    for module, old in zip(modules, before):
        for attr, hub in lt._decorated(module.__name__):
            fn = getattr(module, attr)
            assert fn is not old[attr] and fn.linattn_hub_name == hub, (module.__name__, attr)
            switched += 1
    assert switched == 4 + 4 + 5
    lt.disable()
    assert not lt.enabled()
    for module, old in zip(modules, before):
        for attr, _ in lt._decorated(module.__name__):
            assert getattr(module, attr) is old[attr]


def test_import_switches_nothing_and_enable_works_before_the_modeling_modules_load():
    script = textwrap.dedent("""
        import sys
        import linattn.integrations.transformers as lt
        assert not any(m.startswith("transformers.models.qwen3_next") for m in sys.modules)
        assert not lt.enabled()
        names = lt.enable()
        from transformers.models.qwen3_next import modeling_qwen3_next as m
        assert m.torch_chunk_gated_delta_rule.linattn_hub_name == "chunk_gated_delta_rule"
        assert "chunk_gated_delta_rule" in names
        lt.disable()
        assert not hasattr(m.torch_chunk_gated_delta_rule, "linattn_hub_name")
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]


def test_old_transformers_is_refused(switch, monkeypatch):
    # (the module object importing transformers gives: sys.modules may hold another by now)
    monkeypatch.setattr(sys.modules["transformers"], "__version__", "5.22.1")
    with pytest.raises(ImportError, match=r"transformers >= 5\.23, found 5\.22\.1"):
        lt.enable()
    assert not lt.enabled()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_logits_gradients_and_kernels(family, switch, monkeypatch):
    """Logits within 1e-4 and every parameter's gradient within 1e-3 of the torch path, the
    compiled kernels (forward and backward) having run; nothing of linattn after disable().
    Training mode: Nemotron-H's mixer takes mamba_ssm's fused split-conv-scan path."""
    model = _model(family)
    ids = token_ids(2, 40, 1, VOCAB, low=3)
    with torch.no_grad():
        ref = model(ids).logits
    model.train()
    ref_train, ref_grads = _loss_and_grads(model, input_ids=ids)
    launches = _Launches(monkeypatch)
    lt.enable()
    model.eval()
    with torch.no_grad():
        got = model(ids).logits
    print(f"{family}: logits {max_rel(got, ref):.1e} of the largest")
    assert max_rel(got, ref) <= 1e-4
    assert launches.names and not launches.backward()
    model.train()
    got_train, got_grads = _loss_and_grads(model, input_ids=ids)
    assert max_rel(got_train, ref_train) <= 1e-4
    errors = _grad_errors(got_grads, ref_grads)
    worst = max(errors, key=errors.get)
    print(f"{family}: largest gradient error {errors[worst]:.1e} ({worst})")
    assert errors[worst] <= 1e-3, (worst, errors[worst])
    assert launches.backward()
    lt.disable()
    count = len(launches.names)
    model.eval()
    with torch.no_grad():
        again = model(ids).logits
    assert len(launches.names) == count
    assert max_rel(again, ref) <= 1e-5


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_greedy_generation_is_identical(family, switch):
    """Prefill and decode through transformers' own cache (conv states of W columns, the
    Mamba decode step with broadcast dt, A, D and dt_bias)."""
    model = _model(family, seed=2)
    prompt = token_ids(2, 12, 3, VOCAB, low=3)
    options = dict(max_new_tokens=8, do_sample=False, pad_token_id=None, eos_token_id=None)
    with torch.no_grad():
        expected = model.generate(prompt, **options)
        margin = top2_margin(model(expected).logits[:, prompt.shape[1] - 1:-1])
    print(f"{family}: greedy top-2 margin {margin:.1e} of the largest logit")
    assert margin >= GREEDY_MARGIN, margin
    lt.enable()
    with torch.no_grad():
        got = model.generate(prompt, **options)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_packed_batch_equals_separate_runs(family, switch):
    """A batch packed by transformers' DataCollatorWithFlattening (position_ids, cu_seq_lens,
    seq_idx) gives each sequence's logits and the summed gradients of running the sequences
    one by one on the torch path: no recurrence or convolution leaks across a boundary."""
    model = _model(family, seed=4)
    lengths = (6, 17, 3)  # a sequence shorter than the conv width too
    ids = token_ids(1, sum(lengths), 5, VOCAB, low=3)[0]
    pieces = ids.split(lengths)
    collate = transformers.DataCollatorWithFlattening(return_flash_attn_kwargs=True, return_seq_idx=True)
    batch = collate([{"input_ids": p.tolist()} for p in pieces])
    batch.pop("labels")
    model.train()
    ref_logits, ref_grads = [], {}
    for piece in pieces:
        logits, grads = _loss_and_grads(model, input_ids=piece[None])
        ref_logits.append(logits[0])
        for n, g in grads.items():
            ref_grads[n] = ref_grads.get(n, 0) + g
    ref = torch.cat(ref_logits)
    lt.enable()
    # (no cache: transformers' sdpa/eager attention keeps packed sequences apart only without one)
    if family == "nemotron_h":  # inference takes other functions there: conv + chunk scan, not the fused split
        model.eval()
        with torch.no_grad():
            assert max_rel(model(**batch, use_cache=False).logits[0], ref) <= 1e-4
        model.train()
    labels = torch.cat([torch.cat([torch.tensor([-100]), p[1:]]) for p in pieces])[None]
    got, got_grads = _loss_and_grads(model, labels, **batch)
    assert max_rel(got[0], ref) <= 1e-4
    errors = _grad_errors(got_grads, ref_grads)
    worst = max(errors, key=errors.get)
    print(f"{family}: packed, largest gradient error {errors[worst]:.1e} ({worst})")
    assert errors[worst] <= 1e-3, (worst, errors[worst])


@pytest.mark.parametrize("hub", ["chunk_gated_delta_rule", "chunk_kda", "mamba_chunk_scan_combined"])
def test_packed_states_follow_the_cache(hub):
    """With packed sequences and a cache (batch 1), a cached state continues the first
    sequence and the state handed back is the last sequence's, as mamba_ssm does."""
    torch.manual_seed(0)
    lengths, H, K = (5, 9, 4), 2, 16
    T = sum(lengths)
    cu = torch.tensor([0, 5, 14, 18], dtype=torch.int32)
    if hub == "mamba_chunk_scan_combined":
        x, dt, B, C = torch.randn(1, T, H, K), torch.randn(1, T, H), torch.randn(1, T, 1, K), torch.randn(1, T, 1, K)
        A, h0 = -torch.rand(H) - 0.5, torch.randn(1, H, K, K)

        def run(s, e, state, **packed):
            return lt.mamba_chunk_scan(x[:, s:e], dt[:, s:e], A, B[:, s:e], C[:, s:e], 16, dt_softplus=True,
                                       initial_states=state, return_final_states=True, **packed)
    else:
        adapter = lt.ADAPTERS[hub]
        q, k, v = torch.randn(1, T, H, K), torch.randn(1, T, H, K), torch.randn(1, T, H, K)
        g = -torch.rand(1, T, H, K) if hub == "chunk_kda" else -torch.rand(1, T, H)
        beta, h0 = torch.rand(1, T, H), torch.randn(1, H, K, K)

        def run(s, e, state, **packed):
            return adapter(q[:, s:e], k[:, s:e], v[:, s:e], g[:, s:e], beta[:, s:e], initial_state=state,
                           output_final_state=True, use_qk_l2norm_in_kernel=True, **packed)
    o, state = run(0, T, h0, cu_seq_lens_q=cu)
    assert state.shape == h0.shape
    bounds = cu.tolist()
    for i in range(3):
        s, e = bounds[i], bounds[i + 1]
        o_i, state_i = run(s, e, h0 if i == 0 else None)
        torch.testing.assert_close(o[:, s:e], o_i, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(state, state_i, rtol=1e-4, atol=1e-5)


def test_sequence_bounds_from_any_of_transformers_keywords():
    """cu_seqlens, cu_seq_lens_q or seq_idx alone give the same packed convolution; a
    packed batch wider than 1 is refused, naming the argument."""
    torch.manual_seed(0)
    x, w = torch.randn(1, 6, 20), torch.randn(6, 4)
    cu = torch.tensor([0, 3, 11, 20], dtype=torch.int32)
    seq_idx = torch.repeat_interleave(torch.arange(3, dtype=torch.int32), torch.tensor([3, 8, 9]))[None]
    ref = torch.cat([lt.conv_fn(x[:, :, s:e], w, None, "silu") for s, e in ((0, 3), (3, 11), (11, 20))], -1)
    for kw in ({"cu_seqlens": cu}, {"cu_seq_lens_q": cu}, {"seq_idx": seq_idx}):
        torch.testing.assert_close(lt.conv_fn(x, w, None, "silu", **kw), ref, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="cu_seqlens: packed sequences need batch 1, got 2"):
        lt.conv_fn(x.expand(2, -1, -1), w, None, "silu", cu_seq_lens_q=cu)
    with pytest.raises(ValueError, match=r"seq_idx: expected a \[1, 20\] tensor"):
        lt.conv_fn(x, w, None, "silu", seq_idx=seq_idx[:, :5])
