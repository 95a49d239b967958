"""Code generation time: a spec from nothing to imported kernel modules, and from the disk cache.

Triton's own JIT (per kernel, on the first launch) is not part of it: that is the
compiler's time, paid once per machine and kept in Triton's cache. Targets: cold < 1 s,
cached < 10 ms, and no regeneration when B or T change (tests/test_compiled_forward.py).
"""
from __future__ import annotations

import itertools

import pytest

import linattn
from linattn.specs import BUILTIN


def _both_modules(spec):
    op = linattn.compile(spec)
    op.module("bf16", 128, 128)  # forward, decoding and the backward's layer-side kernels
    op.core_module("bf16", 128, 128)  # the backward kernels
    return op


@pytest.mark.parametrize("spec", list(BUILTIN.values()), ids=lambda s: s.name)
def test_codegen_cold(benchmark, spec, tmp_path, monkeypatch):
    """Plan, emit, write and import both modules into an empty cache directory."""
    fresh = itertools.count()

    def empty_cache():
        monkeypatch.setenv("LINATTN_CACHE_DIR", str(tmp_path / str(next(fresh))))
        return (spec,), {}

    benchmark.extra_info.update(codegen="cold", spec=spec.name)
    benchmark.pedantic(_both_modules, setup=empty_cache, rounds=5, iterations=1)


@pytest.mark.parametrize("spec", list(BUILTIN.values()), ids=lambda s: s.name)
def test_codegen_cached(benchmark, spec, tmp_path, monkeypatch):
    """A new op for a spec whose modules are on disk (a new process, or a second compile())."""
    monkeypatch.setenv("LINATTN_CACHE_DIR", str(tmp_path))
    _both_modules(spec)
    benchmark.extra_info.update(codegen="cached", spec=spec.name)
    benchmark.pedantic(_both_modules, args=(spec,), rounds=20, iterations=1)
