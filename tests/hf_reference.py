"""Tiny random transformers models as references for :mod:`models` (needs the test extra).

transformers binds fla / mamba_ssm / causal_conv1d kernels when those packages import;
fla is installed here (as a baseline) but its Triton kernels cannot run on the CPU, so
:func:`torch_only` points a modeling module back at its own pure-torch functions.
"""
from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import pytest
import torch

from helpers import token_drift

transformers = pytest.importorskip("transformers")


def torch_only(module) -> None:
    """Replace every kernel-dispatching function of ``module`` by the torch function it wraps."""
    for name, fn in list(vars(module).items()):
        if inspect.isfunction(fn) and fn.__module__ == module.__name__ and getattr(fn, "__wrapped__", None) is not None:
            setattr(module, name, inspect.unwrap(fn))


def build_reference(config_class: str, model_class: str, folder: Path, seed: int = 0, spread: float = 0.1, **config):
    """A random ``transformers.<model_class>`` from ``<config_class>(**config)``, saved to ``folder``.

    Returns the model (fp32, eval mode, torch-only kernels). Every parameter gets noise of
    std ``spread`` on top of transformers' initialisation (std 0.02, and ones/zeros for
    norms and biases), so that a wrong term moves the logits well above rounding.
    """
    cfg = getattr(transformers, config_class)(**config)
    cls = getattr(transformers, model_class)
    torch_only(importlib.import_module(cls.__module__))
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * spread)
    model.save_pretrained(folder)
    return model


def gradient_errors(
    ours: torch.nn.Module, ref: torch.nn.Module, ids: torch.Tensor, their_name=lambda name: name
) -> dict[str, float]:
    """Relative errors (max |diff| / max |ref|) of the gradients of a next-token loss, for
    every parameter both models hold (``their_name`` maps our name to transformers' in-memory
    one) with as many elements (transformers keeps its experts fused in memory, so those are
    left to the logits tests)."""
    losses = []
    for model in (ours, ref):
        model.zero_grad(set_to_none=True)
        out = model(ids)
        logits = out if isinstance(out, torch.Tensor) else out.logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    theirs = dict(ref.named_parameters())
    errors = {}
    for name, p in ours.named_parameters():
        q = theirs.get(their_name(name))
        if q is None or q.numel() != p.numel() or q.grad is None:
            continue
        assert p.grad is not None, f"{name}: no gradient"
        d = p.grad.reshape(q.shape) - q.grad
        errors[name] = (d.abs().max() / q.grad.abs().max().clamp_min(1e-30)).item()
    return errors


#: bf16 drift bounds against transformers' own drift (see :func:`check_bf16_drift`)
BF16_MEDIAN_FACTOR = 1.5
BF16_MAX_FACTOR, BF16_MAX_FLOOR = 2.0, 0.5


def check_bf16_drift(ours: torch.Tensor, ref: torch.nn.Module, folder: Path, ids: torch.Tensor,
                     fp32: torch.Tensor | None = None) -> dict[str, float]:
    """Assert that our bf16 logits ``ours`` (for ``ids``) drift from the fp32 logits no more
    than transformers' own bf16 model does, measured here on the same weights and inputs.

    ``ref`` is the fp32 transformers model saved in ``folder``; its bf16 twin is loaded the
    way transformers loads bf16 (``from_pretrained(dtype=bfloat16)``, which keeps the
    modules the model lists in fp32). ``fp32``: the fp32 logits (default: ``ref``'s).

    bf16 rounding depends on the machine (CPU bf16 instructions or none, BLAS kernels), and
    in these tiny random models a rounding that flips an expert choice moves that token's
    logits by tens of percent of the largest logit, so a fixed bound on the largest drift
    fails on some machines and not others. Per token (:func:`token_drift`):
    the median drift, which flips at a few tokens do not move but a systematic loss of
    precision does, is held to 1.5x transformers' median; the largest drift, only to
    2x transformers' largest (at least 0.5): garbage at some positions still fails.
    """
    with torch.no_grad():
        if fp32 is None:
            fp32 = ref(ids).logits
        half = type(ref).from_pretrained(folder, dtype=torch.bfloat16).eval()
        theirs = half(ids).logits
    assert half.dtype == torch.bfloat16  # (Nemotron-H's logits come back in fp32, ours as theirs)
    d_ours, d_ref = token_drift(ours, fp32), token_drift(theirs, fp32)
    stats = {"median": d_ours.median().item(), "ref_median": d_ref.median().item(),
             "max": d_ours.max().item(), "ref_max": d_ref.max().item()}
    print("bf16 drift from fp32 per token (relative to the largest logit): median {median:.2e} "
          "(transformers {ref_median:.2e}), largest {max:.2e} (transformers {ref_max:.2e})".format(**stats))
    assert stats["median"] <= BF16_MEDIAN_FACTOR * stats["ref_median"], stats
    assert stats["max"] <= max(BF16_MAX_FACTOR * stats["ref_max"], BF16_MAX_FLOOR), stats
    return stats
