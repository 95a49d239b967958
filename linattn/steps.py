"""Specs that run as several rows per token on a one-row generated core: DeltaProduct
(``Spec(householder=n)``) on the delta rule's kernels, DPLR on Comba's.

A token of DeltaProduct decays the state once and then takes ``n`` delta-rule steps, each
with its own key, value and β, before its output is read. That is the delta rule over
``T · n`` rows in which a token's decay sits on its first row, its query on its last and
zeros elsewhere: a zero log-decay keeps the state, a zero query reads nothing. So the op
compiles the plain delta-rule spec once and feeds it interleaved rows, taking every
``n``-th output. The gate term runs in torch first (its value, not its operands, is
interleaved); everything else, β's term included, is the core op's. The core computes
outputs at the ``n - 1`` rows per token whose query is zero: ``n`` times the output work
of one step, the state passes being the ones the recurrence needs anyway.

DPLR, ``S_t = (D_t + b_t a_tᵀ) S_(t-1) + k_t v_tᵀ``, is two rows per token of Comba's
transition read before the decay (``Spec(read_before_decay=True)``): row ``2t`` decays by
``g_t`` after reading ``u = a_tᵀ S_(t-1)`` and writes ``-b_t (0 - u)ᵀ = b_t uᵀ`` (read key
``a_t``, write key ``-b_t``, value 0); row ``2t + 1`` reads along 0 and writes ``k_t v_tᵀ``,
and carries the query. In the chunk form the read rows sit at ``G - g`` (every exponent
``<= 0``), so the transition's range is DPLR's own (docs/algorithms.md, section 12.2).
"""
from __future__ import annotations

import torch

from .inputs import check_call
from .spec import Decay, Role, Spec, Term
from .torch_terms import evaluate_term, l2norm

__all__ = ["RowsOp", "StepsOp", "DplrOp", "core_of", "dplr_core", "interleave"]


def core_of(spec: Spec) -> tuple[Spec, str | None]:
    """The one-step delta-rule spec that runs ``spec``'s rows, and the name of its gate input."""
    taken = {o.name for o in spec.beta.operands} if spec.beta is not None else set()
    gate = None
    if spec.decay is not Decay.NONE:
        gate = next(n for n in ("g", "log_decay", "step_log_decay") if n not in taken)
    role = Role.TOKEN_CHANNEL if spec.decay is Decay.CHANNEL else Role.TOKEN
    core = Spec(
        decay=spec.decay, correction="delta", gate=None if gate is None else Term.identity(gate, role),
        beta=spec.beta, qk_l2norm=spec.qk_l2norm, output_gate=spec.output_gate, default_scale=spec.default_scale,
        name=f"{spec.name or 'spec'}_steps",
    )
    return core, gate


def interleave(x: torch.Tensor, n: int, at: int) -> torch.Tensor:
    """``x`` ``[B, T, ...]`` as ``[B, T · n, ...]``: token ``t`` at row ``t · n + at``, zeros elsewhere."""
    out = x.new_zeros(x.shape[0], x.shape[1], n, *x.shape[2:])
    out[:, :, at] = x  # in place: the zeros are written once, x copied into its rows
    return out.flatten(1, 2)


class RowsOp:
    """A spec compiled onto a one-row core that runs ``rows`` rows per token, the token's
    output at its last row. Subclasses say how a call's inputs become the core's rows
    (:meth:`_rows`). Called like :class:`linattn.CompiledOp`."""

    rows: int

    def __init__(self, spec: Spec, core) -> None:
        self.spec = spec
        self.core = core
        self.key = core.key  # the compiled core's registry key

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec!r}, core={self.core!r})"

    @property
    def source(self) -> str:
        """The generated source of the core's last call."""
        return self.core.source

    def _rows(self, call) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict, torch.Tensor | None]:
        """The core's q, k, v, its named inputs and z, ``rows`` rows per token."""
        raise NotImplementedError

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        scale: float | None = None,
        initial_state: torch.Tensor | None = None,
        output_final_state: bool = False,
        cu_seqlens: torch.Tensor | None = None,
        z: torch.Tensor | None = None,
        D: torch.Tensor | None = None,
        cp_group: object | None = None,
        **operands: torch.Tensor | float,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run the recurrence; returns ``(o [B, T, HV, V], final_state [N, HV, K, V] fp32 or None)``."""
        on_cpu = isinstance(q, torch.Tensor) and q.device.type == "cpu" and cp_group is None
        call = check_call(self.spec, q, k, v, operands, z=z, D=D, scale=scale, initial_state=initial_state,
                          cu_seqlens=cu_seqlens, check_values=on_cpu)
        qi, ki, vi, inner, zi = self._rows(call)
        cu = None if call.cu_seqlens is None else call.cu_seqlens * self.rows
        o, ht = self.core(qi, ki, vi, scale=call.scale, initial_state=call.initial_state,
                          output_final_state=output_final_state, cu_seqlens=cu, z=zi, D=call.D, cp_group=cp_group,
                          **inner)
        return o[:, self.rows - 1 :: self.rows].contiguous(), ht

    def step(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        state: torch.Tensor,
        *,
        state_indices: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        scale: float | None = None,
        z: torch.Tensor | None = None,
        D: torch.Tensor | None = None,
        **operands: torch.Tensor | float,
    ) -> torch.Tensor:
        """Decode: the core's step kernel over the rows, updating ``state`` in place."""
        on_cpu = isinstance(q, torch.Tensor) and q.device.type == "cpu"
        call = check_call(self.spec, q, k, v, operands, z=z, D=D, scale=scale, cu_seqlens=cu_seqlens,
                          check_values=on_cpu)
        qi, ki, vi, inner, zi = self._rows(call)
        cu = None if call.cu_seqlens is None else call.cu_seqlens * self.rows
        o = self.core.step(qi, ki, vi, state, state_indices=state_indices, cu_seqlens=cu, scale=call.scale, z=zi,
                           D=call.D, **inner)
        return o[:, self.rows - 1 :: self.rows].contiguous()


class StepsOp(RowsOp):
    """A DeltaProduct spec compiled onto its one-step delta-rule core (see the module doc).

    Called like :class:`linattn.CompiledOp`, with ``k``, ``v`` and β's operands holding
    ``T · householder`` rows (step ``j`` of token ``t`` at row ``t · householder + j``).
    """

    def __init__(self, spec: Spec, core) -> None:
        super().__init__(spec, core)
        self.rows = self.steps = spec.householder
        self._gate_name = core_of(spec)[1]

    def _rows(self, call):
        """The interleaved query, k and v as given, the core's operands (its gate input included) and z."""
        n, spec = self.steps, self.spec
        operands = {o.name: call.operands[o.name] for o in spec.beta.operands} if spec.beta is not None else {}
        if self._gate_name is not None:
            shape = (call.B, call.T, call.HV) + ((call.K,) if spec.decay is Decay.CHANNEL else ())
            g = evaluate_term(spec.gate, call.operands, shape, torch.promote_types(call.q.dtype, torch.float32))
            operands[self._gate_name] = interleave(g, n, 0)
        z = None if call.z is None else interleave(call.z, n, n - 1)
        return interleave(call.q, n, n - 1), call.k, call.v, operands, z


def dplr_core(spec: Spec) -> Spec:
    """The Comba spec (read before the decay, no β) whose rows run DPLR ``spec``; its gate input is ``g``."""
    role = Role.TOKEN_CHANNEL if spec.decay is Decay.CHANNEL else Role.TOKEN
    return Spec(
        decay=spec.decay, correction="comba", gate=None if spec.decay is Decay.NONE else Term.identity("g", role),
        read_before_decay=spec.decay is not Decay.NONE, skip=spec.skip, output_gate=spec.output_gate,
        default_scale=spec.default_scale, name=f"{spec.name or 'spec'}_rows",
    )


class DplrOp(RowsOp):
    """A DPLR spec compiled onto Comba's generated kernels, two rows per token (see the module doc).

    Called like :class:`linattn.CompiledOp`, with the transition's ``a`` and ``b`` ``[B, T, H, K]``
    by name.
    """

    rows = 2

    def _rows(self, call):
        """The core's interleaved q, k (write keys), v, its operands (p: the read keys; g) and z."""
        spec = self.spec
        q, k = (l2norm(call.q), l2norm(call.k)) if spec.qk_l2norm else (call.q, call.k)
        a, b = call.vectors["a"], call.vectors["b"]
        write = torch.stack([-b.to(k.dtype), k], dim=2).flatten(1, 2)  # token t: -b_t at row 2t, k_t at 2t + 1
        inner = {"p": interleave(a.to(k.dtype), 2, 0)}
        if spec.decay is not Decay.NONE:
            shape = (call.B, call.T, call.HV) + ((call.K,) if spec.decay is Decay.CHANNEL else ())
            dtype = torch.promote_types(call.q.dtype, torch.float32)
            inner["g"] = interleave(evaluate_term(spec.gate, call.operands, shape, dtype), 2, 0)
        z = None if call.z is None else interleave(call.z, 2, 1)
        return interleave(q, 2, 1), write, interleave(call.v, 2, 1), inner, z
