"""The compiled ops as torch custom ops: autograd, and ``torch.compile(fullgraph=True)`` traces through them.

One op serves every spec: ``linattn::forward``. A compiled op is registered under a key
(its spec and options); the custom op takes the key and the tensors (operands in the
spec's operand order, scalars apart) and returns fixed-arity outputs (empty tensors where
the Python API has ``None``). Its fake implementation gives shapes from the inputs alone,
so tracing never runs a kernel. ``linattn::backward`` is its registered gradient: the
backward kernels plus the layer-side terms differentiated by hand (no autograd inside).
"""
from __future__ import annotations

import hashlib

import torch

from linattn.codegen import manifest

from .inputs import check_call
from .spec import Role

__all__ = ["register", "forward", "finish_grads"]

_REGISTRY: dict = {}
#: the forward's buffers the backward reuses, in the custom op's output order
SAVED = ("G", "Tm", "Aqk", "beta", "Gx")


def register(op) -> str:
    """The key under which the custom ops find ``op`` (stable for equal specs and options)."""
    from linattn.codegen.plan import spec_key

    key = hashlib.sha256(f"{spec_key(op.spec)}|{op.options}".encode()).hexdigest()[:20]
    _REGISTRY.setdefault(key, op)  # equal specs and options: the first op serves them all
    return key


def lookup(key: str):
    """The compiled op registered under ``key``."""
    return _REGISTRY[key]


def tensor_names(spec) -> list[str]:
    """The names of the custom op's ``operands`` list: the terms' tensor operands, then the
    correction's key-shaped inputs (Comba's ``p``)."""
    return [o.name for o in spec.operands if o.role is not Role.SCALAR] + list(spec.correction_inputs)


def _call(op, q, k, v, operands, scalars, z, D, h0, cu_seqlens, scale):
    values = dict(zip(tensor_names(op.spec), operands))
    values.update(zip((o.name for o in op.spec.operands if o.role is Role.SCALAR), scalars))
    return check_call(
        op.spec, q, k, v, values, z=z, D=D, scale=scale, initial_state=h0, cu_seqlens=cu_seqlens, check_values=False
    )


def _empty(like: torch.Tensor) -> torch.Tensor:
    return like.new_empty(0)


@torch.library.custom_op("linattn::forward", mutates_args=())
def _forward(
    key: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    operands: list[torch.Tensor],
    scalars: list[float],
    z: torch.Tensor | None,
    D: torch.Tensor | None,
    h0: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    scale: float,
    output_final_state: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    op = _REGISTRY[key]
    call = _call(op, q, k, v, operands, scalars, z, D, h0, cu_seqlens, scale)
    saved: dict = {}
    o, ht = op._forward(call, output_final_state, keep=saved)
    # the buffers the forward wrote and the backward reuses (a β operand is saved as an input)
    kept = [saved[n] if n in saved else _empty(q) for n in SAVED]
    return o, (ht if ht is not None else _empty(q)), *kept


@_forward.register_fake
def _(key, q, k, v, operands, scalars, z, D, h0, cu_seqlens, scale, output_final_state):
    """The outputs' shapes and dtypes from the manifest of the module the call would run."""
    from .op import _DTYPE_NAMES, TORCH_DTYPES, saved_buffers

    op = _REGISTRY[key]
    B, T, _, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    gen = op.module(_DTYPE_NAMES[q.dtype], K, V)[0]
    sizes = {"TT": B * T, "N": N, "HV": HV, **manifest.constants(gen.plan)}
    table = manifest.buffers(gen.plan)

    def empty(name: str, shape=None) -> torch.Tensor:
        dtype, dims = table[name]
        return q.new_empty(shape or manifest.resolve(dims, sizes), dtype=TORCH_DTYPES[dtype])

    kept = saved_buffers(gen)
    return (
        empty("o", (B, T, HV, V)),
        empty("ht") if output_final_state else empty("ht", (0,)),
        *(empty(n) if n in kept else _empty(q) for n in SAVED),  # as the real op: an empty tensor like q
    )


@torch.library.custom_op("linattn::backward", mutates_args=())
def _backward(
    key: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    operands: list[torch.Tensor],
    scalars: list[float],
    z: torch.Tensor | None,
    D: torch.Tensor | None,
    h0: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    scale: float,
    kept: list[torch.Tensor],
    do: torch.Tensor,
    dht: torch.Tensor | None,
) -> list[torch.Tensor]:
    op = _REGISTRY[key]
    call = _call(op, q, k, v, operands, scalars, z, D, h0, cu_seqlens, scale)
    saved = {n: t for n, t in zip(SAVED, kept) if t.numel()}  # the forward's buffers of SAVED (empty: not written)
    grads = op._backward(call, saved, do, dht)
    return finish_grads(op, call, grads, (*kept, do, dht))


@_backward.register_fake
def _(key, q, k, v, operands, scalars, z, D, h0, cu_seqlens, scale, kept, do, dht):
    return [t.new_empty(t.shape) if t is not None else q.new_empty(0) for t in (q, k, v, *operands, z, D, h0)]


def _setup(ctx, inputs, output):
    key, q, k, v, operands, scalars, z, D, h0, cu_seqlens, scale, _ = inputs
    kept = output[2:]
    ctx.key, ctx.scalars, ctx.scale, ctx.n = key, scalars, scale, len(operands)
    ctx.has = (z is not None, D is not None, h0 is not None, cu_seqlens is not None)
    ctx.save_for_backward(q, k, v, *operands, *kept, *(t for t in (z, D, h0, cu_seqlens) if t is not None))


def _backward_rule(ctx, do, dht, *_):
    saved = list(ctx.saved_tensors)
    n = ctx.n
    m = 3 + n + len(SAVED)
    q, k, v, operands, kept = saved[0], saved[1], saved[2], saved[3 : 3 + n], saved[3 + n : m]
    rest = iter(saved[m:])
    z, D, h0, cu = (next(rest) if has else None for has in ctx.has)
    dht = dht if dht is not None and dht.numel() else None
    grads = _backward(ctx.key, q, k, v, operands, ctx.scalars, z, D, h0, cu, ctx.scale, list(kept), do, dht)
    dq, dk, dv, *rest_grads = grads
    dops, (dz, dD, dh0) = rest_grads[:n], rest_grads[n:]
    keep = lambda g, t: g if t is not None and g.numel() else None  # noqa: E731
    return (
        None, dq, dk, dv, [keep(g, t) for g, t in zip(dops, operands)], [] if not ctx.scalars else None,  # (a float list is a pytree leaf unless empty)
        keep(dz, z), keep(dD, D), keep(dh0, h0), None, None, None,
    )


_forward.register_autograd(_backward_rule, setup_context=_setup)


def finish_grads(op, call, grads: dict, others=()) -> list[torch.Tensor]:
    """The custom op's gradient outputs: one per tensor argument of ``call`` in order (empty
    where it has none), each in its input's dtype. A custom op's outputs may alias neither
    each other nor its inputs (``others``: its other tensor arguments), so a gradient is
    copied only where it would."""
    q = call.q
    given = call.named
    order = [("q", q), ("k", call.k), ("v", call.v), *((n, given[n]) for n in tensor_names(op.spec)), ("z", call.z),
             ("D", call.D), ("initial_state", call.initial_state)]
    real = q.device.type != "meta"  # meta tensors have no storage to alias (the static report runs on them)
    taken = {t.untyped_storage().data_ptr() for _, t in order if t is not None and t.numel() and real}
    taken |= {t.untyped_storage().data_ptr() for t in others if t is not None and t.numel() and real}
    out = []
    for n, t in order:
        if t is None or n not in grads:
            out.append(_empty(q))
            continue
        g = grads[n].to(t.dtype)  # a no-op where a kernel wrote the input's dtype
        if real and g.numel() and g.untyped_storage().data_ptr() in taken:
            g = g.clone()
        if real:
            taken.add(g.untyped_storage().data_ptr())
        out.append(g)
    return out


def forward(op, call, output_final_state: bool):
    """Run ``op`` on a validated call through the custom op (what torch.compile sees)."""
    key = op.key
    given = call.named
    tensors = [given[n] for n in tensor_names(op.spec)]
    scalars = [float(call.operands[o.name]) for o in op.spec.operands if o.role is Role.SCALAR]
    o, ht, *_ = _forward(
        key, call.q, call.k, call.v, tensors, scalars, call.z, call.D, call.initial_state, call.cu_seqlens,
        call.scale, output_final_state,
    )
    return o, (ht if output_final_state else None)
