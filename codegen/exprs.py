"""Printing a term's sympy expression as Triton source.

The same tree walk as the torch evaluator (:func:`linattn.expr.walk`), with string
operations: what a term means is defined once, in :mod:`linattn.expr`.
"""
from __future__ import annotations

from collections.abc import Callable

import sympy as sp

from linattn import expr as _expr


def _pow(x: str, p: float) -> str:
    if p == 1:
        return x
    if p == 2:
        return f"({x} * {x})"
    if p == -1:
        return f"(1.0 / {x})"
    if p == 0.5:
        return f"tl.sqrt({x})"
    if p == -0.5:
        return f"(1.0 / tl.sqrt({x}))"
    return f"tl.exp({p!r} * tl.log({x}))"


_OPS = {
    "number": lambda x: repr(float(x)),
    "add": lambda xs: "(" + " + ".join(xs) + ")",
    "mul": lambda xs: "(" + " * ".join(xs) + ")",
    "pow": _pow,
    "exp": lambda x: f"tl.exp({x})",
    "log": lambda x: f"tl.log({x})",
    # above the threshold softplus is the identity; below it exp cannot overflow
    "softplus": lambda x: f"tl.where({x} > {_expr.SOFTPLUS_THRESHOLD!r}, {x}, tl.log(1.0 + tl.exp({x})))",
    "sigmoid": lambda x: f"(1.0 / (1.0 + tl.exp(-{x})))",
    "clamp": lambda x, lo, hi: f"tl.minimum(tl.maximum({x}, {lo}), {hi})",
    "inside": lambda x, lo, hi: f"(({x} >= {lo}) & ({x} <= {hi})).to(tl.float32)",
}


def to_triton(expr: sp.Expr, name: Callable[[str], str]) -> str:
    """Triton source for ``expr``; ``name`` maps an operand to the variable holding it."""
    return _expr.walk(expr, lambda s: name(s.name), _OPS)
