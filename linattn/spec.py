"""The recurrence DSL: a frozen, hashable description of one linear-attention recurrence.

Per head, with state ``S`` (K x V, fp32)::

    S_t = C_t · D_t · S_{t-1} + β_t k_t v_tᵀ        o_t = scale · S_tᵀ q_t

where the decay ``D_t`` is none, ``exp(g_t)·I`` (scalar) or ``Diag(exp(g_t))`` (channel),
and the correction ``C_t`` is ``I`` or the delta rule's ``I - β_t k_t k_tᵀ``. ``g`` and
``β`` are :class:`Term` s: sympy expressions over named runtime operands (raw per-token
inputs and per-head parameters), so a kernel can fuse a gate parameterization and still
differentiate it. Layer-side terms (L2-normalised q/k, the ``D`` skip, the ``silu(z)``
output gate) are flags a kernel may fuse.

A :class:`Spec` holds structure only; sizes (B, T, heads, K, V) and values (scale,
parameters) are given at call time.
"""
from __future__ import annotations

import dataclasses
import difflib
import keyword
import math
import re
from dataclasses import dataclass, field
from enum import Enum

import sympy as sp

from . import expr as _expr

__all__ = [
    "Decay",
    "Correction",
    "CORRECTION_INPUTS",
    "Skip",
    "OutputGate",
    "Role",
    "Operand",
    "Term",
    "Spec",
    "term",
    "RESERVED_NAMES",
    "ROLE_SHAPES",
]


class _Choice(str, Enum):
    """A string-valued enum whose constructor error lists the valid values."""

    @classmethod
    def coerce(cls, value: object, what: str):
        if isinstance(value, cls):
            return value
        try:
            return cls(value)
        except ValueError:
            valid = ", ".join(repr(m.value) for m in cls)
            raise ValueError(f"{what} must be one of {valid}; got {value!r}") from None

    def __str__(self) -> str:
        return self.value


class Decay(_Choice):
    """How the state forgets: not at all, by one factor per head and token, or per key channel."""

    NONE = "none"
    SCALAR = "scalar"
    CHANNEL = "channel"


class Correction(_Choice):
    """How the transition changes the state beyond its decay, before the write.

    ``none``; ``delta``: ``(I - β_t k_t k_tᵀ)`` (the delta rule: the write first removes
    what the state associates with ``k_t``); ``comba``: ``(I - β_t k_t p_tᵀ)``, reading the
    state along a separate key ``p_t``; ``dplr``: a diagonal-plus-low-rank transition
    ``(D_t + b_t a_tᵀ)`` with per-token vectors ``a_t`` and ``b_t`` (IPLR without decay).
    """

    NONE = "none"
    DELTA = "delta"
    COMBA = "comba"
    DPLR = "dplr"


#: The key-shaped inputs ``[B, T, H, K]`` each correction reads besides q and k.
CORRECTION_INPUTS = {Correction.NONE: (), Correction.DELTA: (), Correction.COMBA: ("p",), Correction.DPLR: ("a", "b")}


class Skip(_Choice):
    """``o_t += D ⊙ v_t`` with ``D`` per value head, or per value head and value channel."""

    NONE = "none"
    HEAD = "head"
    CHANNEL = "channel"


class OutputGate(_Choice):
    """``o_t *= silu(z_t)`` with ``z`` shaped like ``v`` (Mamba-2's gate)."""

    NONE = "none"
    SILU = "silu"


class Role(_Choice):
    """What one operand of a term is, and so its shape at call time.

    ``token``: ``[B, T, HV]``; ``token_channel``: ``[B, T, HV, K]``; ``head``: ``[HV]``;
    ``head_channel``: ``[HV, K]``; ``scalar``: one Python number per call.
    """

    TOKEN = "token"
    TOKEN_CHANNEL = "token_channel"
    HEAD = "head"
    HEAD_CHANNEL = "head_channel"
    SCALAR = "scalar"

    @property
    def per_channel(self) -> bool:
        return self in (Role.TOKEN_CHANNEL, Role.HEAD_CHANNEL)

    @property
    def per_token(self) -> bool:
        return self in (Role.TOKEN, Role.TOKEN_CHANNEL)

    @property
    def shape(self) -> str:
        """The operand's shape at call time, in words."""
        return ROLE_SHAPES[self]

    @classmethod
    def summary(cls) -> str:
        """Every role with its shape, for messages."""
        return ", ".join(f"{r.value} {r.shape}" for r in cls)

    @classmethod
    def coerce(cls, value: object, what: str) -> Role:
        try:
            return super().coerce(value, what)
        except ValueError as err:
            raise ValueError(f"{err} (the roles' shapes: {cls.summary()})") from None


#: What each role's operand is at call time.
ROLE_SHAPES = {
    Role.TOKEN: "[B, T, HV]",
    Role.TOKEN_CHANNEL: "[B, T, HV, K]",
    Role.HEAD: "[HV]",
    Role.HEAD_CHANNEL: "[HV, K]",
    Role.SCALAR: "(a Python number)",
}


#: The epsilon of ``qk_l2norm``: ``x / sqrt(Σ x² + eps)``, in every implementation.
QK_L2NORM_EPS = 1e-6

#: Argument names of a call; operands of terms may not take them.
RESERVED_NAMES = frozenset(
    {"q", "k", "v", "z", "D", "scale", "initial_state", "output_final_state", "cu_seqlens", "chunk_size"}
)


@dataclass(frozen=True)
class Operand:
    """A named runtime value a term reads: a per-token input or a parameter."""

    name: str
    role: Role

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.isidentifier() or keyword.iskeyword(self.name):
            raise ValueError(f"operand name must be a Python identifier (not a keyword); got {self.name!r}")
        if self.name in RESERVED_NAMES:
            raise ValueError(f"operand name {self.name!r} is reserved for a call argument")
        object.__setattr__(self, "role", Role.coerce(self.role, f"role of operand {self.name!r}"))

    @property
    def symbol(self) -> sp.Symbol:
        return sp.Symbol(self.name, real=True)


@dataclass(frozen=True)
class Term:
    """A scalar expression over operands, evaluated elementwise per (token, head[, channel])."""

    expr: sp.Expr
    operands: tuple[Operand, ...]

    def __post_init__(self) -> None:
        operands = tuple(sorted(self.operands, key=lambda o: o.name))
        names = [o.name for o in operands]
        if len(set(names)) != len(names):
            raise ValueError(f"term operands repeat a name: {names}")
        expr = sp.sympify(self.expr)
        # Normalise every symbol to a real one so equal expressions compare (and hash) equal.
        expr = expr.xreplace({s: sp.Symbol(s.name, real=True) for s in expr.free_symbols})
        _expr.check_supported(expr)
        free = {s.name for s in expr.free_symbols}
        if free - set(names):
            raise ValueError(f"expression {expr} uses undeclared operand(s) {sorted(free - set(names))}")
        if set(names) - free:
            raise ValueError(f"operand(s) {sorted(set(names) - free)} do not appear in expression {expr}")
        if not any(o.role is not Role.SCALAR for o in operands):
            raise ValueError(f"expression {expr} reads no per-token or per-head operand")
        object.__setattr__(self, "operands", operands)
        object.__setattr__(self, "expr", expr)

    @classmethod
    def identity(cls, name: str, role: Role | str) -> Term:
        """The term that is just one input, given as is."""
        return cls(sp.Symbol(name, real=True), (Operand(name, Role.coerce(role, "role")),))

    @property
    def per_channel(self) -> bool:
        return any(o.role.per_channel for o in self.operands)

    @property
    def is_identity(self) -> bool:
        return isinstance(self.expr, sp.Symbol)

    def diff(self, name: str) -> sp.Expr:
        """Derivative of the term with respect to operand ``name``."""
        return sp.diff(self.expr, sp.Symbol(name, real=True))

    def __str__(self) -> str:
        return sp.sstr(self.expr)

    def __repr__(self) -> str:
        ops = ", ".join(f"{o.name}={o.role.value}" for o in self.operands)
        return f"term({str(self)!r}, {ops})"


#: What the text of a term may hold: numbers, ASCII names, operators, parentheses and commas.
#: (ASCII only: Python folds other identifiers, so "ｅｘｅｃ" would be evaluated as "exec".)
_TOKEN = re.compile(
    r"\s+|(?P<number>(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?)|(?P<name>[A-Za-z_][A-Za-z0-9_]*)|\*\*|[-+*/(),]"
)


def _names(text: str) -> tuple[set[str], set[str]]:
    """The names ``text`` uses as values and as functions; ValueError for any other character."""
    values: set[str] = set()
    calls: set[str] = set()
    pos = 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            hint = "; use ** for powers" if text[pos] == "^" else ""
            raise ValueError(
                f"cannot parse term {text!r}: unexpected {text[pos]!r} at position {pos}{hint} "
                "(a term holds operand names, numbers, + - * / **, parentheses, commas and known functions)"
            )
        if m["name"] and keyword.iskeyword(m["name"]):
            raise ValueError(f"cannot parse term {text!r}: Python keyword {m['name']!r} at position {pos}")
        if m["name"]:
            (calls if text[m.end():].lstrip().startswith("(") else values).add(m["name"])
        pos = m.end()
    return values, calls


def term(text: str, **roles: Role | str) -> Term:
    """Parse a term from text, declaring each operand's role by keyword.

    The text holds the operands, numbers, ``+ - * / **``, parentheses and the functions of
    :data:`linattn.expr.FUNCTIONS`; anything else (an unknown name included) is a ValueError
    that quotes the text. Roles and their shapes at call time: ``token`` ``[B, T, HV]``,
    ``token_channel`` ``[B, T, HV, K]``, ``head`` ``[HV]``, ``head_channel`` ``[HV, K]``,
    ``scalar`` (a Python number).

    >>> term("-exp(A_log) * softplus(a + dt_bias)", a="token", A_log="head", dt_bias="head")
    term('-exp(A_log)*softplus(a + dt_bias)', A_log=head, a=token, dt_bias=head)
    """
    if not isinstance(text, str):
        raise ValueError(f"term text must be a str; got {type(text).__name__} {text!r}")
    if not text.strip():
        raise ValueError(f"cannot parse term {text!r}: it is empty")
    # Only declared operands and known functions reach sympify (which evaluates the text).
    values, calls = _names(text)
    undeclared = sorted(values - set(roles) - set(_expr.FUNCTIONS))
    if undeclared:
        example = ", ".join(f"{n}='token'" for n in undeclared)
        raise ValueError(
            f"term {text!r} uses undeclared operand(s) {undeclared}; declare each with its role, e.g. {example} "
            f"(roles: {Role.summary()})"
        )
    unknown = sorted(calls - set(_expr.FUNCTIONS) - set(roles))
    if unknown:
        close = [m for n in unknown for m in difflib.get_close_matches(n, _expr.FUNCTIONS, 1)]
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(
            f"term {text!r} calls unknown function(s) {unknown}{hint} (known functions: {', '.join(_expr.FUNCTIONS)})"
        )
    local = dict(_expr.FUNCTIONS)
    local.update({name: sp.Symbol(name, real=True) for name in roles})
    try:
        parsed = sp.sympify(text, locals=local)
    except Exception as err:  # sympify raises many types (SyntaxError, TokenError, TypeError for arity, ...)
        err = getattr(err, "base_exc", None) or err  # the parser's error inside a SympifyError
        raise ValueError(f"cannot parse term {text!r}: {type(err).__name__}: {err}") from None
    if not isinstance(parsed, sp.Expr):
        raise ValueError(f"cannot parse term {text!r}: not one expression (got {type(parsed).__name__})")
    try:
        return Term(parsed, tuple(Operand(n, r) for n, r in roles.items()))
    except ValueError as err:
        raise ValueError(f"term {text!r}: {err}") from None


@dataclass(frozen=True)
class Spec:
    """One recurrence, by its terms. Frozen and hashable: the compile cache keys on it.

    Arguments:
        decay: ``"none" | "scalar" | "channel"``.
        correction: ``"none" | "delta" | "comba" | "dplr"`` (see :class:`Correction`); the
            last two read key-shaped inputs ``p``, or ``a`` and ``b``, given by name at call time.
        householder: with the delta rule, the number ``n`` of delta-rule steps per token
            (DeltaProduct): the decay, then ``n`` writes with their own ``k``, ``v`` and ``β``
            (``T·n`` rows of them), then the output. Default 1.
        read_before_decay: with the delta rule or Comba, the correction reads the state
            before the token's decay: ``S_t = (D_t - β_t k_t r_tᵀ) S_(t-1) + β_t k_t v_tᵀ``
            (``r`` = ``k``, or Comba's ``p``) instead of ``(I - β_t k_t r_tᵀ) D_t S_(t-1) + ...``.
            DPLR's transition runs on this form. Default False.
        gate: the log-decay ``g <= 0``; default (for a decaying spec) the input ``g`` itself.
            A term that can only be ``>= 0`` (``softplus(a)``, ``exp(x)``) is a ValueError.
        beta: ``False`` (no write strength), ``True`` (the input ``beta``) or a term.
        qk_l2norm: L2-normalise q and k per head before the recurrence.
        skip: ``o += D ⊙ v`` with ``D`` per head (``"head"``) or per head and channel.
        output_gate: ``"silu"`` multiplies the output by ``silu(z)``.
        default_scale: the scale used when a call gives none; ``None`` means ``K ** -0.5``.
        name: a label for display; not part of the spec's identity.
    """

    decay: Decay = Decay.NONE
    correction: Correction = Correction.NONE
    gate: Term | None = None
    beta: Term | bool | None = None
    qk_l2norm: bool = False
    skip: Skip = Skip.NONE
    output_gate: OutputGate = OutputGate.NONE
    default_scale: float | None = None
    householder: int = 1
    read_before_decay: bool = False
    name: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        setf = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        setf("decay", Decay.coerce(self.decay, "decay"))
        setf("correction", Correction.coerce(self.correction, "correction"))
        setf("skip", Skip.coerce(self.skip, "skip"))
        setf("output_gate", OutputGate.coerce(self.output_gate, "output_gate"))
        if not isinstance(self.qk_l2norm, bool):
            raise ValueError(f"qk_l2norm must be a bool; got {self.qk_l2norm!r}")
        if not isinstance(self.read_before_decay, bool):
            raise ValueError(f"read_before_decay must be a bool; got {self.read_before_decay!r}")
        if not isinstance(self.name, str):
            raise ValueError(f"name must be a str; got {self.name!r}")

        # gate
        if self.decay is Decay.NONE:
            if self.gate is not None:
                raise ValueError(f"gate {self.gate} given but decay is 'none'; use decay='scalar' or 'channel'")
        else:
            if self.gate is None:
                role = Role.TOKEN_CHANNEL if self.decay is Decay.CHANNEL else Role.TOKEN
                setf("gate", Term.identity("g", role))
            elif not isinstance(self.gate, Term):
                raise ValueError(f"gate must be a Term (see linattn.term); got {self.gate!r}")
            if self.gate.expr.is_nonnegative:
                raise ValueError(
                    f"gate {self.gate} is >= 0 for every input, so exp(gate) >= 1 never decays the state: the gate "
                    f"is the log of the decay and must be <= 0; did you mean -({self.gate})?"
                )
            if self.decay is Decay.SCALAR and self.gate.per_channel:
                chan = [o.name for o in self.gate.operands if o.role.per_channel]
                raise ValueError(
                    f"scalar decay cannot read per-channel operand(s) {chan} in gate {self.gate}; "
                    "use decay='channel'"
                )

        # beta
        if self.beta is None or self.beta is False:
            setf("beta", None)
        elif self.beta is True:
            setf("beta", Term.identity("beta", Role.TOKEN))
        elif not isinstance(self.beta, Term):
            raise ValueError(f"beta must be a bool or a Term (see linattn.term); got {self.beta!r}")
        if self.beta is not None and self.beta.per_channel:
            chan = [o.name for o in self.beta.operands if o.role.per_channel]
            raise ValueError(f"beta is one number per head and token; it cannot read per-channel operand(s) {chan}")

        # the correction's inputs and steps
        if self.correction is Correction.DPLR and self.beta is not None:
            raise ValueError("beta: the dplr transition (D + b aᵀ) writes k vᵀ as given; fold a write strength into "
                             "k or v (or b)")
        h = self.householder
        if isinstance(h, bool) or not isinstance(h, int) or h < 1:
            raise ValueError(f"householder must be a positive int; got {h!r}")
        if h > 1 and self.skip is not Skip.NONE:
            raise ValueError(f"skip: the D skip adds D ⊙ v_t, but with householder={h} a token has {h} values")
        if h > 1 and self.correction is not Correction.DELTA:
            raise ValueError(f"householder={h} needs correction='delta' (DeltaProduct's steps are delta-rule steps)")
        if self.read_before_decay and (self.correction not in (Correction.DELTA, Correction.COMBA) or h > 1):
            raise ValueError("read_before_decay: the delta rule's or Comba's one read per token can come before the "
                             f"decay; got correction={self.correction.value!r}, householder={h}")
        for t in (self.gate, self.beta):
            for o in t.operands if t is not None else ():
                if o.name in self.correction_inputs:
                    raise ValueError(f"operand {o.name!r} of {t} is the {self.correction.value} correction's "
                                     f"[B, T, H, K] input; name the term's operand otherwise")
        if h > 1 and self.gate is not None and self.beta is not None:
            shared = sorted({o.name for o in self.gate.operands} & {o.name for o in self.beta.operands})
            if shared:
                raise ValueError(f"operand(s) {shared} in both gate and beta: with householder={h} the gate reads one "
                                 f"row per token and beta one per step ({h} per token)")

        # operands shared by gate and beta must agree on their role
        seen: dict[str, Role] = {}
        for t in (self.gate, self.beta):
            for o in t.operands if t is not None else ():
                if seen.setdefault(o.name, o.role) is not o.role:
                    raise ValueError(
                        f"operand {o.name!r} is declared both as {seen[o.name].value!r} and {o.role.value!r}"
                    )

        if self.default_scale is not None:
            s = self.default_scale
            if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) or s <= 0:
                raise ValueError(f"default_scale must be a positive finite number or None; got {s!r}")
            setf("default_scale", float(s))

    # ------------------------------------------------------------------ structure
    @property
    def has_decay(self) -> bool:
        return self.decay is not Decay.NONE

    @property
    def has_delta(self) -> bool:
        return self.correction is Correction.DELTA

    @property
    def correction_inputs(self) -> tuple[str, ...]:
        """The key-shaped inputs ``[B, T, H, K]`` the correction reads (``p``; ``a``, ``b``)."""
        return CORRECTION_INPUTS[self.correction]

    @property
    def operands(self) -> tuple[Operand, ...]:
        """Every runtime operand the terms read, each once, sorted by name."""
        out: dict[str, Operand] = {}
        for t in (self.gate, self.beta):
            for o in t.operands if t is not None else ():
                out[o.name] = o
        return tuple(out[n] for n in sorted(out))

    def replace(self, **changes) -> Spec:
        """A copy with some fields changed (validated like a new spec)."""
        return dataclasses.replace(self, **changes)

    def scale_for(self, head_dim: int) -> float:
        return self.default_scale if self.default_scale is not None else head_dim**-0.5

    # ------------------------------------------------------------------ display
    def recurrence(self) -> str:
        """The recurrence as one line of mathematics."""
        b = "β_t " if self.beta is not None else ""
        decay = {Decay.NONE: "", Decay.SCALAR: "exp(g_t)·", Decay.CHANNEL: "Diag(exp(g_t))·"}[self.decay]
        corr = {Correction.NONE: "", Correction.DELTA: f"(I - {b}k_t k_tᵀ)·", Correction.COMBA: f"(I - {b}k_t p_tᵀ)·",
                Correction.DPLR: ""}[self.correction]
        scale = "scale·" if self.default_scale != 1.0 else ""
        if self.correction is Correction.DPLR:
            diag = {Decay.NONE: "I", Decay.SCALAR: "exp(g_t)·I", Decay.CHANNEL: "Diag(exp(g_t))"}[self.decay]
            transition = f"({diag} + b_t a_tᵀ)·S_(t-1) + k_t v_tᵀ"
        elif self.householder > 1:
            b = "β_tj " if self.beta is not None else ""
            transition = (f"P_t({decay}S_(t-1)), P_t = {self.householder} steps S <- (I - {b}k_tj k_tjᵀ)·S + "
                          f"{b}k_tj v_tjᵀ")
        elif self.read_before_decay:
            r = "p_t" if self.correction is Correction.COMBA else "k_t"
            diag = {Decay.NONE: "I", Decay.SCALAR: "exp(g_t)·I", Decay.CHANNEL: "Diag(exp(g_t))"}[self.decay]
            transition = f"({diag} - {b}k_t {r}ᵀ)·S_(t-1) + {b}k_t v_tᵀ"
        else:
            transition = f"{corr}{decay}S_(t-1) + {b}k_t v_tᵀ"
        out = f"S_t = {transition}; o_t = {scale}S_tᵀ q_t"
        if self.skip is not Skip.NONE:
            out += " + D ⊙ v_t"
        if self.output_gate is OutputGate.SILU:
            out = out.replace("o_t = ", "o_t = silu(z_t) ⊙ (") + ")"
        where = []
        if self.gate is not None and str(self.gate) != "g":
            where.append(f"g = {self.gate}")
        if self.beta is not None and str(self.beta) != "beta":
            where.append(f"β = {self.beta}")
        if self.qk_l2norm:
            where.append("q, k L2-normalised")
        if self.skip is Skip.CHANNEL:
            where.append("D per channel")
        if where:
            out += " where " + ", ".join(where)
        return out

    def __repr__(self) -> str:
        return f"Spec({self.name + ': ' if self.name else ''}{self.recurrence()})"
