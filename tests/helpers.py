"""Inputs, comparisons and random specs shared by the tests."""
from __future__ import annotations

import random

import linattn
from linattn import gates
from linattn.spec import Spec, term
from linattn.testing import Inputs, random_inputs, rel_err

__all__ = ["Inputs", "rel_err", "assert_close", "make_inputs", "random_spec", "ALL_BUILTIN", "max_rel", "token_ids",
           "top2_margin", "token_drift", "SAME_WEIGHTS_TOL", "assert_same_model", "FP32_PATHS_TOL", "GREEDY_MARGIN", "TINY_MODELS", "tiny_model"]

make_inputs = random_inputs


def max_rel(a, b) -> float:
    """Largest absolute difference relative to the reference's largest magnitude (logits)."""
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


#: fp32 logits of two models holding bitwise-equal weights (e.g. loaded from two folders),
#: relative to the largest logit (:func:`max_rel`). Not zero: the same weights at another
#: memory alignment (safetensors places tensors at 8-byte offsets that depend on the header)
#: take other BLAS code paths, which round differently (1 ulp, amplified through the layers).
SAME_WEIGHTS_TOL = 1e-5


def assert_same_model(model, reference, ids, reference_logits) -> float:
    """``model`` holds ``reference``'s weights bit for bit (the same bytes, read from another
    file) and its fp32 logits on ``ids`` agree to :data:`SAME_WEIGHTS_TOL` (not bitwise: the
    same weights at other addresses may round differently in BLAS). Returns the difference."""
    import torch

    theirs = reference.state_dict()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, theirs[name]), name
    with torch.no_grad():
        rel = max_rel(model(ids), reference_logits)
    assert rel <= SAME_WEIGHTS_TOL, f"same weights, other file: logits differ by {rel:.1e}"
    return rel

#: what the model tests hold two fp32 code paths' logits to (max_rel: relative to the largest
#: logit), e.g. ours vs transformers', prefill + decode vs one forward; they agree to ~1e-6
FP32_PATHS_TOL = 1e-4

#: the smallest top-2 gap (relative to the largest logit, :func:`top2_margin`) a test asserts
#: before comparing greedy token ids from two code paths: paths that agree to FP32_PATHS_TOL
#: cannot pick different tokens where the gap exceeds twice that, so rounding (thread count,
#: alignment, summation order) cannot flip a near-tie on another machine.
GREEDY_MARGIN = 2 * FP32_PATHS_TOL


def top2_margin(logits) -> float:
    """The smallest gap between the largest and the second-largest logit over the positions of
    ``logits`` ``[..., vocab]``, relative to the largest |logit| of them all.

    Two code paths whose logits agree to within ``tol`` (as :func:`max_rel` measures it) make
    the same greedy choice wherever this margin exceeds ``2 * tol``; tests that compare token
    ids from two paths assert it first (a near-tie would flip on another machine)."""
    x = logits.float()
    top = x.topk(2, dim=-1).values
    return ((top[..., 0] - top[..., 1]).min() / x.abs().max()).item()


def token_drift(out, ref):
    """Per position of ``[..., vocab]`` logits: the largest |out - ref| over the vocabulary,
    relative to the largest |ref| of all positions (a flattened float tensor)."""
    d = (out.float() - ref.float()).abs().amax(-1)
    return (d / ref.float().abs().max()).flatten()


def token_ids(B: int, T: int, seed: int, vocab: int, low: int = 0):
    """Random token ids ``[B, T]`` in ``[low, vocab)`` from a seeded generator."""
    import torch

    return torch.randint(low, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def assert_close(name: str, out, ref, tol: float) -> None:
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    e = rel_err(out, ref)
    assert e <= tol, f"{name}: relative error {e:.3e} > {tol:.1e}"


# ----------------------------------------------------------------------------- random specs

_GATES = {
    "scalar": [
        lambda: None,
        lambda: gates.softplus_gate(channel=False),
        lambda: gates.lower_bound_gate(channel=False),
        lambda: gates.mamba_gate(),
        lambda: gates.mamba_gate(limit=True),
        lambda: term("g + g_gamma", g="token", g_gamma="head"),
        lambda: term("g_gamma", g_gamma="head"),
    ],
    "channel": [
        lambda: None,
        lambda: gates.softplus_gate(channel=True),
        lambda: gates.lower_bound_gate(channel=True),
        lambda: term("-exp(A_log) * softplus(a)", a="token_channel", A_log="head"),
        lambda: term("g + g_gamma", g="token_channel", g_gamma="head_channel"),
    ],
}
_BETAS = [
    lambda: False,
    lambda: True,
    lambda: gates.sigmoid_beta(),
    lambda: gates.mamba_dt(),
    lambda: gates.mamba_dt(softplus=False, bias=False),
]


def random_spec(seed: int) -> Spec:
    """A random valid spec (choices that clash, e.g. one operand in two roles, are redrawn)."""
    rng = random.Random(seed)
    while True:
        decay = rng.choice(["none", "scalar", "channel"])
        gate = rng.choice(_GATES[decay])() if decay != "none" else None
        try:
            return Spec(
                decay=decay,
                correction=rng.choice(["none", "delta"]),
                gate=gate,
                beta=rng.choice(_BETAS)(),
                qk_l2norm=rng.random() < 0.4,
                skip=rng.choice(["none", "head", "channel"]),
                output_gate=rng.choice(["none", "silu"]),
                default_scale=rng.choice([None, 1.0, 0.3]),
                name=f"random{seed}",
            )
        except ValueError:
            continue


ALL_BUILTIN = list(linattn.specs.BUILTIN.values())


#: tiny configs of each model family (transformers' dialect), for tests that need no reference
TINY_MODELS = {
    "nemotron_h": dict(
        vocab_size=97, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=96,
        ssm_state_size=16, mamba_num_heads=8, mamba_head_dim=16, n_groups=2, n_routed_experts=4, moe_intermediate_size=32,
        moe_shared_expert_intermediate_size=48, num_experts_per_tok=2, hybrid_override_pattern="M*E-",
    ),
    "qwen3_next": dict(
        vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2,
        linear_num_value_heads=4, moe_intermediate_size=32, shared_expert_intermediate_size=48, num_experts=4,
        num_experts_per_tok=2, full_attention_interval=2, partial_rotary_factor=0.5,
    ),
    "kimi_linear": dict(
        vocab_size=97, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8,
        v_head_dim=16, qk_nope_head_dim=16, num_experts=4, num_experts_per_token=2, linear_head_dim=16,
        linear_num_heads=2, layer_types=["linear_attention", "full_attention"], mlp_layer_types=["dense", "sparse"],
    ),
}


def tiny_model(family: str):
    """A random tiny model of ``family`` (our classes, weights spread so that logits discriminate)."""
    from linattn import models
    import torch

    cls = models.model_class(family)
    torch.manual_seed(0)
    model = cls(cls.config_class.from_dict(TINY_MODELS[family]))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()
