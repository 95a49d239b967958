"""Running generated kernels: compiled by Triton on CUDA, through Triton's interpreter on CPU.

The interpreter normally needs ``TRITON_INTERPRET=1`` before triton is imported, and then
interprets everything. Here the choice is per call, by the tensors' device: CPU tensors
run the same generated source through :class:`InterpretedFunction`, with triton's own
``@jit`` library functions (``tl.sum``, ``tl.cumsum``, ...) interpreted for the duration
of the launch.
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
import os
import threading
from collections.abc import Callable

import torch
import triton

log = logging.getLogger("linattn")

_GLOBAL_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
_jitted: dict[Callable, object] = {}
_interpreted: dict[Callable, object] = {}
_lock = threading.RLock()
_warned_cpu = False


def _interpreted_fn(fn: Callable):
    from triton.runtime.interpreter import InterpretedFunction

    f = _interpreted.get(fn)
    if f is None:
        f = _interpreted[fn] = InterpretedFunction(fn)
    return f


def _round_to_bf16(builder_cls):
    """The interpreter's fp32 -> bf16 cast truncates; GPUs round to nearest even.

    Numerics on CPU must be those of the GPU (a biased rounding triples the error of a
    bf16 pipeline), so the cast is replaced by torch's, which rounds to nearest even.
    """
    import numpy as np
    import triton.language as tl
    from triton.runtime.interpreter import TensorHandle

    original = builder_cls.cast_impl

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            rounded = torch.from_numpy(np.ascontiguousarray(src.data, dtype=np.float32)).to(torch.bfloat16)
            return TensorHandle(rounded.view(torch.int16).numpy().view(np.uint16), tl.bfloat16)
        return original(self, src, dst_type)

    return original, cast_impl


def _language_objects() -> list:
    """What Triton's interpreter patches while it runs: ``triton.language``, its core and math
    modules and its tensor classes."""
    import triton.language as tl

    objects = [tl, tl.core, tl.math, tl.core.tensor]
    base = getattr(tl.core, "tensor_descriptor_base", None)
    return objects + ([base] if base is not None else [])


@contextlib.contextmanager
def _interpreting():
    """Let triton's ``@jit`` library functions run as interpreted device functions,
    with the GPU's rounding of fp32 to bf16.

    On the way out, ``triton.language`` is put back as it was: the interpreter patches it
    for each kernel and restores it, but a device-function call (``tl.sum``, ``tl.cumsum``)
    patches it again without restoring (triton 3.9), after which nothing in the process can
    be compiled for a GPU any more (an ahead-of-time compile fails deep in the builder).
    """
    from triton.runtime.interpreter import InterpreterBuilder
    from triton.runtime.jit import JITFunction

    with _lock:
        original_call = JITFunction.__call__
        original_cast, cast = _round_to_bf16(InterpreterBuilder)
        saved = [(obj, dict(vars(obj))) for obj in _language_objects()]

        def call(self, *args, **kwargs):
            return _interpreted_fn(self.fn)(*args, **kwargs)

        if not _GLOBAL_INTERPRET:  # else triton already built its library for the interpreter
            JITFunction.__call__ = call
        InterpreterBuilder.cast_impl = cast
        try:
            yield
        finally:
            JITFunction.__call__ = original_call
            InterpreterBuilder.cast_impl = original_cast
            if not _GLOBAL_INTERPRET:
                for obj, attrs in saved:
                    for name in set(vars(obj)) - set(attrs):
                        if not inspect.ismodule(vars(obj)[name]):  # a submodule imported meanwhile stays
                            delattr(obj, name)
                    for name, value in attrs.items():
                        if vars(obj).get(name) is not value:
                            setattr(obj, name, value)


@dataclasses.dataclass(frozen=True)
class Launch:
    """One launch of a generated kernel, as :func:`capture` records it."""

    fn: Callable  # the kernel's Python function (undecorated)
    grid: tuple[int, ...]
    args: dict
    num_warps: int
    num_stages: int | None
    kernel: object = None  # its manifest entry (codegen.manifest.Kernel), when launched by an op
    sizes: dict | None = None  # the sizes its manifest's shapes and grid were resolved with


_captured: list[Launch] | None = None


@contextlib.contextmanager
def capture():
    """Record the launches inside the block instead of running them (tensors may be on the
    meta device): ahead-of-time inspection compiles exactly what a call launches."""
    global _captured
    with _lock:
        outer, _captured = _captured, []
        try:
            yield _captured
        finally:
            _captured = outer


def launch(
    fn: Callable, device: torch.device, grid: tuple[int, ...], args: dict, num_warps: int,
    num_stages: int | None = None, kernel: object = None, sizes: dict | None = None,
) -> None:
    """Launch the generated kernel ``fn`` (a ``@triton.jit`` function of a generated module,
    or its plain Python function); ``kernel`` and ``sizes``: its manifest entry and the sizes
    it was resolved with, kept by :func:`capture` and seen by launch counters."""
    global _warned_cpu
    jitted = fn if isinstance(fn, triton.runtime.JITFunction) else None
    fn = getattr(fn, "fn", fn)  # the Python function (the interpreter and captures take it)
    if _captured is not None:
        _captured.append(Launch(fn, tuple(grid), dict(args), num_warps, num_stages, kernel, sizes))
        return
    if device.type == "cuda":
        k = jitted or _jitted.get(fn)
        if k is None:
            k = _jitted[fn] = triton.jit(fn)
        k[grid](**args, num_warps=num_warps, **({} if num_stages is None else {"num_stages": num_stages}))
    elif device.type == "cpu":
        if not _warned_cpu:
            log.info("CPU tensors: running the generated kernels through Triton's interpreter (slow)")
            _warned_cpu = True
        with _interpreting():
            _interpreted_fn(fn)[grid](**args)
    else:
        raise ValueError(f"q: tensors on {device} are not supported; use CUDA tensors, or CPU tensors (interpreter)")


_SMS: dict[int, int] = {}

#: The SMs a call on meta tensors is planned for: a capture (:func:`capture`) models an H100 SXM.
META_SMS = 132


def sm_count(device: torch.device) -> int | None:
    """Streaming multiprocessors of a CUDA ``device`` (cached), :data:`META_SMS` for meta
    tensors; None for other devices."""
    if device.type == "meta":
        return META_SMS
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SMS:
        _SMS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SMS[index]


def mma_dtype(mma: str, device: torch.device):
    """The operand type of tensor-core products (the plan's ``mma``: "bf16", "fp32", "fp64");
    fp32 in the interpreter, whose bf16 products are wrong (operands are still rounded first)."""
    import triton.language as tl

    if mma == "fp64":
        return tl.float64
    if device.type != "cuda" or _GLOBAL_INTERPRET:
        return tl.float32
    return {"bf16": tl.bfloat16, "fp16": tl.float16, "fp32": tl.float32}[mma]


