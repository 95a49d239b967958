"""The Triton kernels fla and mamba_ssm launch for one call of their ops, captured on a machine
without a GPU.

The peers' tables (what fla does at a shape, kernel by kernel) must come from fla's own host
code: which kernels run, with which grid, block sizes and warps, is decided there, partly at
import time from the device it sees (``fla/utils/hardware.py``: Hopper, shared memory, TF32).
So fla is imported and called here as if on an H100 (sm_90, 132 SMs, 227 KB of shared memory
per block) with every Triton launch *recorded instead of run*:

* a fake Triton driver and fake ``torch.cuda`` queries answer fla's device questions;
* fla is imported afresh under that fake device, in its own set of ``sys.modules`` entries,
  so a copy of fla imported by other code (decided on the real machine) is neither used nor
  changed, and is put back afterwards, as are the driver, ``torch.cuda`` and the environment;
* ``JITFunction.run`` records the launch (arguments bound to the kernel's signature, constexpr
  defaults filled, grid resolved); ``Autotuner.run`` takes the first config that survives the
  kernel's own pruning (fla autotunes by timing, which cannot happen here: the first candidate is
  the reproducible choice); ``Heuristics.run`` runs as usual and fills its values;
* the op runs on ``meta`` tensors: fla's host code only allocates and reshapes.

Each launch then says what it reads and writes (see :func:`tensor_access`), so its memory
traffic can be counted, and it can be compiled ahead of time for sm_90
(``linattn.codegen.aot.compile_launch``).

    python -m bench.peers gdn --B 1 --T 8192 --H 96 --K 128 --V 128 [--backward]
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import importlib
import importlib.util
import os
import sys
import textwrap
import types
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch

__all__ = ["H100", "OPS", "PeerLaunch", "fla_launches", "mamba_launches", "tensor_access"]

OPS = ("gdn", "gdn_fused", "kda", "kda_fused", "delta_product", "comba", "dplr")
#: the peers' packages, imported afresh under the fake device and put back afterwards
_PEERS = ("fla", "mamba_ssm")

#: the device fla is shown: an H100 SXM (sm_90, 132 SMs, 228 KB of shared memory per SM of
#: which 227 KB, 232448 bytes, can go to one block)
H100 = SimpleNamespace(
    name="NVIDIA H100 80GB HBM3",
    capability=(9, 0),
    sms=132,
    smem_per_block=232448,
    smem_per_sm=233472,
    total_memory=80 * 2**30,
    warp_size=32,
)

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class PeerLaunch:
    """One recorded kernel launch."""

    name: str  # the Triton kernel's function name
    fn: object  # the triton JITFunction (not an Autotuner/Heuristics wrapper)
    grid: tuple[int, ...]  # resolved grid (3 ints max)
    #: every parameter of the kernel's signature, in signature order: tensors (on ``meta``), ints,
    #: floats, ``None``, bools, and the values of its ``tl.constexpr`` parameters (those passed,
    #: those autotune and heuristics add, the defaults of the rest) as ``triton.language.constexpr``
    #: (``.value`` is the number), so that ``linattn.codegen.aot.specialize`` makes them constants
    args: dict
    num_warps: int
    num_stages: int
    bytes_read: int  # unique bytes this launch reads (each tensor argument counted once, full size)
    bytes_written: int  # unique bytes it writes


# ----------------------------------------------------------------------------- the fake device
class _FakeUtils:
    """``driver.active.utils``: what fla asks of the device (``get_multiprocessor_count``,
    ``get_all_max_shared_mem``)."""

    @staticmethod
    def get_device_properties(device: int = 0) -> dict[str, Any]:
        return {
            "multiprocessor_count": H100.sms,
            "max_shared_mem": H100.smem_per_block,
            "max_num_regs": 65536,
            "warpSize": H100.warp_size,
            "sm_clock_rate": 1980000,
            "mem_clock_rate": 2619000,
            "mem_bus_width": 5120,
        }


class _FakeDriver:
    """A Triton driver for an H100 that launches nothing (``JITFunction.run`` is replaced while
    it is active, so only the target and device queries are ever used)."""

    utils = _FakeUtils()

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", H100.capability[0] * 10 + H100.capability[1], H100.warp_size)

    def get_current_device(self) -> int:
        return 0

    def set_current_device(self, device: int) -> None:
        pass

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_device_interface(self):
        return torch.cuda

    def get_active_torch_device(self):
        return torch.device("meta")

    def get_benchmarker(self):
        raise RuntimeError("bench.peers records launches; nothing can be timed")

    def is_active(self) -> bool:
        return True


def _fake_props(device: Any = None) -> SimpleNamespace:
    """``torch.cuda.get_device_properties`` of an H100."""
    return SimpleNamespace(
        name=H100.name, major=H100.capability[0], minor=H100.capability[1], multi_processor_count=H100.sms,
        shared_memory_per_block=49152, shared_memory_per_block_optin=H100.smem_per_block,
        shared_memory_per_multiprocessor=H100.smem_per_sm, total_memory=H100.total_memory,
        warp_size=H100.warp_size, regs_per_multiprocessor=65536, max_threads_per_multi_processor=2048,
        L2_cache_size=50 * 2**20,
    )


#: ``torch.cuda`` functions the peers' import-time and host code query (mamba_ssm enters
#: ``torch.cuda.device(x.device.index)`` around each launch: on meta tensors, a no-op)
_CUDA_FAKES: dict[str, Callable[..., Any]] = {
    "device": lambda device=None: contextlib.nullcontext(),
    "get_device_name": lambda device=None: H100.name,
    "get_device_capability": lambda device=None: H100.capability,
    "get_device_properties": _fake_props,
    "device_count": lambda: 1,
    "current_device": lambda: 0,
}

#: fla's switches for non-Triton backends (FlashQLA, TileLang, ...): off, so its Triton path is taken
_ENV = {"FLA_DISABLE_BACKEND_DISPATCH": "1", "FLA_USE_TMA": "0"}

#: the peers' modules as imported under the fake device, kept between calls (importing fla takes ~10 s)
_FAKE_PEERS: dict[str, Any] = {}
#: the launches being recorded (a list while capturing)
_RECORD: list[PeerLaunch] | None = None


def _is_peer(name: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in _PEERS)


@contextlib.contextmanager
def _as_h100() -> Iterator[None]:
    """Inside: the peers (imported afresh if needed) see an H100 and Triton launches are recorded.
    On exit everything is put back: the driver, ``torch.cuda``, the environment, ``sys.modules``'s
    fla and mamba_ssm entries, Triton's registry of JIT functions and the patched Triton methods."""
    from triton.runtime import autotuner, jit
    from triton.runtime.driver import driver

    saved_driver = (driver._default, driver._active)
    saved_cuda = {name: getattr(torch.cuda, name) for name in _CUDA_FAKES}
    saved_env = {name: os.environ.get(name) for name in _ENV}
    saved_peers = {name: mod for name, mod in sys.modules.items() if _is_peer(name)}
    saved_registry = dict(jit._triton_jit_function_registry)
    saved_run = (jit.JITFunction.run, autotuner.Autotuner.run)
    try:
        driver._active = _FakeDriver()
        for name, fake in _CUDA_FAKES.items():
            setattr(torch.cuda, name, fake)
        os.environ.update(_ENV)
        for name in saved_peers:
            del sys.modules[name]
        sys.modules.update(_FAKE_PEERS)
        jit.JITFunction.run = _record_jit_run
        autotuner.Autotuner.run = _first_config_run
        yield
    finally:
        jit.JITFunction.run, autotuner.Autotuner.run = saved_run
        _FAKE_PEERS.update({name: mod for name, mod in sys.modules.items() if _is_peer(name)})
        for name in [name for name in sys.modules if _is_peer(name)]:
            del sys.modules[name]
        sys.modules.update(saved_peers)
        jit._triton_jit_function_registry.clear()
        jit._triton_jit_function_registry.update(saved_registry)
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        for name, fn in saved_cuda.items():
            setattr(torch.cuda, name, fn)
        driver._default, driver._active = saved_driver


# ----------------------------------------------------------------------------- recording launches
def _bind(fn, args: tuple, kwargs: dict) -> tuple[dict[str, Any], dict[str, Any]]:
    """The kernel's parameters (in signature order, defaults filled) and the remaining options."""
    names = [p.name for p in fn.params]
    values = dict(zip(names, args))
    options = {}
    for key, value in kwargs.items():
        (values if key in names else options)[key] = value
    for p in fn.params:
        if p.name not in values:
            if not p.has_default:
                raise TypeError(f"{fn.__name__}: no value for parameter {p.name}")
            values[p.name] = p.default
    return {name: values[name] for name in names}, options


def _record_jit_run(self, *args, grid, warmup, **kwargs):
    """Replaces ``JITFunction.run``: records the launch and runs nothing."""
    if warmup:
        return
    if _RECORD is None:
        raise RuntimeError("bench.peers: a Triton kernel was launched outside a capture")
    import triton.language as tl

    bound, options = _bind(self, args, kwargs)
    if callable(grid):
        grid = grid(bound)
    grid = tuple(int(g) for g in grid)
    assert 1 <= len(grid) <= 3, grid
    tensors = {name: v for name, v in bound.items() if isinstance(v, torch.Tensor)}
    read, written = tensor_access(self, tensors)

    def unique_bytes(names: frozenset[str]) -> int:  # a tensor passed twice counts once
        once = {id(tensors[n]): tensors[n] for n in names}
        return sum(v.numel() * v.element_size() for v in once.values())

    # constexpr parameters as tl.constexpr: the kernel's signature, not the value's type, makes a
    # constant (Triton's launcher reads the annotation; a bare 64 would pass as an i32 argument)
    for p in self.params:
        if p.is_constexpr and bound[p.name] is not None and not isinstance(bound[p.name], tl.constexpr):
            bound[p.name] = tl.constexpr(bound[p.name])
    num_warps, num_stages = options.get("num_warps"), options.get("num_stages")
    _RECORD.append(PeerLaunch(
        name=self.__name__,
        fn=self,
        grid=grid,
        args=bound,
        num_warps=4 if num_warps is None else int(num_warps),  # CUDAOptions' defaults
        num_stages=3 if num_stages is None else int(num_stages),
        bytes_read=unique_bytes(read),
        bytes_written=unique_bytes(written),
    ))


def _first_config_run(self, *args, **kwargs):
    """Replaces ``Autotuner.run``: the first config left by the kernel's own pruning
    (``early_config_prune``/``perf_model``), as a timing-free, reproducible choice; a config fla
    put in the autotuner's cache for this key (its own config files, ``FLA_CACHE_MODE``; off by
    default) wins, as it would on the device."""
    self.nargs = dict(zip(self.arg_names, args))
    try:
        named = {k: v for k, v in {**self.nargs, **kwargs}.items() if k in self.arg_names}
        key = tuple([named[k] for k in self.keys if k in named] + [str(v.dtype) for v in named.values()
                                                                    if hasattr(v, "dtype")])
        config = self.cache.get(key)
        if config is None:
            configs = self.prune_configs(kwargs) if len(self.configs) > 1 else self.configs
            config = configs[0]
        self.best_config = config
        if config.pre_hook is not None:  # as Triton does (on meta tensors it changes nothing)
            config.pre_hook({**self.nargs, **kwargs, **config.all_kwargs()})
        return self.fn.run(*args, **kwargs, **config.all_kwargs())
    finally:
        self.nargs = None


# ----------------------------------------------------------------------------- reads and writes
_LOADS = {"load"}
_STORES = {"store"}
_BOTH = {"atomic_add", "atomic_max", "atomic_min", "atomic_and", "atomic_or", "atomic_xor", "atomic_xchg",
         "atomic_cas"}
_ACCESS_CACHE: dict[tuple[int, frozenset[str]], tuple[frozenset[str], frozenset[str]]] = {}


def tensor_access(fn, pointers: Iterable[str]) -> tuple[frozenset[str], frozenset[str]]:
    """Which of the kernel's ``pointers`` (the parameters a launch passes tensors to) it loads
    through and which it stores through, read from its source.

    A small abstract interpretation of the kernel body: each variable carries the set of
    parameters its value derives from (``p = tl.make_block_ptr(o + off, ...)``, ``q += bos * K``,
    ``desc = tl.make_tensor_descriptor(o, ...)``), assignments replace that set in statement
    order, both arms of an ``if`` are merged and loop bodies are walked twice.
    ``tl.load(x, ...)``/``desc.load(...)`` read what ``x`` derives from, ``tl.store``/``desc.store``
    write it, atomics do both. Calls to other ``@triton.jit`` functions are followed with their
    parameters mapped to the caller's sets.

    Limits: ``if`` tests are not evaluated (a store in a branch the launch's constexprs rule out
    still counts; a tensor passed as ``None`` counts nothing anyway); a pointer stored into a
    variable that is not a plain name, or reached through ``getattr``/containers, is lost; a
    variable derived from two tensors (``p = a if C else b``) counts for both.
    """
    pointers = frozenset(pointers)
    key = (id(fn), pointers)
    if key not in _ACCESS_CACHE:
        read, written = _Access(fn).run({p: {p} for p in pointers})
        _ACCESS_CACHE[key] = frozenset(read), frozenset(written)
    return _ACCESS_CACHE[key]


class _Access:
    def __init__(self, fn, depth: int = 0) -> None:
        self.fn = fn
        self.depth = depth
        self.read: set[str] = set()
        self.written: set[str] = set()
        tree = ast.parse(textwrap.dedent(fn.src) if hasattr(fn, "src") else "")
        self.node = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef))
        self.globals = getattr(fn.fn, "__globals__", {}) if hasattr(fn, "fn") else {}

    def run(self, env: dict[str, set[str]]) -> tuple[set[str], set[str]]:
        """Walks the body with ``env``: parameter -> the caller's pointers it derives from."""
        self.env = env
        self._block(self.node.body)
        return self.read, self.written

    # statements
    def _block(self, body: list[ast.stmt]) -> None:
        for stmt in body:
            self._stmt(stmt)

    def _stmt(self, stmt: ast.stmt) -> None:
        if isinstance(stmt, ast.Assign):
            src = self._expr(stmt.value)
            for target in stmt.targets:
                self._assign(target, src)
        elif isinstance(stmt, ast.AnnAssign) and stmt.value is not None:
            self._assign(stmt.target, self._expr(stmt.value))
        elif isinstance(stmt, ast.AugAssign):
            src = self._expr(stmt.value)
            if isinstance(stmt.target, ast.Name):
                self.env[stmt.target.id] = self.env.get(stmt.target.id, set()) | src
        elif isinstance(stmt, ast.If):
            self._expr(stmt.test)
            before = {k: set(v) for k, v in self.env.items()}
            self._block(stmt.body)
            after_body = self.env
            self.env = before
            self._block(stmt.orelse)
            for k, v in after_body.items():
                self.env[k] = self.env.get(k, set()) | v
        elif isinstance(stmt, (ast.For, ast.While)):
            if isinstance(stmt, ast.For):
                self._expr(stmt.iter)
            else:
                self._expr(stmt.test)
            for _ in range(2):
                before = {k: set(v) for k, v in self.env.items()}
                self._block(stmt.body)
                for k, v in before.items():
                    self.env[k] = self.env.get(k, set()) | v
            self._block(stmt.orelse)
        elif isinstance(stmt, ast.With):
            self._block(stmt.body)
        elif isinstance(stmt, (ast.Expr, ast.Return)) and stmt.value is not None:
            self._expr(stmt.value)
        else:
            for child in ast.iter_child_nodes(stmt):
                if isinstance(child, ast.expr):
                    self._expr(child)

    def _assign(self, target: ast.expr, src: set[str]) -> None:
        if isinstance(target, ast.Name):
            self.env[target.id] = set(src)
        elif isinstance(target, (ast.Tuple, ast.List)):
            for element in target.elts:
                self._assign(element, src)

    # expressions: the parameters a value derives from, noting accesses on the way
    def _expr(self, node: ast.expr | None) -> set[str]:
        if node is None:
            return set()
        if isinstance(node, ast.Name):
            return set(self.env.get(node.id, set()))
        if isinstance(node, ast.Call):
            return self._call(node)
        out: set[str] = set()
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.expr):
                out |= self._expr(child)
            elif isinstance(child, ast.keyword):
                out |= self._expr(child.value)
            elif isinstance(child, ast.comprehension):
                out |= self._expr(child.iter)
        return out

    def _call(self, node: ast.Call) -> set[str]:
        args = [self._expr(a) for a in node.args]
        kwargs = {k.arg: self._expr(k.value) for k in node.keywords}
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
        base = self._expr(func.value) if isinstance(func, ast.Attribute) else set()
        is_tl = isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id in ("tl", "triton")
        pointer = args[0] if args else kwargs.get("pointer", kwargs.get("ptr", set()))
        if is_tl and name in _LOADS:
            self.read |= pointer
            return set()
        if is_tl and name in _STORES:
            self.written |= pointer
            return set()
        if is_tl and name in _BOTH:
            self.read |= pointer
            self.written |= pointer
            return set()
        if not is_tl and isinstance(func, ast.Attribute) and base:  # a descriptor's methods
            if name in ("load", "gather"):
                self.read |= base
                return set()
            if name in ("store", "scatter"):
                self.written |= base
                return set()
            if name.startswith("atomic_"):
                self.read |= base
                self.written |= base
                return set()
        callee = self._jit_callee(func)
        if callee is not None and self.depth < 4:
            inner = _Access(callee, self.depth + 1)
            params = [a.arg for a in inner.node.args.args]
            env = {p: set() for p in params}
            for p, src in zip(params, args):
                env[p] = src
            for k, src in kwargs.items():
                env[k] = src
            read, written = inner.run(env)
            self.read |= read
            self.written |= written
        out = set(base)
        for src in args:
            out |= src
        for src in kwargs.values():
            out |= src
        return out

    def _jit_callee(self, func: ast.expr):
        from triton.runtime.jit import JITFunction

        obj = None
        if isinstance(func, ast.Name):
            obj = self.globals.get(func.id)
        elif isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
            obj = getattr(self.globals.get(func.value.id), func.attr, None)
        return obj if isinstance(obj, JITFunction) else None


# ----------------------------------------------------------------------------- the ops
def _call_op(op: str, B: int, T: int, H: int, HV: int, K: int, V: int, dtype: torch.dtype, backward: bool):
    """Runs fla's op on meta tensors (launches recorded); returns the forward's outputs."""
    meta = torch.device("meta")
    grad = backward

    def t(*shape, dt=dtype):
        return torch.empty(*shape, dtype=dt, device=meta, requires_grad=grad)

    q, k, v, beta = t(B, T, H, K), t(B, T, H, K), t(B, T, HV, V), t(B, T, HV)
    if op == "delta_product":  # two steps per token: k, v and beta hold 2 T rows
        from fla.ops.gated_delta_product import chunk_gated_delta_product

        k, v, beta = t(B, 2 * T, H, K), t(B, 2 * T, HV, V), t(B, 2 * T, HV)
        return chunk_gated_delta_product(q, k, v, t(B, T, HV), beta, num_householder=2)
    if op == "dplr":  # a, b per token, the decay per channel
        from fla.ops.generalized_delta_rule import chunk_dplr_delta_rule

        return chunk_dplr_delta_rule(q, k, v, t(B, T, H, K), t(B, T, H, K), t(B, T, HV, K))
    if op == "comba":  # the read key p beside k
        from fla.ops.comba import chunk_comba

        return chunk_comba(q, k, v, t(B, T, H, K), t(B, T, HV), beta)
    if op in ("gdn", "gdn_fused"):
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule

        g = t(B, T, HV)
        return chunk_gated_delta_rule(q, k, v, g, beta, use_qk_l2norm_in_kernel=op == "gdn_fused")
    from fla.ops.kda import chunk_kda

    g = t(B, T, HV, K)
    if op == "kda":
        return chunk_kda(q, k, v, g, beta)
    A_log, dt_bias = t(HV, dt=torch.float32), t(HV * K, dt=torch.float32)
    return chunk_kda(q, k, v, g, beta, use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True, A_log=A_log,
                     dt_bias=dt_bias)


def fla_launches(op: str, *, B: int, T: int, H: int, HV: int | None = None, K: int, V: int,
                 dtype: str = "bf16", backward: bool = False) -> list[PeerLaunch]:
    """The Triton launches fla 0.6.0 performs for one call of ``op`` on an H100, in order.

    op: "gdn" (``fla.ops.gated_delta_rule.chunk_gated_delta_rule``, g and beta given as tensors),
    "gdn_fused" (the same with ``use_qk_l2norm_in_kernel=True``: Qwen3-Next's layer), "kda"
    (``fla.ops.kda.chunk_kda``, g per channel given as a tensor), "kda_fused" (``chunk_kda`` with
    ``use_qk_l2norm_in_kernel=True`` and the gate computed in kernel from ``A_log``/``dt_bias``),
    "delta_product" (``fla.ops.gated_delta_product.chunk_gated_delta_product`` with two steps per
    token: k, v and beta of 2 T rows), "comba" (``fla.ops.comba.chunk_comba``, p, g and beta given), "dplr"
    (``fla.ops.generalized_delta_rule.chunk_dplr_delta_rule``, a, b and gk given).
    Fixed-length batches (no ``cu_seqlens``), no initial or final state; q, k, v, g and beta in
    ``dtype`` (as the kernel benchmarks pass them), ``A_log``/``dt_bias`` in fp32.
    With ``backward=True``: the launches of the backward only (the forward runs first, unrecorded,
    to produce what it saves; ``do`` is in ``dtype``).
    Only Triton kernels are recorded: torch ops fla runs between them (``dk.add_(dk2)``, dtype
    conversions) launch kernels too and are not here.
    """
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    HV = H if HV is None else HV
    return _capture(lambda: _call_op(op, B, T, H, HV, K, V, _DTYPES[dtype], backward)[0], backward)


def _capture(call: Callable[[], torch.Tensor], backward: bool) -> list[PeerLaunch]:
    """The launches of ``call()`` under the fake H100 (with ``backward``: of the backward of its
    output alone, the forward run first to produce what it saves)."""
    global _RECORD
    launches: list[PeerLaunch] = []
    with _as_h100():
        _RECORD = launches
        try:
            o = call()
            if backward:
                del launches[:]
                o.backward(torch.empty_like(o))
        finally:
            _RECORD = None
    return launches


def _mamba_ssd():
    """mamba_ssm's SSD module (``mamba_ssm.ops.triton.ssd_combined``). The package's ``__init__``
    imports the selective scan's CUDA extension, which the SSD path never uses; where it is
    missing (a CPU install, ``MAMBA_SKIP_CUDA_BUILD=TRUE``) the package is entered without it."""
    try:
        import mamba_ssm  # noqa: F401
    except ImportError:
        found = importlib.util.find_spec("mamba_ssm")
        if found is None or not found.submodule_search_locations:
            raise
        for name in [name for name in sys.modules if name == "mamba_ssm" or name.startswith("mamba_ssm.")]:
            del sys.modules[name]
        package = types.ModuleType("mamba_ssm")
        package.__path__ = list(found.submodule_search_locations)
        package.__spec__ = found
        sys.modules["mamba_ssm"] = package
    return importlib.import_module("mamba_ssm.ops.triton.ssd_combined")


def mamba_launches(*, B: int, T: int, H: int, HV: int | None = None, K: int, V: int, dtype: str = "bf16",
                   backward: bool = False, chunk_size: int = 128) -> list[PeerLaunch]:
    """The Triton launches of mamba_ssm's ``mamba_chunk_scan_combined`` on an H100, in order, as
    Nemotron-H's Mamba-2 mixer calls it: x ``[B, T, HV, V]`` (V = head dim), B and C
    ``[B, T, H, K]`` (H groups, K = state size), dt ``[B, T, HV]`` with ``dt_bias`` and
    ``dt_softplus=True``, ``A`` and ``D`` per head (fp32), no z (the gated norm runs outside),
    ``chunk_size`` 128 (Nemotron-H's). With ``backward=True``: the backward's launches only."""
    HV = H if HV is None else HV
    dt_ = _DTYPES[dtype]

    def call() -> torch.Tensor:
        ssd = _mamba_ssd()

        def t(*shape, dt=dt_):
            return torch.empty(*shape, dtype=dt, device="meta", requires_grad=backward)

        x, dt, Bm, Cm = t(B, T, HV, V), t(B, T, HV), t(B, T, H, K), t(B, T, H, K)
        A, D, dt_bias = (t(HV, dt=torch.float32) for _ in range(3))
        return ssd.mamba_chunk_scan_combined(x, dt, A, Bm, Cm, chunk_size, D=D, dt_bias=dt_bias, dt_softplus=True)

    return _capture(call, backward)


# ----------------------------------------------------------------------------- command line
def _table(launches: list[PeerLaunch]) -> list[str]:
    lines = [f"{'kernel':<44} {'grid':>16} {'warps':>5} {'stages':>6} {'MB read':>9} {'MB written':>10}"]
    for l in launches:
        lines.append(f"{l.name:<44} {l.grid!s:>16} {l.num_warps:>5} {l.num_stages:>6}"
                     f" {l.bytes_read / 1e6:>9.1f} {l.bytes_written / 1e6:>10.1f}")
    read, written = sum(l.bytes_read for l in launches), sum(l.bytes_written for l in launches)
    lines.append(f"{'total (' + str(len(launches)) + ' launches)':<44} {'':>16} {'':>5} {'':>6}"
                 f" {read / 1e6:>9.1f} {written / 1e6:>10.1f}")
    return lines


def main(argv: list[str] | None = None) -> int:
    """The launches as a table on stdout (``python -m bench.static`` compiles and compares them)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("op", choices=OPS)
    for name, default in (("B", 1), ("T", 8192), ("H", 96), ("HV", None), ("K", 128), ("V", 128)):
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--dtype", default="bf16", choices=sorted(_DTYPES))
    parser.add_argument("--backward", action="store_true")
    a = parser.parse_args(argv)
    launches = fla_launches(a.op, B=a.B, T=a.T, H=a.H, HV=a.HV, K=a.K, V=a.V, dtype=a.dtype, backward=a.backward)
    sys.stdout.write("\n".join(_table(launches)) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
