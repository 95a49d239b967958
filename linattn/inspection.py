"""Ahead-of-time inspection of what a call really launches, without a GPU.

A call runs on meta tensors with the launcher recording instead of running
(:func:`linattn.runtime.capture`); each recorded launch is compiled for ``sm_<arch>``
with the specialization its arguments give on a GPU (pointer alignment, integers
divisible by 16 or equal to 1), then ``ptxas -v`` reports registers, spills and shared
memory (:mod:`codegen.aot`). So the no-spill check sees the variant that runs.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from linattn.codegen.aot import KernelReport, compile_launch
from linattn.codegen.cost import hbm_bytes

from . import custom_ops, runtime
from .inputs import check_call
from .op import compile as compile_spec
from .spec import Correction, OutputGate, Role, Skip, Spec

__all__ = ["captured_launches", "inspect_spec", "launch_bytes"]

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _meta_call(spec: Spec, dtype: torch.dtype, B: int, T: int, H: int, HV: int, K: int, V: int, N: int = 0):
    """A validated call on meta tensors; ``N`` > 0 packs N sequences into batch 1 (``cu_seqlens``)."""
    def t(*shape):
        return torch.empty(shape, dtype=dtype, device="meta")

    shapes = {Role.TOKEN: (B, T, HV), Role.TOKEN_CHANNEL: (B, T, HV, K), Role.HEAD: (HV,), Role.HEAD_CHANNEL: (HV, K)}
    operands = {o.name: (1.0 if o.role is Role.SCALAR else t(*shapes[o.role])) for o in spec.operands}
    operands.update((name, t(B, T, H, K)) for name in spec.correction_inputs)  # Comba's p
    z = t(B, T, HV, V) if spec.output_gate is OutputGate.SILU else None
    D = {Skip.NONE: None, Skip.HEAD: t(HV), Skip.CHANNEL: t(HV, V)}[spec.skip]
    cu = torch.empty(N + 1, dtype=torch.int32, device="meta") if N else None
    return check_call(spec, t(B, T, H, K), t(B, T, H, K), t(B, T, HV, V), operands, z=z, D=D, cu_seqlens=cu,
                      check_values=False)


def captured_launches(
    spec: Spec, dtype: str = "bf16", K: int = 128, V: int = 128, *, T: int = 8192, H: int = 16,
    HV: int = 32, B: int = 1, packed: int = 4, step: bool = True, backward: bool = False, **options,
) -> list[runtime.Launch]:
    """The launches of one call of ``spec`` at these sizes (Qwen3-Next's heads by default):
    ``packed`` sequences packed into the T tokens of batch 1 (``cu_seqlens``), or with
    ``packed=0`` B sequences of T tokens. The forward and (with ``step``) a decode step, or
    with ``backward`` the backward (recomputation included). DeltaProduct (``householder``
    = n) launches its one-step core over ``T · n`` rows, DPLR Comba's over ``2 T`` (:mod:`linattn.steps`)."""
    if spec.householder > 1 or spec.correction is Correction.DPLR:
        from .steps import core_of, dplr_core

        core, n = (dplr_core(spec), 2) if spec.correction is Correction.DPLR else (core_of(spec)[0], spec.householder)
        return captured_launches(core, dtype, K, V, T=T * n, H=H, HV=HV, B=B, packed=packed, step=step,
                                 backward=backward, **options)
    op = compile_spec(spec, **options)
    if packed and B != 1:
        raise ValueError(f"B: packed sequences are batch 1, got B={B}")
    call = _meta_call(spec, _DTYPES[dtype], B, T, H, HV, K, V, N=packed)
    with torch.no_grad():
        if backward:
            saved: dict = {}
            with runtime.capture():  # the forward only provides the saved buffers (meta)
                op._forward(call, False, keep=saved)
            with runtime.capture() as launches:
                do = torch.empty(B, T, HV, V, dtype=_DTYPES[dtype], device="meta")
                # and what the custom op does with the gradients (its torch ops show in a dispatch counter)
                custom_ops.finish_grads(op, call, op._backward(call, saved, do, None))
            return launches
        with runtime.capture() as launches:
            op._forward(call, False)
            if not step:
                return launches
            one = _meta_call(spec, _DTYPES[dtype], 64, 1, H, HV, K, V)  # a token for each of 64 sequences
            state = torch.empty(64, HV, K, V, dtype=torch.float32, device="meta")
            op.step(one.q, one.k, one.v, state, z=one.z, D=one.D, **one.named)
        return launches


def launch_bytes(kernel, sizes: dict[str, int], args: dict, resident: float = math.inf) -> tuple[int, int]:
    """``(read, written)`` bytes of one launch of ``kernel`` (its manifest entry) with ``args``
    (the tensors passed, with their element sizes: the core backward reads the computed
    β the forward kept in fp32): unique, or with ``resident`` programs at once the likely HBM traffic of its re-reads."""
    present = {n for n, v in args.items() if v is not None}
    items = {n: v.element_size() for n, v in args.items() if isinstance(v, torch.Tensor)}
    return hbm_bytes(kernel, sizes, resident, present, items)


def inspect_spec(spec: Spec, dtype: str = "bf16", K: int = 128, V: int = 128, arch: int = 90,
                 backward: bool = False, **options) -> list[KernelReport]:
    """Compile every kernel a call of ``spec`` launches (each once) for ``sm_<arch>``; report its resources."""
    reports: dict[str, KernelReport] = {}
    for launch in captured_launches(spec, dtype, K, V, backward=backward, **options):
        name = launch.fn.__name__
        if name not in reports:
            report = compile_launch(launch.fn, launch.args, launch.num_warps, launch.num_stages, arch, launch.kernel.name)
            read, written = launch_bytes(launch.kernel, launch.sizes, launch.args)
            reports[name] = dataclasses.replace(report, bytes_read=read, bytes_written=written)
    return list(reports.values())
