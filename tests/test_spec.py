"""The DSL: specs are frozen values that validate themselves and read like their recurrence."""
import dataclasses
import re

import pytest
import sympy as sp
import torch

import linattn
from linattn import Decay, Spec, gates, specs, term
from linattn.spec import Role
from linattn.torch_terms import evaluate_expr, evaluate_term

from helpers import random_spec


def test_builtins_reachable_and_named():
    for name in ("MAMBA2", "GDN", "KDA", "GLA", "DELTANET", "LINEAR"):
        s = getattr(linattn.specs, name)
        assert isinstance(s, Spec) and s.name == name
        assert specs.by_name(name.lower()) is s
    with pytest.raises(ValueError, match="unknown spec 'nope'"):
        specs.by_name("nope")


def test_builtin_structure():
    assert (specs.GDN.decay, specs.GDN.correction) == (Decay.SCALAR, linattn.Correction.DELTA)
    assert (specs.KDA.decay, specs.KDA.has_delta) == (Decay.CHANNEL, True)
    assert (specs.GLA.decay, specs.GLA.has_delta, specs.GLA.beta) == (Decay.CHANNEL, False, None)
    assert (specs.DELTANET.decay, specs.DELTANET.has_delta) == (Decay.NONE, True)
    assert specs.LINEAR.operands == ()
    assert [o.name for o in specs.MAMBA2.operands] == ["A", "dt"]
    assert specs.MAMBA2.scale_for(128) == 1.0 and specs.GDN.scale_for(64) == 0.125
    assert [o.name for o in specs.QWEN3_NEXT_GDN.operands] == ["A_log", "a", "b", "dt_bias"]
    roles = {o.name: o.role for o in specs.KIMI_KDA.operands}
    assert roles == {"A_log": Role.HEAD, "a": Role.TOKEN_CHANNEL, "b": Role.TOKEN, "dt_bias": Role.HEAD_CHANNEL}


def test_frozen_and_hashable():
    s = Spec(decay="scalar", correction="delta", beta=True)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.decay = Decay.NONE
    same = Spec(decay=Decay.SCALAR, correction="delta", beta=gates.term("beta", beta="token"), name="other label")
    assert s == same and hash(s) == hash(same)  # the label is not part of the identity
    assert s == specs.GDN
    assert len({s, same, specs.GDN, specs.KDA, specs.GLA}) == 3
    # a term built from text equals the one built by a helper
    assert term("-exp(A_log)*softplus(dt_bias + a)", a="token", A_log="head", dt_bias="head") == gates.softplus_gate()
    assert specs.GDN != specs.GDN.replace(qk_l2norm=True)
    cache = {specs.KDA: 1}
    assert cache[Spec(decay="channel", correction="delta", beta=True)] == 1


@pytest.mark.parametrize("seed", range(20))
def test_random_specs_are_values(seed):
    s = random_spec(seed)
    again = random_spec(seed)
    assert s == again and hash(s) == hash(again) and repr(s) == repr(again)
    assert s.replace() == s


def test_repr_reads_like_the_recurrence():
    assert repr(specs.GDN) == (
        "Spec(GDN: S_t = (I - β_t k_t k_tᵀ)·exp(g_t)·S_(t-1) + β_t k_t v_tᵀ; o_t = scale·S_tᵀ q_t)"
    )
    assert "Diag(exp(g_t))" in repr(specs.KDA) and "(I - β_t k_t k_tᵀ)" in repr(specs.KDA)
    assert repr(specs.LINEAR) == "Spec(LINEAR: S_t = S_(t-1) + k_t v_tᵀ; o_t = scale·S_tᵀ q_t)"
    r = repr(specs.NEMOTRON_MAMBA2)
    assert "o_t = S_tᵀ q_t + D ⊙ v_t" in r and "g = A*softplus(dt + dt_bias)" in r and "β = softplus(dt + dt_bias)" in r
    r = repr(specs.QWEN3_NEXT_GDN)
    assert "g = -exp(A_log)*softplus(a + dt_bias)" in r and "β = sigmoid(b)" in r and "L2-normalised" in r
    r = repr(Spec(output_gate="silu"))
    assert "o_t = silu(z_t) ⊙ (scale·S_tᵀ q_t)" in r


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(decay="exponential"), "decay must be one of 'none', 'scalar', 'channel'; got 'exponential'"),
        (dict(correction="householder"), "correction must be one of"),
        (dict(skip="yes"), "skip must be one of"),
        (dict(output_gate="gelu"), "output_gate must be one of"),
        (dict(gate=gates.softplus_gate()), "gate .* given but decay is 'none'"),
        (dict(decay="scalar", gate=gates.softplus_gate(channel=True)), "scalar decay cannot read per-channel operand"),
        (dict(decay="scalar", gate="-exp(a)"), "gate must be a Term"),
        (dict(beta=term("sigmoid(b)", b="token_channel")), "beta is one number per head and token"),
        (dict(beta="sigmoid(b)"), "beta must be a bool or a Term"),
        (
            dict(decay="scalar", gate=term("-exp(a)", a="token"), beta=term("sigmoid(a)", a="head")),
            "operand 'a' is declared both as 'token' and 'head'",
        ),
        (dict(qk_l2norm=1), "qk_l2norm must be a bool"),
        (dict(default_scale=0.0), "default_scale must be a positive finite number"),
        (dict(default_scale=float("nan")), "default_scale must be a positive finite number"),
    ],
)
def test_invalid_specs(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Spec(**kwargs)


@pytest.mark.parametrize(
    "text, roles, message",
    [
        ("-exp(A_log * ", dict(A_log="head"), "cannot parse term"),
        ("a + c", dict(a="token"), r"undeclared operand\(s\) \['c'\]"),
        ("a", dict(a="token", c="head"), r"operand\(s\) \['c'\] do not appear"),
        ("sin(a)", dict(a="token"), r"unknown function\(s\) \['sin'\].*known functions: exp, log, sqrt, softplus"),
        ("q * 2", dict(q="token"), "operand name 'q' is reserved"),
        ("a", dict(a="per_batch"), "role of operand 'a' must be one of"),
        ("lo * 2", dict(lo="scalar"), "reads no per-token or per-head operand"),
    ],
)
def test_invalid_terms(text, roles, message):
    with pytest.raises(ValueError, match=message):
        term(text, **roles)


MALFORMED = [
    "exp(a",
    "a +* b",
    "a b",
    "",
    "   ",
    "a**",
    "lambda: a",
    "a; b",
    "__import__('os')",
    "__import__('os').system('echo pwned')",
    "a = 1",
    "softplus(a, b)",
    "clamp(a)",
    "unknownfn(a)",
    "1/0",
    "a + 0/0",
    "a * 1e400",
    "a[0]",
    "import os",
    "a if b else a",
    "a.real",
    "a ^ 2",
    "2a",
    "a, b",
    "exp",
    "a(b)",
    "(a + b))",
    "a + c",
    "'a'",
    "a @ b",
    "\uff45\uff58\uff45\uff43(a)",  # fullwidth "exec": Python's parser folds it to exec
]


@pytest.mark.parametrize("text", MALFORMED)
def test_malformed_terms_are_value_errors_quoting_the_text(text):
    with pytest.raises(ValueError) as info:
        term(text, a="token", b="head")
    assert type(info.value) is ValueError and repr(text) in str(info.value)


def test_term_text_is_not_evaluated(monkeypatch):
    """Nothing but declared operands and known functions reaches sympify (which evaluates text)."""
    calls = []
    monkeypatch.setattr(sp, "sympify", lambda *a, **k: calls.append(a))
    for text in ["__import__('os').system('true')", "exec", "a.__class__", "getattr(a, 'x')", "open"]:
        with pytest.raises(ValueError, match="cannot parse term|undeclared operand|unknown function"):
            term(text, a="token")
    assert calls == []


@pytest.mark.parametrize(
    "text, message",
    [
        ("sin(a)", r"known functions: exp, log, sqrt, softplus, sigmoid, clamp"),
        ("softpuls(a)", "did you mean softplus"),
        ("a + c", r"undeclared operand\(s\) \['c'\].*c='token'"),
        ("a ^ 2", r"use \*\* for powers"),
    ],
)
def test_term_errors_say_what_is_allowed(text, message):
    with pytest.raises(ValueError, match=message):
        term(text, a="token")


@pytest.mark.parametrize(
    "text, roles",
    [
        ("softplus(a)", dict(a="token")),
        ("exp(x)", dict(x="token")),
        ("sigmoid(b)", dict(b="token")),
        ("a**2", dict(a="token")),
        ("softplus(a) + exp(A_log)", dict(a="token", A_log="head")),
        ("exp(A_log) * softplus(a + dt_bias)", dict(a="token", A_log="head", dt_bias="head")),
        ("clamp(softplus(a), 0.001, 10)", dict(a="token")),
        ("sqrt(1 + a**2)", dict(a="token")),
    ],
)
@pytest.mark.parametrize("decay", ["scalar", "channel"])
def test_gate_that_cannot_decay_is_rejected(text, roles, decay):
    t = term(text, **roles)
    shown = re.escape(str(t))
    with pytest.raises(ValueError, match=rf"gate {shown} is >= 0 .*did you mean -\({shown}\)\?"):
        Spec(decay=decay, gate=t)
    Spec(decay=decay, gate=term(f"-({text})", **roles))  # what was meant


@pytest.mark.parametrize(
    "t",
    [
        term("g", g="token"),
        term("g + g_gamma", g="token", g_gamma="head"),
        term("-exp(A_log) * softplus(a + dt_bias)", a="token", A_log="head", dt_bias="head"),
        term("A * dt", A="head", dt="token"),  # Mamba-2: A < 0 is the caller's
        term("lower_bound * sigmoid(a)", lower_bound="scalar", a="token"),
        term("-sigmoid(b)", b="token"),
        term("log(sigmoid(b))", b="token"),
        term("clamp(g, lo, hi)", g="token", lo="scalar", hi="scalar"),
        term("clamp(g, -10, 0)", g="token"),
    ],
    ids=str,
)
def test_gates_of_undecided_or_negative_sign_are_accepted(t):
    Spec(decay="scalar", gate=t)


def test_builtin_gates_still_build():
    for s in specs.BUILTIN.values():
        if s.gate is not None:
            assert Spec(decay=s.decay, gate=s.gate) is not None
    for channel in (False, True):
        Spec(decay="channel", gate=gates.softplus_gate(channel))
        Spec(decay="channel", gate=gates.lower_bound_gate(channel))
    for kw in (dict(), dict(limit=True), dict(softplus=False, bias=False)):
        Spec(decay="scalar", gate=gates.mamba_gate(**kw))


def test_sign_of_the_custom_functions():
    a, lo, hi = sp.symbols("a lo hi", real=True)
    ex = linattn.expr
    assert ex.softplus(a).is_positive and ex.sigmoid(a).is_positive and ex.softplus(a).is_real
    assert ex.softplus(sp.Symbol("z")).is_positive is None  # complex argument: unknown
    assert (-sp.exp(a) * ex.softplus(a)).is_negative
    assert ex.clamp(a, 1, 2).is_positive and ex.clamp(a, 0, 2).is_nonnegative and ex.clamp(a, 0, 2).is_positive is None
    assert ex.clamp(a, -2, -1).is_negative and ex.clamp(a, -2, 0).is_nonpositive and ex.clamp(a, 3, -1).is_negative
    assert ex.clamp(a, lo, hi).is_real and ex.clamp(a, lo, hi).is_nonnegative is None
    assert ex.inside(a, lo, hi).is_nonnegative and ex.inside(a, lo, hi).is_real


def test_unknown_role_lists_the_roles_and_shapes():
    with pytest.raises(ValueError, match=r"'token', 'token_channel', 'head', 'head_channel', 'scalar'; got 'channel'.*"
                                         r"token_channel \[B, T, HV, K\]"):
        term("-exp(a)", a="channel")


PARAMETERIZATIONS = [
    gates.softplus_gate(),
    gates.softplus_gate(channel=True),
    gates.lower_bound_gate(),
    gates.sigmoid_beta(),
    gates.mamba_dt(),
    gates.mamba_dt(limit=True),
    gates.mamba_gate(limit=True),
    term("-exp(A_log) * softplus(a) ** 2 / sqrt(1 + exp(b))", a="token", A_log="head", b="token"),
]


@pytest.mark.parametrize("t", PARAMETERIZATIONS, ids=str)
def test_term_derivatives_match_autograd(t):
    """The symbolic derivatives (what the backward kernels print) equal autograd's."""
    torch.manual_seed(0)
    B, T, HV, K = 2, 5, 3, 4
    shape = (B, T, HV, K) if t.per_channel else (B, T, HV)
    full = {"token": (B, T, HV), "token_channel": (B, T, HV, K), "head": (HV,), "head_channel": (HV, K)}
    values = {}
    for o in t.operands:
        if o.role is Role.SCALAR:
            values[o.name] = {"lower_bound": -3.0, "dt_min": 0.2, "dt_max": 1.5}[o.name]
        else:
            values[o.name] = (torch.randn(full[o.role.value], dtype=torch.float64) * 1.5).requires_grad_()
    out = evaluate_term(t, values, shape, torch.float64)
    weight = torch.randn(shape, dtype=torch.float64)
    grads = torch.autograd.grad((out * weight).sum(), [values[o.name] for o in t.operands if o.role is not Role.SCALAR])
    roles = {o.name: o.role for o in t.operands}
    tensors = [o for o in t.operands if o.role is not Role.SCALAR]
    for o, g in zip(tensors, grads):
        d = evaluate_expr(t.diff(o.name), roles, values, shape, torch.float64) * weight
        # sum the elementwise derivative over the axes the operand is broadcast along
        if o.role is Role.HEAD:
            d = d.sum(dim=(0, 1, 3) if len(shape) == 4 else (0, 1))
        elif o.role is Role.HEAD_CHANNEL:
            d = d.sum(dim=(0, 1))
        elif o.role is Role.TOKEN and len(shape) == 4:
            d = d.sum(dim=3)
        torch.testing.assert_close(d, g, rtol=1e-10, atol=1e-12, msg=f"d/d{o.name} of {t}")


def test_softplus_threshold_and_clamp_semantics():
    x = torch.tensor([-30.0, 0.0, 19.0, 25.0], dtype=torch.float64)
    out = evaluate_term(term("softplus(a)", a="head"), {"a": x}, (1, 1, 4), torch.float64)[0, 0]
    torch.testing.assert_close(out, torch.nn.functional.softplus(x))
    c = term("clamp(a, lo, hi)", a="head", lo="scalar", hi="scalar")
    assert c.diff("a") == linattn.expr.inside(sp.Symbol("a", real=True), sp.Symbol("lo", real=True), sp.Symbol("hi", real=True))
    out = evaluate_term(c, {"a": x, "lo": -1.0, "hi": 20.0}, (1, 1, 4), torch.float64)[0, 0]
    assert out.tolist() == [-1.0, 0.0, 19.0, 20.0]


def test_operand_names_and_spec_operands():
    s = Spec(decay="scalar", gate=gates.mamba_gate(limit=True), beta=gates.mamba_dt(limit=True))
    assert [o.name for o in s.operands] == ["A", "dt", "dt_bias", "dt_max", "dt_min"]
    assert re.search(r"clamp\(softplus\(dt \+ dt_bias\), dt_min, dt_max\)", repr(s))


def test_layers_point_one_way():
    """Importing the DSL or the compiler imports no torch and registers no custom op; the
    runtime loads on first use. (A fresh interpreter: this one has torch loaded already.)"""
    import subprocess
    import sys

    code = (
        "import sys, linattn, linattn.codegen, linattn.specs\n"
        "plan = linattn.codegen.make_plan(linattn.specs.KDA, 'bf16', 64, 64, linattn.codegen.Options())\n"
        "assert linattn.codegen.generate(plan).source\n"
        "assert 'torch' not in sys.modules and 'triton' not in sys.modules, 'the DSL or compiler loaded torch'\n"
        "op = linattn.compile(linattn.specs.KDA)\n"
        "assert 'torch' in sys.modules and type(op).__name__ == 'CompiledOp'\n"
        "import linattn.reference, linattn.models\n"
        "assert linattn.ops.chunk_kda\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def test_one_top_level_name_installed(tmp_path):
    """The wheel holds `linattn` alone: the compiler, the oracles and the models inside it."""
    import subprocess
    import sys
    import zipfile
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(root)],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    (wheel,) = tmp_path.glob("linattn-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"linattn"}, top
    for sub in ("codegen/plan.py", "reference/recurrent.py", "models/qwen3_next.py"):
        assert f"linattn/{sub}" in names
