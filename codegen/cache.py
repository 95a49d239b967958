"""The on-disk cache of generated modules, keyed by the plan (never by B or T).

Triton reads a kernel's source with ``inspect``, so generated modules live in real
files; they also stay there for the user to read. ``LINATTN_CACHE_DIR`` overrides the
location (default ``~/.cache/linattn``).
"""
from __future__ import annotations

import importlib.util
import logging
import os
import sys
import tempfile
from pathlib import Path
from types import ModuleType

from .module import Module

__all__ = ["cache_dir", "load"]

log = logging.getLogger("linattn.codegen")


def cache_dir() -> Path:
    return Path(os.environ.get("LINATTN_CACHE_DIR") or Path.home() / ".cache" / "linattn")


def load(module: Module) -> tuple[ModuleType, Path]:
    """Write ``module`` to the cache (if not there yet) and import it."""
    plan = module.plan
    kind = "_bwd" if module.backward else ""
    name = f"{(plan.spec.name or 'spec').lower()}{kind}_{plan.dtype}_k{plan.K}_v{plan.V}_{plan.key()}"
    path = cache_dir() / f"{name}.py"
    if not path.exists() or path.read_text() != module.source:
        path.parent.mkdir(parents=True, exist_ok=True)
        # atomic: concurrent processes may generate the same plan
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            f.write(module.source)
        os.replace(tmp, path)
        log.debug("generated %s", path)
    mod_name = f"linattn_generated.{name}"
    if mod_name in sys.modules:
        return sys.modules[mod_name], path
    spec = importlib.util.spec_from_file_location(mod_name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = mod
    spec.loader.exec_module(mod)
    return mod, path
