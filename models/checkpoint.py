"""Reading Hugging Face checkpoint folders: ``config.json`` and safetensors shards.

Loading is strict: every tensor of the checkpoint must land on a parameter or buffer of
the model and every parameter must be filled, otherwise the error lists what is unknown
and what is missing (a silently half-loaded model gives plausible but wrong logits).
"""
from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from safetensors import safe_open

__all__ = ["read_config", "read_tensors", "load_state", "config_dtype"]

log = logging.getLogger(__name__)


def _folder(folder: str | Path) -> Path:
    path = Path(folder)
    if not path.is_dir():
        raise ValueError(f"folder: {str(folder)!r} is not a directory")
    return path


def read_config(folder: str | Path) -> dict:
    """The checkpoint's ``config.json`` as a dict."""
    path = _folder(folder) / "config.json"
    if not path.is_file():
        raise ValueError(f"folder: no config.json in {str(folder)!r}")
    with path.open() as f:
        return json.load(f)


_DTYPES = {"float32": torch.float32, "float": torch.float32, "bfloat16": torch.bfloat16,
           "float16": torch.float16, "half": torch.float16}


def config_dtype(config: dict) -> torch.dtype | None:
    """The checkpoint's dtype from a config dict (``dtype``, or the older ``torch_dtype``), if given."""
    given = {key: config[key] for key in ("dtype", "torch_dtype") if config.get(key) is not None}
    found = set()
    for key, value in given.items():
        if isinstance(value, torch.dtype):
            found.add(value)
            continue
        name = str(value).removeprefix("torch.")
        if name not in _DTYPES:
            raise ValueError(f"{key}: unsupported dtype {value!r} (expected one of {', '.join(_DTYPES)})")
        found.add(_DTYPES[name])
    if len(found) > 1:
        raise ValueError(f"dtype: dtype and torch_dtype disagree: {given}")
    return found.pop() if found else None


def _shards(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        with index.open() as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        return [folder / n for n in names]
    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        raise ValueError(f"folder: no *.safetensors files in {str(folder)!r}")
    return shards


def read_tensors(folder: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of the folder's safetensors shards (memory-mapped), by name."""
    tensors: dict[str, torch.Tensor] = {}
    for shard in _shards(_folder(folder)):
        with safe_open(str(shard), framework="pt") as f:
            for name in f.keys():
                tensors[name] = f.get_tensor(name)
    return tensors


def _listing(names: Iterable[str], limit: int = 20) -> str:
    names = sorted(names)
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def load_state(
    module: torch.nn.Module,
    tensors: dict[str, torch.Tensor],
    *,
    rename: Callable[[str], str | None] | None = None,
) -> None:
    """Copy ``tensors`` into ``module``'s parameters and persistent buffers, strictly.

    ``rename`` maps a checkpoint name to the module's name (or None to drop a tensor the
    model deliberately does not use). Tensors are cast to each parameter's dtype; shapes
    must agree exactly.
    """
    own = dict(module.state_dict())
    unknown, wrong_shape, filled = [], [], set()
    for name, tensor in tensors.items():
        target = rename(name) if rename is not None else name
        if target is None:
            continue
        if target not in own:
            unknown.append(name)
            continue
        if tuple(own[target].shape) != tuple(tensor.shape):
            wrong_shape.append(f"{name}: checkpoint {list(tensor.shape)}, model {list(own[target].shape)}")
            continue
        with torch.no_grad():
            own[target].copy_(tensor.to(own[target].dtype))
        filled.add(target)
    missing = set(own) - filled
    problems = []
    if unknown:
        problems.append(f"{len(unknown)} unknown checkpoint tensors: {_listing(unknown)}")
    if missing:
        problems.append(f"{len(missing)} missing parameters: {_listing(missing)}")
    if wrong_shape:
        problems.append(f"{len(wrong_shape)} shape mismatches: {_listing(wrong_shape)}")
    if problems:
        raise ValueError("checkpoint does not match the model: " + "; ".join(problems))
    log.info("loaded %d tensors into %s", len(filled), type(module).__name__)
