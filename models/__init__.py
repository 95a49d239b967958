"""Nemotron-H, Qwen3-Next and Kimi Linear assembled from linattn ops.

``models.from_pretrained(folder)`` reads a Hugging Face checkpoint folder (``config.json``
and safetensors with the official parameter names) and returns the matching model; each
family's class has its own ``from_pretrained`` too. Loading does not need transformers.
"""
from __future__ import annotations

import importlib
from pathlib import Path

import torch

from .cache import Cache
from .checkpoint import read_config, shard_files
from .generation import CausalLM

__all__ = ["Cache", "CausalLM", "FAMILIES", "check_folder", "from_pretrained", "model_class"]

#: ``model_type`` of a checkpoint's config -> (module, class) of its model.
FAMILIES: dict[str, tuple[str, str]] = {
    "nemotron_h": ("linattn.models.nemotron_h", "NemotronHForCausalLM"),
    "qwen3_next": ("linattn.models.qwen3_next", "Qwen3NextForCausalLM"),
    "kimi_linear": ("linattn.models.kimi_linear", "KimiLinearForCausalLM"),
}


def model_class(model_type: str) -> type[CausalLM]:
    """The model class for a config's ``model_type``."""
    if model_type not in FAMILIES:
        raise ValueError(f"model_type: {model_type!r} is not one of {', '.join(FAMILIES)}")
    module, name = FAMILIES[model_type]
    return getattr(importlib.import_module(module), name)


def check_folder(folder: str | Path) -> str:
    """Check that ``folder`` is a checkpoint these models load, reading no weights: a
    directory with a ``config.json`` whose ``model_type`` is supported and whose values
    its family accepts, and safetensors files (every shard an index names). Returns the
    ``model_type``; raises ValueError saying what is wrong."""
    config = read_config(folder)
    if "model_type" not in config:
        raise ValueError(f"folder: config.json of {str(folder)!r} has no model_type")
    model_class(config["model_type"]).config_class.from_dict(config)
    shard_files(folder)
    return config["model_type"]


def from_pretrained(
    folder: str | Path,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> CausalLM:
    """The model of checkpoint ``folder``, by its config's ``model_type``."""
    config = read_config(folder)
    if "model_type" not in config:
        raise ValueError(f"folder: config.json of {str(folder)!r} has no model_type")
    return model_class(config["model_type"]).from_pretrained(folder, dtype=dtype, device=device)
