"""The demo: what the built-in specs are, and the two reference forms agreeing on each.

Returns its report as lines; ``python -m linattn demo`` prints them.
"""
from __future__ import annotations

import time

import torch

from .specs import BUILTIN
from .testing import random_inputs, rel_err


def run() -> list[str]:
    """Show every built-in spec and check the chunkwise reference against the recurrent oracle."""
    from reference import chunkwise, recurrent  # the demo exercises the oracles; the library never does

    lines = ["linattn built-in specs", ""]
    lines += [repr(spec) for spec in BUILTIN.values()]
    B, T, H, HV, K, V = 2, 200, 2, 4, 32, 32
    lines += [
        "",
        "reference check: chunkwise form (C=64, fp32) vs token-by-token oracle (fp64),",
        f"random inputs with gates down to -3 per token and an initial state; B={B} T={T} H={H} HV={HV} K={K} V={V}",
        f"{'spec':<16} {'rel err o':>10} {'rel err S':>10} {'ms':>7}",
    ]
    for spec in BUILTIN.values():
        x = random_inputs(spec, B=B, T=T, H=H, HV=HV, K=K, V=V, strength=3.0, h0=True)
        o_ref, s_ref = recurrent(spec, x.q, x.k, x.v, output_final_state=True, **x.kwargs)
        f32 = {n: (t.float() if isinstance(t, torch.Tensor) else t) for n, t in x.kwargs.items()}
        t0 = time.perf_counter()
        o, s = chunkwise(spec, x.q.float(), x.k.float(), x.v.float(), output_final_state=True, **f32)
        ms = (time.perf_counter() - t0) * 1e3
        lines.append(f"{spec.name:<16} {rel_err(o, o_ref):>10.2e} {rel_err(s, s_ref):>10.2e} {ms:>7.1f}")
    return lines
