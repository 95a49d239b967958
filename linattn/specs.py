"""Built-in specs.

The first group is the kernel core of each family, with ``g`` (log space) and ``β`` given
as inputs, as fla's ``chunk_*`` functions take them. The second group is what each hybrid
model actually calls, with its gate parameterization, β and normalisation fused.
"""
from __future__ import annotations

from . import gates
from .spec import Spec

__all__ = [
    "LINEAR",
    "DELTANET",
    "GLA",
    "SIMPLE_GLA",
    "GDN",
    "KDA",
    "MAMBA2",
    "QWEN3_NEXT_GDN",
    "KIMI_KDA",
    "NEMOTRON_MAMBA2",
    "BUILTIN",
    "by_name",
]

#: Plain (unnormalised, undecayed) linear attention.
LINEAR = Spec(name="LINEAR")
#: DeltaNet: the delta rule, no decay.
DELTANET = Spec(correction="delta", beta=True, name="DELTANET")
#: Gated linear attention: channel-wise decay, no correction.
GLA = Spec(decay="channel", name="GLA")
#: Simple GLA / RetNet-style: one decay per head and token, no correction.
SIMPLE_GLA = Spec(decay="scalar", name="SIMPLE_GLA")
#: Gated DeltaNet: scalar decay and the delta rule.
GDN = Spec(decay="scalar", correction="delta", beta=True, name="GDN")
#: Kimi Delta Attention: channel-wise decay and the delta rule.
KDA = Spec(decay="channel", correction="delta", beta=True, name="KDA")
#: Mamba-2 (SSD) with q = C, k = B, v = x: β = dt and g = A·dt, dt given after its softplus.
MAMBA2 = Spec(
    decay="scalar",
    gate=gates.mamba_gate(softplus=False, bias=False),
    beta=gates.mamba_dt(softplus=False, bias=False),
    default_scale=1.0,
    name="MAMBA2",
)

#: Qwen3-Next's Gated DeltaNet layer: g = -exp(A_log)·softplus(a + dt_bias), β = sigmoid(b), L2-normalised q/k.
QWEN3_NEXT_GDN = Spec(
    decay="scalar",
    correction="delta",
    gate=gates.softplus_gate(channel=False),
    beta=gates.sigmoid_beta(),
    qk_l2norm=True,
    name="QWEN3_NEXT_GDN",
)
#: Kimi Linear's KDA layer: the same gate per channel (per-channel dt_bias), β = sigmoid(b), L2-normalised q/k.
KIMI_KDA = Spec(
    decay="channel",
    correction="delta",
    gate=gates.softplus_gate(channel=True),
    beta=gates.sigmoid_beta(),
    qk_l2norm=True,
    name="KIMI_KDA",
)
#: Nemotron-H's Mamba-2 mixer: dt = softplus(dt + dt_bias), g = A·dt, β = dt, D skip per head.
NEMOTRON_MAMBA2 = Spec(
    decay="scalar",
    gate=gates.mamba_gate(),
    beta=gates.mamba_dt(),
    skip="head",
    default_scale=1.0,
    name="NEMOTRON_MAMBA2",
)

BUILTIN: dict[str, Spec] = {
    s.name: s
    for s in (LINEAR, DELTANET, GLA, SIMPLE_GLA, GDN, KDA, MAMBA2, QWEN3_NEXT_GDN, KIMI_KDA, NEMOTRON_MAMBA2)
}


def by_name(name: str) -> Spec:
    """A built-in spec by (case-insensitive) name."""
    try:
        return BUILTIN[name.upper()]
    except KeyError:
        raise ValueError(f"unknown spec {name!r}; built-in specs: {', '.join(BUILTIN)}") from None
