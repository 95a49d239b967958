"""Tuned plan options, measured on a GPU and read back by the plans.

``bench/tune.py`` (run by ``bench/gpu.sh``) times each built-in spec's fwd+bwd at fla's
shapes over a few plan options and writes the winners to ``codegen/tuned/<device>.json``:

    {"device": "NVIDIA H100 80GB HBM3",
     "options": {"GDN/bf16/K128/V128": {"block_v": 64}, ...},
     "measured": {...}}

A compiled op on a CUDA device of that name takes a spec's entry for its dtype and head
sizes as the default of every option the caller did not pass (explicit options always
win). Keys are structure only (spec, dtype, K, V), never batch or length. Without a GPU,
or for a device or spec without an entry, nothing changes.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import re
from dataclasses import fields
from pathlib import Path

from .plan import Options

__all__ = ["TUNED_DIR", "device_file", "entry_key", "tuned_options", "device_name"]

log = logging.getLogger("linattn")

#: where the tables live (``LINATTN_TUNED_DIR`` overrides, for tests and private tables)
TUNED_DIR = Path(__file__).with_name("tuned")


def _dir() -> Path:
    return Path(os.environ["LINATTN_TUNED_DIR"]) if os.environ.get("LINATTN_TUNED_DIR") else TUNED_DIR


def device_file(device: str) -> Path:
    """The table of a device, by its name as torch reports it (``NVIDIA H100 80GB HBM3``)."""
    return _dir() / (re.sub(r"[^A-Za-z0-9_.-]+", "_", device) + ".json")


def entry_key(spec_name: str, dtype: str, K: int, V: int) -> str:
    return f"{spec_name}/{dtype}/K{K}/V{V}"


def device_name() -> str | None:
    """The current CUDA device's name, None without one."""
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else None


@functools.cache
def _table(path: str, mtime: float) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        log.warning("tuned options: cannot read %s (%s); using the defaults", path, err)
        return {}
    valid = {f.name for f in fields(Options)}
    table = {}
    for key, opts in data.get("options", {}).items():
        bad = set(opts) - valid
        if bad:
            log.warning("tuned options: %s in %s names unknown options %s; entry ignored", key, path, sorted(bad))
            continue
        table[key] = opts
    return table


def tuned_options(spec_name: str | None, dtype: str, K: int, V: int, device: str | None) -> dict:
    """The tuned options of ``spec_name`` at ``dtype``, ``K``, ``V`` on ``device`` ({} if none)."""
    if not spec_name or not device:
        return {}
    path = device_file(device)
    if not path.is_file():
        return {}
    return dict(_table(str(path), path.stat().st_mtime).get(entry_key(spec_name, dtype, K, V), {}))
