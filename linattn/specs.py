"""Built-in specs.

The first group is the kernel core of each family, with ``g`` (log space) and ``β`` given
as inputs, as fla's ``chunk_*`` functions take them. The second group is what each hybrid
model actually calls, with its gate parameterization, β and normalisation fused.
"""
from __future__ import annotations

from . import gates
from .spec import Spec, term

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
    "DPLR",
    "IPLR",
    "RWKV7",
    "COMBA",
    "DELTA_PRODUCT",
    "delta_product",
    "DELTA_FAMILY",
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

#: The wider delta-rule family: transitions other than ``(I - β k kᵀ)``. The reference oracles
#: compute all of them; Comba is a stage option of the generated kernels, DeltaProduct and DPLR
#: compile onto rows of the delta rule's and Comba's (see :mod:`linattn.steps`). They are kept
#: apart from :data:`BUILTIN` (the kernel cores and model layers the tables and checks cover).
#: DPLR: ``S_t = (Diag(exp(gk_t)) + b_t a_tᵀ) S_(t-1) + k_t v_tᵀ`` (fla's ``chunk_dplr_delta_rule``).
DPLR = Spec(decay="channel", correction="dplr", gate=term("gk", gk="token_channel"), name="DPLR")
#: IPLR: ``S_t = (I + b_t a_tᵀ) S_(t-1) + k_t v_tᵀ``, DPLR without decay.
IPLR = Spec(correction="dplr", name="IPLR")
#: RWKV-7: DPLR with the receptance ``r`` as q, log-decay ``w``, no default scaling (fla's
#: ``chunk_rwkv7``: ``a = -κ̂``, ``b = κ̂ ⊙ a-gate``).
RWKV7 = Spec(decay="channel", correction="dplr", gate=term("w", w="token_channel"), default_scale=1.0, name="RWKV7")
#: Comba: ``S_t = (I - β_t k_t p_tᵀ) exp(g_t) S_(t-1) + β_t k_t v_tᵀ``, reading along ``p``.
COMBA = Spec(decay="scalar", correction="comba", beta=True, name="COMBA")


def delta_product(householder: int) -> Spec:
    """Gated DeltaProduct with ``householder`` delta-rule steps per token (one decay per token)."""
    return Spec(decay="scalar", correction="delta", beta=True, householder=householder,
                name=f"DELTA_PRODUCT_{householder}")


#: Gated DeltaProduct with two steps per token (:func:`delta_product` gives any number).
DELTA_PRODUCT = delta_product(2).replace(name="DELTA_PRODUCT")
#: The wider family by name.
DELTA_FAMILY: dict[str, Spec] = {s.name: s for s in (DPLR, IPLR, RWKV7, COMBA, DELTA_PRODUCT)}

BUILTIN: dict[str, Spec] = {
    s.name: s
    for s in (LINEAR, DELTANET, GLA, SIMPLE_GLA, GDN, KDA, MAMBA2, QWEN3_NEXT_GDN, KIMI_KDA, NEMOTRON_MAMBA2)
}


def by_name(name: str) -> Spec:
    """A built-in spec by (case-insensitive) name."""
    try:
        return {**BUILTIN, **DELTA_FAMILY}[name.upper()]
    except KeyError:
        raise ValueError(f"unknown spec {name!r}; built-in specs: {', '.join([*BUILTIN, *DELTA_FAMILY])}") from None
