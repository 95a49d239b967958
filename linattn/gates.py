"""The gate and β parameterizations used by today's hybrid models, as terms.

Each is what a layer computes from its projections before the recurrence; a spec that
holds one lets the kernel compute it in registers (and differentiate it) instead of
materialising ``g`` and ``β`` in HBM.
"""
from __future__ import annotations

from .spec import Term, term

__all__ = ["softplus_gate", "lower_bound_gate", "sigmoid_beta", "mamba_dt", "mamba_gate", "mamba_dt_text"]


def softplus_gate(channel: bool = False) -> Term:
    """``g = -exp(A_log) · softplus(a + dt_bias)`` (Qwen3-Next's GDN; Kimi's KDA per channel).

    ``A_log`` is per head; ``a`` and ``dt_bias`` are per channel when ``channel``.
    """
    tok, par = ("token_channel", "head_channel") if channel else ("token", "head")
    return term("-exp(A_log) * softplus(a + dt_bias)", a=tok, A_log="head", dt_bias=par)


def lower_bound_gate(channel: bool = True) -> Term:
    """``g = lower_bound · sigmoid(exp(A_log) · (a + dt_bias))``: a gate bounded below."""
    tok, par = ("token_channel", "head_channel") if channel else ("token", "head")
    return term(
        "lower_bound * sigmoid(exp(A_log) * (a + dt_bias))",
        a=tok,
        A_log="head",
        dt_bias=par,
        lower_bound="scalar",
    )


def sigmoid_beta() -> Term:
    """``β = sigmoid(b)``."""
    return term("sigmoid(b)", b="token")


def mamba_dt_text(softplus: bool = True, bias: bool = True, limit: bool = False) -> tuple[str, dict[str, str]]:
    """Mamba-2's step size as the text of a term and the roles of its operands (unparsed).

    The text is what :func:`mamba_dt` parses: ``dt``, then ``(dt + dt_bias)`` with ``bias``,
    wrapped in ``softplus(...)`` with ``softplus`` and in ``clamp(..., dt_min, dt_max)`` with
    ``limit``. Roles: ``dt`` ``"token"``, ``dt_bias`` ``"head"``, ``dt_min`` and ``dt_max``
    ``"scalar"`` (only those the text names). Plain strings, so a caller can build a term
    from them later (or key a cache on them) without parsing anything now.

    >>> mamba_dt_text(softplus=True, bias=True, limit=False)
    ('softplus((dt + dt_bias))', {'dt': 'token', 'dt_bias': 'head'})
    """
    text, roles = "dt", {"dt": "token"}
    if bias:
        text, roles = f"({text} + dt_bias)", {**roles, "dt_bias": "head"}
    if softplus:
        text = f"softplus({text})"
    if limit:
        text, roles = f"clamp({text}, dt_min, dt_max)", {**roles, "dt_min": "scalar", "dt_max": "scalar"}
    return text, roles


def mamba_dt(softplus: bool = True, bias: bool = True, limit: bool = False) -> Term:
    """Mamba-2's step size, which is also its β: ``dt = clamp(softplus(dt + dt_bias), dt_min, dt_max)``."""
    text, roles = mamba_dt_text(softplus, bias, limit)
    return term(text, **roles)


def mamba_gate(softplus: bool = True, bias: bool = True, limit: bool = False) -> Term:
    """Mamba-2's log-decay ``g = A · dt`` with ``A < 0`` per head and ``dt`` as in :func:`mamba_dt`."""
    text, roles = mamba_dt_text(softplus, bias, limit)
    return term(f"A * {text}", A="head", **roles)
