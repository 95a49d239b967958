"""The chunk table: which tokens each program of a chunk-parallel kernel handles.

Program ``p`` of a chunk-parallel kernel handles chunk ``p`` of the batch in sequence
order. The table is built on the device by one small kernel from ``cu_seqlens`` (int32
or int64) on every call, so it can never be stale (a serving engine rewrites its
``cu_seqlens`` buffer in place every step) and the host never reads the bounds. The
grid is an upper bound on the number of chunks, ``ceil(TT / C) + N``; spare programs
get length 0.

The kernel also clamps what it reads into ``[0, TT]`` (so a bad table never sends a
program outside the tensors) and reports in ``cu_ok`` whether ``cu_seqlens`` was valid:
starts at 0, ends at TT, strictly increasing.
"""
from __future__ import annotations

from .emit import Kernel, signature
from .manifest import declare, out
from .plan import Plan
from .source import Source

__all__ = ["table_kernel", "TABLE_ROWS"]

#: chunks per program of the table kernel
TABLE_ROWS = 128
#: sequences read per step of its loop
_SEQS = 16


def table_kernel(plan: Plan) -> Kernel:
    params = ["cu_seqlens", out("chunk_t0"), out("chunk_len"), out("chunk_off"), out("cu_ok")]
    params += ["N", "TT", "NCH"]
    s = Source()
    params = declare(plan, params)
    with s.block(signature("chunk_table", params)):
        s('"""chunk_t0 (first token), chunk_len (0 for spare programs) of chunks p of this program;')
        s('program 0 also writes chunk_off [N + 1] (each sequence\'s first chunk) and cu_ok."""')
        s("i_p = tl.program_id(0)", f"p = i_p * {TABLE_ROWS} + tl.arange(0, {TABLE_ROWS})")
        s(f"b_t0 = tl.zeros([{TABLE_ROWS}], dtype=tl.int64)", f"b_end = tl.zeros([{TABLE_ROWS}], dtype=tl.int64)")
        s(f"carry = tl.sum(tl.zeros([{_SEQS}], dtype=tl.int64), 0)  # chunks of the sequences before this block")
        s(f"bad = tl.sum(tl.zeros([{_SEQS}], dtype=tl.int32), 0)")
        with s.block(f"for n0 in range(0, N, {_SEQS}):"):
            s(f"n = n0 + tl.arange(0, {_SEQS})", "ok = n < N")
            s("lo = tl.load(cu_seqlens + n, mask=ok, other=0).to(tl.int64)")
            s("hi = tl.load(cu_seqlens + n + 1, mask=ok, other=0).to(tl.int64)")
            s("wrong = (hi <= lo) | ((n == 0) & (lo != 0)) | ((n == N - 1) & (hi != TT))")
            s("bad += tl.sum(tl.where(ok & wrong, 1, 0), 0)")
            s("lo = tl.minimum(tl.maximum(lo, 0), TT)", "hi = tl.minimum(tl.maximum(hi, lo), TT)")
            s("nch = tl.where(ok, (hi - lo + C - 1) // C, 0)")
            s("incl = tl.cumsum(nch, 0) + carry  # one past each sequence's last chunk", "excl = incl - nch")
            s("own = (p[:, None] >= excl[None, :]) & (p[:, None] < incl[None, :])")
            s("b_t0 += tl.sum(tl.where(own, lo[None, :] + (p[:, None] - excl[None, :]) * C, 0), 1)")
            s("b_end += tl.sum(tl.where(own, hi[None, :], 0), 1)")
            s("if i_p == 0:", "    tl.store(chunk_off + n, tl.minimum(excl, NCH).to(tl.int32), mask=ok)")
            s("carry += tl.sum(nch, 0)")
        s("if i_p == 0:")
        s("    tl.store(chunk_off + N, tl.minimum(carry, NCH).to(tl.int32))")
        s("    tl.store(cu_ok, tl.where(bad == 0, 1, 0))")
        s("in_grid = p < NCH")
        s("tl.store(chunk_t0 + p, b_t0, mask=in_grid)")
        s("tl.store(chunk_len + p, tl.minimum(b_end - b_t0, C).to(tl.int32), mask=in_grid)")
    return Kernel("chunk_table", params, (("NCH", TABLE_ROWS),), s.text(), 4)
