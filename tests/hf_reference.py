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
