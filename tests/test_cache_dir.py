"""LINATTN_CACHE_DIR and the default cache directory: expanded, and never a raw OSError when unusable."""
import itertools
import os
import tempfile
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest

from linattn.codegen import cache

_fresh = itertools.count()


@pytest.fixture(autouse=True)
def fresh_state(monkeypatch):
    """Each test starts as a new process would: no directory known bad, no fallback yet."""
    monkeypatch.setattr(cache, "_unusable", set())
    monkeypatch.setattr(cache, "_fallback", None)


def _module(value: int = 1):
    """What :func:`cache.load` reads of a generated module, with a name no other test uses."""
    plan = SimpleNamespace(
        spec=SimpleNamespace(name="cachetest"), dtype="fp32", K=16, V=16, key=lambda: f"{os.getpid()}_{next(_fresh)}"
    )
    return SimpleNamespace(plan=plan, backward=False, source=f"VALUE = {value}\n")


def _unusable_path(tmp_path: Path) -> Path:
    """A path under a regular file: no one (root included) can make it a directory."""
    (tmp_path / "afile").write_text("not a directory")
    return tmp_path / "afile" / "sub"


def test_env_dir_expands_home_and_variables(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("LINATTN_CACHE_DIR", "~/kernels")
    assert cache.cache_dir() == tmp_path / "kernels" and (tmp_path / "kernels").is_dir()
    monkeypatch.setenv("LINATTN_TEST_ROOT", str(tmp_path / "root"))
    monkeypatch.setenv("LINATTN_CACHE_DIR", "$LINATTN_TEST_ROOT/kernels")
    assert cache.cache_dir() == tmp_path / "root" / "kernels"
    mod, path = cache.load(_module(7))
    assert mod.VALUE == 7 and path.parent == tmp_path / "root" / "kernels"


def test_default_dir_under_home(tmp_path, monkeypatch):
    monkeypatch.delenv("LINATTN_CACHE_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache.cache_dir() == tmp_path / ".cache" / "linattn"


@pytest.mark.parametrize(
    "make_bad", [_unusable_path, lambda tmp: _unusable_path(tmp).parent], ids=["under-a-file", "a-file"]
)
def test_unusable_env_dir_falls_back_with_one_warning(tmp_path, monkeypatch, make_bad):
    bad = make_bad(tmp_path)
    monkeypatch.setenv("LINATTN_CACHE_DIR", str(bad))
    with pytest.warns(UserWarning, match=r"LINATTN_CACHE_DIR=.* is unusable") as record:
        first = cache.cache_dir()
    assert len(record) == 1 and str(bad) in str(record[0].message)
    assert first.is_dir() and os.access(first, os.W_OK) and bad not in (first, *first.parents)
    assert Path(tempfile.gettempdir()) in first.parents
    # once per process: later calls and loads use the fallback quietly
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cache.cache_dir() == first
        mod, path = cache.load(_module(3))
    assert mod.VALUE == 3 and path.parent == first


def test_unwritable_env_dir_falls_back_on_write(tmp_path, monkeypatch):
    """The directory exists but files cannot be made in it (what a read-only directory does to a non-root user)."""
    good = tmp_path / "readonly"
    monkeypatch.setenv("LINATTN_CACHE_DIR", str(good))
    real_mkstemp = tempfile.mkstemp

    def mkstemp(*args, dir=None, **kwargs):
        if Path(dir) == good:
            raise PermissionError(13, "Permission denied", str(dir))
        return real_mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(cache.tempfile, "mkstemp", mkstemp)
    with pytest.warns(UserWarning, match=r"LINATTN_CACHE_DIR=.* is unusable .*Permission denied"):
        mod, path = cache.load(_module(5))
    assert mod.VALUE == 5 and path.parent != good and path.exists()
    assert not list(good.iterdir())  # no temporary file left behind
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cache.cache_dir() == path.parent  # remembered: no second try, no second warning


def test_failing_fallback_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("LINATTN_CACHE_DIR", str(_unusable_path(tmp_path)))

    def no_tmp(*args, **kwargs):
        raise FileNotFoundError(2, "No usable temporary directory found")

    monkeypatch.setattr(cache.tempfile, "TemporaryDirectory", no_tmp)
    with pytest.raises(RuntimeError, match="set LINATTN_CACHE_DIR to a writable directory"):
        cache.cache_dir()


def test_unusable_home_falls_back(tmp_path, monkeypatch):
    monkeypatch.delenv("LINATTN_CACHE_DIR", raising=False)
    monkeypatch.setenv("HOME", str(_unusable_path(tmp_path).parent))  # HOME is a regular file
    with pytest.warns(UserWarning, match="default cache directory .* is unusable.*set LINATTN_CACHE_DIR"):
        first = cache.cache_dir()
    assert first.is_dir()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cache.cache_dir() == first
        mod, path = cache.load(_module(11))
    assert mod.VALUE == 11 and path.parent == first


def test_no_home_falls_back(monkeypatch):
    monkeypatch.delenv("LINATTN_CACHE_DIR", raising=False)

    def no_home():
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr(cache.Path, "home", staticmethod(no_home))
    with pytest.warns(UserWarning, match="no home directory.*set LINATTN_CACHE_DIR"):
        first = cache.cache_dir()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cache.cache_dir() == first
