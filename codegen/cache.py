"""The on-disk cache of generated modules, keyed by the plan (never by B or T).

Triton reads a kernel's source with ``inspect``, so generated modules live in real
files; they also stay there for the user to read. ``LINATTN_CACHE_DIR`` overrides the
location (default ``~/.cache/linattn``; ``~`` and ``$VARS`` are expanded). If that
directory cannot be created or written, the process falls back to a temporary directory
(removed at exit) and warns once.
"""
from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import sys
import tempfile
import warnings
from pathlib import Path
from types import ModuleType

from .module import Module

__all__ = ["cache_dir", "load"]

log = logging.getLogger("linattn.codegen")

ENV = "LINATTN_CACHE_DIR"

#: Directories found unusable in this process (each warned about once).
_unusable: set[str] = set()
#: The fallback directory, made on first need.
_fallback: tempfile.TemporaryDirectory | None = None


def _configured() -> tuple[Path | None, str]:
    """The directory asked for (None: no home directory) and how, for messages."""
    env = os.environ.get(ENV)
    if env:
        return Path(os.path.expandvars(os.path.expanduser(env))), f"{ENV}={env!r}"
    try:
        return Path.home() / ".cache" / "linattn", "the default cache directory"
    except (RuntimeError, KeyError, OSError):  # HOME unset and no passwd entry
        return None, "the default cache directory ~/.cache/linattn (no home directory)"


def _fall_back(path: Path | None, what: str, err: Exception | None) -> Path:
    """The temporary directory used instead of ``path``; warns the first time ``path`` fails."""
    global _fallback
    key = str(path) if path is not None else what
    problem = (f"{what} ({path})" if path is not None else what) + " is unusable" + (f" ({err})" if err else "")
    if _fallback is None:
        try:
            _fallback = tempfile.TemporaryDirectory(prefix="linattn-")
        except OSError as tmp_err:
            raise RuntimeError(
                f"linattn: {problem} and no temporary directory can be made ({tmp_err}); "
                f"set {ENV} to a writable directory"
            ) from tmp_err
    if key not in _unusable:
        _unusable.add(key)
        msg = (
            f"linattn: {problem}; generated kernels go to {_fallback.name} for this process "
            f"(set {ENV} to a writable directory)"
        )
        log.warning(msg)
        warnings.warn(msg, stacklevel=2)
    return Path(_fallback.name)


def cache_dir() -> Path:
    """The directory generated modules are written to (created if need be)."""
    path, what = _configured()
    if path is None or str(path) in _unusable:
        return _fall_back(path, what, None)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        return _fall_back(path, what, err)
    return path


def _write(path: Path, source: str) -> None:
    """Write ``source`` to ``path`` unless it holds it already (atomic: processes may race)."""
    if path.exists() and path.read_text() == source:
        return
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(source)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    log.debug("generated %s", path)


def load(module: Module) -> tuple[ModuleType, Path]:
    """Write ``module`` to the cache (if not there yet) and import it."""
    plan = module.plan
    kind = "_bwd" if module.backward else ""
    name = f"{(plan.spec.name or 'spec').lower()}{kind}_{plan.dtype}_k{plan.K}_v{plan.V}_{plan.key()}"
    directory = cache_dir()
    while True:  # at most twice: the cache directory, then the fallback
        path = directory / f"{name}.py"
        try:
            _write(path, module.source)
            break
        except OSError as err:
            if _fallback is not None and directory == Path(_fallback.name):
                raise RuntimeError(f"linattn: cannot write generated module {path} ({err})") from err
            directory = _fall_back(directory, _configured()[1], err)
    mod_name = f"linattn_generated.{name}"
    if mod_name in sys.modules:
        return sys.modules[mod_name], path
    spec = importlib.util.spec_from_file_location(mod_name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = mod
    spec.loader.exec_module(mod)
    return mod, path
