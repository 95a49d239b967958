"""Inputs, comparisons and random specs shared by the tests."""
from __future__ import annotations

import random

import linattn
from linattn import gates
from linattn.spec import Spec, term
from linattn.testing import Inputs, random_inputs, rel_err

__all__ = ["Inputs", "rel_err", "assert_close", "make_inputs", "random_spec", "ALL_BUILTIN", "max_rel", "token_ids"]

make_inputs = random_inputs


def max_rel(a, b) -> float:
    """Largest absolute difference relative to the reference's largest magnitude (logits)."""
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


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
