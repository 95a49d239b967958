"""Printing a term's sympy expression as Triton source.

The same tree walk as the torch evaluator (:func:`linattn.expr.walk`), with string
operations: what a term means is defined once, in :mod:`linattn.expr`.
"""
from __future__ import annotations

import itertools
import re
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


def _mul(xs: list[str]) -> str:
    if xs[0] == "-1.0" and len(xs) > 1:  # sympy's sign: a negation (exact, as the product by -1 is)
        return "(-" + _mul(xs[1:]) + ")" if len(xs) > 2 else f"(-{xs[1]})"
    return "(" + " * ".join(xs) + ")"


def _add(xs: list[str]) -> str:
    text = xs[0]
    for x in xs[1:]:  # a + (-b) as a - b (the same rounding)
        text += f" - {x[2:-1]}" if x.startswith("(-") else f" + {x}"
    return f"({text})"


_OPS = {
    "number": lambda x: repr(float(x)),
    "add": _add,
    "mul": _mul,
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


_SIMPLE = re.compile(r"[\w.]+(\[[\w:, ]*\])?")  # a variable, a number, or an indexed variable


def assign(targets: list[tuple], name: Callable[[str], str], temp: str = "t_") -> list[str]:
    """Statements setting each ``(variable, expression[, template])`` of ``targets``, as one
    would write them by hand: subexpressions shared by the targets computed once
    (``sympy.cse``), and an argument that a function's text repeats (softplus's threshold
    test, ``x²``) bound to a temporary first. Temporaries are named ``<temp><n>``; a
    template (``"{} + tl.zeros([C], dtype=tl.float32)"``) wraps a target's final value."""
    lines: list[str] = []
    counter = itertools.count()

    def bind(x: str) -> str:
        if _SIMPLE.fullmatch(x):
            return x
        var = f"{temp}{next(counter)}"
        lines.append(f"{var} = {x}")
        return var

    ops = dict(_OPS)
    ops["softplus"] = lambda x: _OPS["softplus"](bind(x))
    ops["inside"] = lambda x, lo, hi: _OPS["inside"](bind(x), lo, hi)
    ops["pow"] = lambda x, p: _OPS["pow"](bind(x) if p == 2 else x, p)
    shared: dict[sp.Symbol, str] = {}

    def leaf(sym: sp.Symbol) -> str:
        return shared[sym] if sym in shared else name(sym.name)

    symbols = (sp.Dummy(f"cse{i}") for i in itertools.count())
    replacements, reduced = sp.cse([t[1] for t in targets], symbols=symbols)
    for sym, sub in replacements:
        text = _expr.walk(sub, leaf, ops)
        var = f"{temp}{next(counter)}"
        lines.append(f"{var} = {text}")
        shared[sym] = var
    for target, e in zip(targets, reduced):
        template = target[2] if len(target) > 2 else "{}"
        lines.append(f"{target[0]} = {template.format(_expr.walk(e, leaf, ops))}")
    return lines
