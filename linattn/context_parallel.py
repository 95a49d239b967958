"""Context parallelism: one packed token stream split over the ranks of a process group.

Each rank holds a contiguous share of the stream (batch 1, ranks in group-rank order, shares
of any length, 0 included); ``cu_seqlens`` holds the global offsets. Per head, a share's
part of a sequence is an affine map of the state, ``S ↦ M·S + B``: ``M`` [K, K] the product of
its transitions (every spec's transition acts on the key side), ``B`` its final state from
a zero start. Each rank computes the map of its last segment with the op itself (``B``: the
segment from a zero state, or from its ``initial_state`` where the sequence starts there;
``M``: the segment with ``v = 0`` from the identity, on the spec without its output-side
terms), the maps are all-gathered (P · HV · K · (K + V) values a rank, whatever T), and each
rank composes the maps of the ranks before it that its first sequence crosses into that
sequence's state at its share's start, then runs the ordinary op from it.

Everything in between is differentiable: the exchange is an all-gather whose backward sums
the gathered gradients over the ranks, so the backward mirrors the forward with the state
gradient flowing back across ranks. Final states are summed over the ranks (only the rank
holding a sequence's last token contributes it), so every rank returns the same ones and
the gradients flowing into them are summed, as for any replicated output.

Cost: besides the local call, the last segment runs twice more (its ``B``; its ``M`` where
it continues a sequence from an earlier rank, with V = K), and one all-gather moves the maps.
``cu_seqlens`` is read on the host (a synchronisation, once a call).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .spec import OutputGate, Role, Skip

__all__ = ["forward", "Share"]


class _AllGather(torch.autograd.Function):
    """``[P, *x.shape]``, the ranks' ``x`` stacked; backward: the gradients summed over the
    ranks (an all-reduce, which gloo has), this rank's row."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad[dist.get_rank(ctx.group)], None


class _Tie(torch.autograd.Function):
    """``outs`` as they are, with ``gathered`` in their graph: every rank's backward then
    reaches the all-gather (whose backward is a collective) even where its own outputs do not
    depend on what it gathered (rank 0, or a rank whose first sequence starts on it)."""

    @staticmethod
    def forward(ctx, gathered: torch.Tensor, *outs: torch.Tensor):
        ctx.shape, ctx.dtype = gathered.shape, gathered.dtype
        return tuple(x.view_as(x) for x in outs)

    @staticmethod
    def backward(ctx, *grads):
        return (torch.zeros(ctx.shape, dtype=ctx.dtype, device=grads[0].device if grads[0] is not None else None), *grads)


class _AllReduce(torch.autograd.Function):
    """The sum over the ranks; backward: the gradients summed over the ranks."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def _agree(group, TT: int, cu: torch.Tensor) -> list[int]:
    """Every rank's share length, after checking that the ranks hold the same ``cu_seqlens``
    and that the shares add up to it. Every rank raises the same error (none is left waiting
    in a collective)."""
    P = dist.get_world_size(group)
    mine = torch.tensor([TT, cu.numel()], dtype=torch.int64)
    sizes = [torch.empty_like(mine) for _ in range(P)]
    dist.all_gather(sizes, mine, group=group)
    shares = [int(s[0]) for s in sizes]
    if len({int(s[1]) for s in sizes}) != 1:
        raise ValueError(f"cu_seqlens: the ranks of cp_group hold different cu_seqlens (lengths {[int(s[1]) for s in sizes]})")
    cus = [torch.empty_like(cu) for _ in range(P)]
    dist.all_gather(cus, cu.contiguous(), group=group)
    if any(not torch.equal(c, cus[0]) for c in cus):
        raise ValueError("cu_seqlens: the ranks of cp_group hold different cu_seqlens; it must be the global offsets on every rank")
    steps = cus[0][1:] - cus[0][:-1]
    if cus[0].numel() < 2 or int(cus[0][0]) != 0 or bool((steps <= 0).any()):
        raise ValueError(f"cu_seqlens: must start at 0 and be strictly increasing, got {cus[0].tolist()}")
    if int(cus[0][-1]) != sum(shares):
        raise ValueError(
            f"cu_seqlens: ends at {int(cus[0][-1])} tokens, but the ranks' shares add up to {sum(shares)} ({shares})"
        )
    return shares


class Share:
    """This rank's share of a packed stream split over ``group``: global tokens ``[a, b)``,
    every rank's start (``starts[i]`` to ``starts[i + 1]``), the global sequence bounds."""

    def __init__(self, group, cu: torch.Tensor, TT: int) -> None:
        self.group = group
        cu = cu.detach().to("cpu", torch.int64)
        shares = _agree(group, TT, cu)
        self.rank, self.P = dist.get_rank(group), len(shares)
        self.starts = [sum(shares[:i]) for i in range(self.P + 1)]
        self.a, self.b = self.starts[self.rank], self.starts[self.rank + 1]
        self.bounds = cu.tolist()

    def local_cu(self) -> list[int]:
        """The offsets of this share's segments (the sequences it holds tokens of, cut to it)."""
        out = [0]
        for n in range(len(self.bounds) - 1):
            lo, hi = max(self.bounds[n], self.a), min(self.bounds[n + 1], self.b)
            if hi > lo:
                out.append(hi - self.a)
        return out

    def first_start(self) -> int:
        """The global start of the sequence holding this share's first token."""
        return max(s for s in self.bounds[:-1] if s <= self.a)

    def gather_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``[1, b - a, ...]`` of every rank as the global ``[1, total, ...]`` (differentiable:
        each rank gets back the gradient of its rows, summed over the ranks)."""
        longest = max(self.starts[i + 1] - self.starts[i] for i in range(self.P))
        pad = x.new_zeros(1, longest - x.shape[1], *x.shape[2:])
        every = _AllGather.apply(torch.cat([x, pad], 1), self.group)  # [P, 1, longest, ...]
        return torch.cat([every[i, :, : self.starts[i + 1] - self.starts[i]] for i in range(self.P)], 1)

    def before(self, x: torch.Tensor, n: int, width: int) -> torch.Tensor:
        """The last ``n`` rows before this share of every rank's ``x`` ``[1, b - a, ...]`` (``n`` at
        most ``width`` and the tokens before ``a``): each rank sends only its last ``width``
        rows (zeros in front where its share is shorter), and the rows are taken walking back
        over the ranks before, however short their shares."""
        tail = x[:, max(x.shape[1] - width, 0) :]
        tail = torch.cat([x.new_zeros(1, width - tail.shape[1], *x.shape[2:]), tail], 1)
        every = _AllGather.apply(tail, self.group)  # [P, 1, width, ...]
        pieces, need, i = [], n, self.rank - 1
        while need > 0:
            take = min(need, self.starts[i + 1] - self.starts[i])
            if take:
                pieces.insert(0, every[i, :, width - take :])
            need, i = need - take, i - 1
        return torch.cat(pieces, 1) if pieces else every[0, :, :0]  # in the graph either way: its backward is a collective


def _tokens(call, a: int, b: int) -> dict:
    """The per-token tensors of ``call`` cut to tokens ``[a, b)`` (the rest as is)."""
    cut = {}
    for o in call.spec.operands:
        x = call.operands[o.name]
        cut[o.name] = x[:, a:b] if o.role in (Role.TOKEN, Role.TOKEN_CHANNEL) else x
    cut.update((name, x[:, a:b]) for name, x in call.vectors.items())  # Comba's p
    return cut


def _tensors(call) -> list[torch.Tensor]:
    named = [call.q, call.k, call.v, call.z, call.D, call.initial_state, *call.operands.values(), *call.vectors.values()]
    return [t for t in named if isinstance(t, torch.Tensor) and t.is_floating_point()]


def forward(op, call, output_final_state: bool, group) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``op`` on this rank's share of a packed stream split over ``group``: see the module."""
    if call.B != 1:
        raise ValueError(f"q: with cp_group, each rank holds its share of one packed stream (batch 1), got batch {call.B}")
    if call.cu_seqlens is None:
        raise ValueError("cu_seqlens: with cp_group, the global offsets of the packed stream are required")
    HV, K, V = call.HV, call.K, call.V
    share = Share(group, call.cu_seqlens, call.T)
    r, P, starts, bounds = share.rank, share.P, share.starts, share.bounds
    a, b = share.a, share.b
    N = len(bounds) - 1
    dev, f32 = call.q.device, torch.float32
    h0 = call.initial_state

    def seq_of(t: int) -> int:  # the sequence holding global token t
        return max(n for n in range(N) if bounds[n] <= t < bounds[n + 1])

    def start_state(n: int) -> torch.Tensor:
        return h0[n].to(f32) if h0 is not None else torch.zeros(HV, K, V, device=dev, dtype=f32)

    # ---- this rank's map: that of its last segment (identity and zero for an empty share)
    M = torch.eye(K, device=dev, dtype=f32).expand(HV, K, K)
    Bm = torch.zeros(HV, K, V, device=dev, dtype=f32)
    if b > a:
        n = seq_of(b - 1)
        s = max(bounds[n], a)  # the last segment: tokens [s, b) of sequence n
        seg = slice(s - a, b - a)
        fresh = s == bounds[n]  # the sequence starts on this rank
        kw = dict(scale=call.scale, z=None if call.z is None else call.z[:, seg], D=call.D, **_tokens(call, s - a, b - a))
        init = start_state(n)[None] if fresh else None
        _, Bm = op(call.q[:, seg], call.k[:, seg], call.v[:, seg], initial_state=init, output_final_state=True, **kw)
        Bm = Bm[0]
        if not fresh and bounds[n + 1] > b:  # a middle of a chain: its transitions too
            Mop = op.transition_op()
            zeros = torch.zeros(1, b - s, HV, K, device=dev, dtype=call.v.dtype)
            eye = torch.eye(K, device=dev, dtype=f32).expand(1, HV, K, K).contiguous()
            kw = dict(scale=call.scale, **_tokens(call, s - a, b - a))
            _, M = Mop(call.q[:, seg], call.k[:, seg], zeros, initial_state=eye, output_final_state=True, **kw)
            M = M[0]
    # an exact 0 carrying every input's graph: the all-gather (and its collective backward)
    # is then in every rank's graph, an empty share's included
    anchor = sum(t.reshape(-1)[:0].sum() for t in _tensors(call) if t.requires_grad)
    maps = _AllGather.apply(torch.cat([M.reshape(-1), Bm.reshape(-1)]) + anchor, group)  # one collective, both ways
    Ms = maps[:, : HV * K * K].view(P, HV, K, K)
    Bs = maps[:, HV * K * K :].view(P, HV, K, V)

    # ---- the local call, from the composed state where the first sequence began earlier
    if b == a:
        o = call.q.new_zeros(1, 0, HV, V)
        local_final = {}
    else:
        held = [n for n in range(N) if max(bounds[n], a) < min(bounds[n + 1], b)]  # the sequences it holds tokens of
        first = held[0]
        inits = []
        for n in held:
            if n == first and bounds[n] < a:  # begun on earlier ranks: their maps, in order
                h = None
                for i in range(r):
                    if starts[i + 1] > bounds[n]:  # the rank holding its start, and each after it
                        h = Bs[i] if h is None else torch.matmul(Ms[i], h) + Bs[i]
                inits.append(h)
            else:
                inits.append(start_state(n))
        kw = dict(scale=call.scale, z=call.z, D=call.D, **call.named)
        cu_local = torch.tensor(share.local_cu(), device=call.cu_seqlens.device, dtype=call.cu_seqlens.dtype)
        o, finals = op(call.q, call.k, call.v, initial_state=torch.stack(inits), output_final_state=True,
                       cu_seqlens=cu_local, **kw)
        local_final = {n: finals[i] for i, n in enumerate(held) if bounds[n + 1] <= b}
    if not output_final_state:
        (o,) = _Tie.apply(maps, o)
        return o, None
    # ---- every sequence's final state, from the rank holding its last token
    zero = torch.zeros(HV, K, V, device=dev, dtype=f32)
    rows = [local_final.get(n, zero) for n in range(N)]
    return _Tie.apply(maps, o, _AllReduce.apply(torch.stack(rows) + anchor, group))


def transition_spec(spec):
    """``spec`` without the terms that only touch the output (output gate, D skip): what the
    transitions' map is computed with."""
    return spec.replace(output_gate=OutputGate.NONE, skip=Skip.NONE, name=f"{spec.name or 'spec'}_transition")
