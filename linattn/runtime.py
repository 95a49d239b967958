"""Running generated kernels: compiled by Triton on CUDA, through Triton's interpreter on CPU.

The interpreter normally needs ``TRITON_INTERPRET=1`` before triton is imported, and then
interprets everything. Here the choice is per call, by the tensors' device: CPU tensors
run the same generated source through :class:`InterpretedFunction`, with triton's own
``@jit`` library functions (``tl.sum``, ``tl.cumsum``, ...) interpreted for the duration
of the launch.
"""
from __future__ import annotations

import contextlib
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


@contextlib.contextmanager
def _interpreting():
    """Let triton's ``@jit`` library functions run as interpreted device functions."""
    from triton.runtime.jit import JITFunction

    if _GLOBAL_INTERPRET:  # triton already built its library for the interpreter
        yield
        return
    with _lock:
        original = JITFunction.__call__

        def call(self, *args, **kwargs):
            return _interpreted_fn(self.fn)(*args, **kwargs)

        JITFunction.__call__ = call
        try:
            yield
        finally:
            JITFunction.__call__ = original


def launch(fn: Callable, device: torch.device, grid: tuple[int, ...], args: dict, num_warps: int) -> None:
    """Launch the generated kernel ``fn`` (a plain function from a generated module)."""
    global _warned_cpu
    if device.type == "cuda":
        k = _jitted.get(fn)
        if k is None:
            k = _jitted[fn] = triton.jit(fn)
        k[grid](**args, num_warps=num_warps)
    elif device.type == "cpu":
        if not _warned_cpu:
            log.info("CPU tensors: running the generated kernels through Triton's interpreter (slow)")
            _warned_cpu = True
        with _interpreting():
            _interpreted_fn(fn)[grid](**args)
    else:
        raise ValueError(f"q: tensors on {device} are not supported; use CUDA tensors, or CPU tensors (interpreter)")


def jit(fn: Callable):
    """The compiled (``triton.jit``) form of a generated kernel, e.g. for ahead-of-time compilation."""
    k = _jitted.get(fn)
    if k is None:
        k = _jitted[fn] = triton.jit(fn)
    return k
