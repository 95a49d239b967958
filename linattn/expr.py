"""Symbolic parameterizations of gates and β.

A spec's gate (``g = log a``) and write strength ``β`` may be computed inside the kernel
from raw per-token inputs and per-head parameters (``g = -exp(A_log)·softplus(a +
dt_bias)``, ``β = sigmoid(b)``, Mamba's ``dt = softplus(dt + dt_bias)``). They are held
as sympy expressions because the backward needs their derivatives and because one
expression tree can be printed both as torch calls (reference, torch path) and as Triton
source (codegen). This module defines the few functions such expressions may use, with
their derivatives and signs (sympy assumptions: ``softplus(x).is_positive`` for a real
``x``, which is how a spec tells a gate that cannot decay), and the tree walk that
evaluates them.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import sympy as sp

__all__ = ["softplus", "sigmoid", "clamp", "inside", "FUNCTIONS", "check_supported", "walk"]

#: Above this argument softplus is the identity (torch's and the kernels' convention).
SOFTPLUS_THRESHOLD = 20.0


def _all_real(args) -> bool:
    return all(a.is_real for a in args)


class _RealFunction(sp.Function):
    """A function that is real and finite where all its arguments are real."""

    def _eval_is_extended_real(self) -> bool | None:
        return True if _all_real(self.args) else None

    def _eval_is_finite(self) -> bool | None:
        return True if _all_real(self.args) else None


class _PositiveFunction(_RealFunction):
    """A function that is positive where its argument is real."""

    def _eval_is_extended_positive(self) -> bool | None:
        return True if _all_real(self.args) else None


class softplus(_PositiveFunction):
    """``log(1 + exp(x))``; evaluated as the identity above ``SOFTPLUS_THRESHOLD``."""

    nargs = 1

    def fdiff(self, argindex: int = 1) -> sp.Expr:
        return sigmoid(self.args[0])


class sigmoid(_PositiveFunction):
    """``1 / (1 + exp(-x))``."""

    nargs = 1

    def fdiff(self, argindex: int = 1) -> sp.Expr:
        s = sigmoid(self.args[0])
        return s * (1 - s)


class inside(_RealFunction):
    """1 where ``lo <= x <= hi``, else 0: the derivative of :class:`clamp`."""

    nargs = 3

    def _eval_is_extended_nonnegative(self) -> bool | None:
        return True if _all_real(self.args) else None

    def fdiff(self, argindex: int = 1) -> sp.Expr:
        return sp.S.Zero


class clamp(_RealFunction):
    """``min(max(x, lo), hi)``. The bounds are runtime constants: no gradient flows to them.

    Its sign follows from the bounds': in ``[lo, hi]`` when ``lo <= hi``, else ``hi``.
    """

    nargs = 3

    def _eval_is_extended_positive(self) -> bool | None:
        _, lo, hi = self.args
        if _all_real(self.args):
            if lo.is_extended_positive and hi.is_extended_positive:
                return True
            if hi.is_extended_nonpositive:
                return False
        return None

    def _eval_is_extended_nonnegative(self) -> bool | None:
        _, lo, hi = self.args
        if _all_real(self.args):
            if lo.is_extended_nonnegative and hi.is_extended_nonnegative:
                return True
            if hi.is_extended_negative:
                return False
        return None

    def _eval_is_extended_negative(self) -> bool | None:
        _, lo, hi = self.args
        if _all_real(self.args):
            if hi.is_extended_negative:
                return True
            if lo.is_extended_nonnegative and hi.is_extended_nonnegative:
                return False
        return None

    def _eval_is_extended_nonpositive(self) -> bool | None:
        _, lo, hi = self.args
        if _all_real(self.args):
            if hi.is_extended_nonpositive:
                return True
            if lo.is_extended_positive and hi.is_extended_positive:
                return False
        return None

    def fdiff(self, argindex: int = 1) -> sp.Expr:
        if argindex == 1:
            return inside(*self.args)
        return sp.S.Zero


#: Names usable in the text form of a term (see :func:`linattn.spec.term`).
FUNCTIONS: dict[str, Any] = {
    "exp": sp.exp,
    "log": sp.log,
    "sqrt": sp.sqrt,
    "softplus": softplus,
    "sigmoid": sigmoid,
    "clamp": clamp,
}

_FUNCTION_NODES = (sp.exp, sp.log, softplus, sigmoid, clamp, inside)


def check_supported(expr: sp.Expr) -> None:
    """Raise ValueError if ``expr`` uses anything the evaluators cannot print."""
    for node in sp.preorder_traversal(expr):
        if node.is_Atom and node.is_number and (
            not node.is_finite or (node.is_extended_real and not math.isfinite(float(node)))
        ):
            shown = float(node) if node.is_extended_real else node
            raise ValueError(f"non-finite constant {shown} in expression {expr}")
        if isinstance(node, (sp.Symbol, sp.Number, sp.Add, sp.Mul, sp.Pow)):
            continue
        if isinstance(node, sp.Function) and node.func in _FUNCTION_NODES:
            continue
        if node in (sp.S.Exp1,):
            continue
        raise ValueError(
            f"unsupported construct {node!r} ({type(node).__name__}) in expression {expr}; "
            f"allowed: + - * / **, numbers, and {', '.join(FUNCTIONS)}"
        )


def walk(expr: sp.Expr, leaf: Callable[[sp.Symbol], Any], ops: Mapping[str, Callable[..., Any]]) -> Any:
    """Fold ``expr`` bottom-up.

    ``leaf`` maps a symbol to a value; ``ops`` gives ``add, mul, pow, number`` and one
    callable per function name (``exp, log, softplus, sigmoid, clamp, inside``). The same
    walk serves torch evaluation and source printing.
    """

    def go(e: sp.Expr) -> Any:
        if isinstance(e, sp.Symbol):
            return leaf(e)
        if e is sp.S.Exp1:
            return ops["number"](float(sp.E))
        if isinstance(e, sp.Number):
            return ops["number"](float(e))
        if isinstance(e, sp.Add):
            return ops["add"]([go(a) for a in e.args])
        if isinstance(e, sp.Mul):
            return ops["mul"]([go(a) for a in e.args])
        if isinstance(e, sp.Pow):
            base, exponent = e.args
            if isinstance(exponent, sp.Number):
                return ops["pow"](go(base), float(exponent))
            return ops["exp"](ops["mul"]([go(exponent), ops["log"](go(base))]))
        if isinstance(e, sp.Function):
            name = e.func.__name__
            return ops[name](*[go(a) for a in e.args])
        raise ValueError(f"cannot evaluate {e!r}")

    return go(expr)
