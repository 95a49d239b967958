"""The decoding step: the recurrence itself, token by token, on a state kept in place.

One program per (sequence, value head, V tile) reads the sequence's state (through a
state-index table when the states live in a serving engine's pool), runs the sequence's
new tokens through decay, correction and write with every term of the spec fused (gate
and β parameterizations, L2 norms, D skip, silu(z) gate), emits each ``o_t`` and writes
the state back. No matrix products: a step is a handful of outer products and row
reductions over a state tile, bound by the state's bytes.
"""
from __future__ import annotations

from linattn.spec import OutputGate, Role, Skip

from .exprs import assign
from .emit import L2NORM_EPS, Emitter, Kernel, operand_params, signature
from .manifest import declare, inout, out
from .plan import Plan
from .source import Source

__all__ = ["step_kernel"]


def step_kernel(plan: Plan) -> Kernel:
    e, spec = Emitter(plan), plan.spec
    params = ["q", "k", *(["p"] if plan.comba else []), "v", *operand_params(plan)]
    if spec.skip is not Skip.NONE:
        params.append("D")
    if spec.output_gate is OutputGate.SILU:
        params.append("z")
    params += [inout("state"), "state_idx", out("pool_err"), out("o"), "cu_seqlens"]
    params += ["scale", "NSLOT", "TT", "H", "HV", "GROUP"]
    params.append("HAS_IDX")
    ops = {o.name: o for o in spec.operands}
    s = Source()
    params = declare(plan, params)
    with s.block(signature("step_fwd", params)):
        s('"""Decode: run one sequence\'s new tokens through the recurrence on its state, in place."""')
        e.v_tiled_ids(s, "n", "NVN")  # the narrow tile: a small batch's step needs programs
        s("i_hk = i_h // GROUP")
        e.sequence_bounds(s)
        s("if HAS_IDX:", "    slot = tl.load(state_idx + i_n).to(tl.int64)", "else:", "    slot = i_n.to(tl.int64)")
        s("# the pool's contract: slot -1 skips the sequence (zero outputs, no state touched); a slot")
        s("# outside the pool is never read or written, and is reported through pool_err")
        s("live = (slot >= 0) & (slot < NSLOT)")
        s("if (slot != -1) & (live == 0):", "    tl.store(pool_err, 1)")
        s("slot = tl.where(live, slot, 0)")
        e.key_blocks(s)
        s("cv = i_v * BVN + tl.arange(0, BVN)", "cv_ok = cv < V")
        for b in e.blocks:
            s(f"s_mask{b} = (ck{b} < tl.where(live, K, 0))[:, None] & cv_ok[None, :]")
            s(f"s_off{b} = ck{b}[:, None] * V + cv[None, :]")
            s(f"b_S{b} = tl.load(state + (slot * HV + i_h) * K * V + s_off{b}, mask=s_mask{b}, other=0.0).to(tl.float32)")
        for o in ops.values():  # per-head parameters: loaded once
            if o.role is Role.HEAD:
                s(f"o_{o.name} = tl.load(x_{o.name} + i_h).to(tl.float32)")
            elif o.role is Role.HEAD_CHANNEL:
                for b in e.blocks:
                    s(f"o_{o.name}{b} = tl.load(x_{o.name} + i_h * K + ck{b}, mask=ck_ok{b}, other=0.0).to(tl.float32)")
        if spec.skip is Skip.HEAD:
            s("b_D = tl.load(D + i_h).to(tl.float32)")
        elif spec.skip is Skip.CHANNEL:
            s("b_D = tl.load(D + i_h * V + cv, mask=cv_ok, other=0.0).to(tl.float32)")
        with s.block("for t in range(bos, eos):"):
            s("p_qk = (t * H + i_hk) * K", "p_h = t * HV + i_h")
            for b in e.blocks:
                s(f"b_q{b} = tl.load(q + p_qk + ck{b}, mask=ck_ok{b}, other=0.0).to(tl.float32)")
                s(f"b_k{b} = tl.load(k + p_qk + ck{b}, mask=ck_ok{b}, other=0.0).to(tl.float32)")
                if plan.comba:
                    s(f"b_p{b} = tl.load(p + p_qk + ck{b}, mask=ck_ok{b}, other=0.0).to(tl.float32)")
            if spec.qk_l2norm:
                for x in ("q", "k", *(["p"] if plan.comba else [])):
                    total = " + ".join(f"tl.sum(b_{x}{b} * b_{x}{b}, 0)" for b in e.blocks)
                    s(f"r{x} = tl.rsqrt({total} + {L2NORM_EPS})")
                    for b in e.blocks:
                        s(f"b_{x}{b} = b_{x}{b} * r{x}")
            s("b_v = tl.load(v + p_h * V + cv, mask=cv_ok, other=0.0).to(tl.float32)")
            for o in ops.values():  # per-token inputs
                if o.role is Role.TOKEN:
                    s(f"o_{o.name} = tl.load(x_{o.name} + p_h).to(tl.float32)")
                elif o.role is Role.TOKEN_CHANNEL:
                    for b in e.blocks:
                        s(f"o_{o.name}{b} = tl.load(x_{o.name} + p_h * K + ck{b}, mask=ck_ok{b}, other=0.0).to(tl.float32)")

            def name(b):
                def f(n: str) -> str:
                    role = ops[n].role
                    if role is Role.SCALAR:
                        return f"s_{n}"
                    return f"o_{n}{b}" if role.per_channel else f"o_{n}"

                return f

            # the gate and β terms of this token (subexpressions shared between them computed once)
            terms = []
            if plan.scalar:
                terms.append(("b_g", spec.gate.expr))
            if plan.beta:
                terms.append(("b_beta", spec.beta.expr))
            if terms:
                s(*assign(terms, name(""), "t_"))
            read = " + ".join(f"tl.sum(b_{plan.read}{b}[:, None] * b_S{b}, 0)" for b in e.blocks)
            if plan.read_before:  # the correction reads the state before the decay
                s(f"b_r = {read}")
                read = "b_r"
            # decay
            if plan.scalar:
                s("b_a = tl.exp(b_g)")
                for b in e.blocks:
                    s(f"b_S{b} = b_S{b} * b_a")
            elif plan.channel:
                for b in e.blocks:
                    s(*assign([(f"b_g{b}", spec.gate.expr)], name(b), f"t{b}_"))
                    s(f"b_S{b} = b_S{b} * tl.exp(b_g{b})[:, None]")
            # correction and write: S += k (β (v - Sᵀ k))ᵀ (Comba reads along p: Sᵀ p)
            u = "b_v"
            if plan.delta:
                u = f"(b_v - ({read}))"
            if plan.beta:
                s(f"b_u = {u} * b_beta")
            elif plan.delta:
                s(f"b_u = {u}")
            u = "b_u" if plan.beta or plan.delta else "b_v"
            for b in e.blocks:
                s(f"b_S{b} += b_k{b}[:, None] * {u}[None, :]")
            s("b_o = scale * (" + " + ".join(f"tl.sum(b_q{b}[:, None] * b_S{b}, 0)" for b in e.blocks) + ")")
            if spec.skip is not Skip.NONE:
                s("b_o += b_D * b_v")
            if spec.output_gate is OutputGate.SILU:
                s("b_z = tl.load(z + p_h * V + cv, mask=cv_ok, other=0.0).to(tl.float32)")
                s("b_o = b_o * b_z / (1.0 + tl.exp(-b_z))")
            s("b_o = tl.where(live, b_o, 0.0)")
            s("tl.store(o + p_h * V + cv, b_o.to(o.dtype.element_ty), mask=cv_ok)")
        for b in e.blocks:
            s(f"tl.store(state + (slot * HV + i_h) * K * V + s_off{b}, b_S{b}, mask=s_mask{b})")
    return Kernel("step_fwd", params, ("N*NVN", "HV"), s.text(), plan.warps_dstate)
