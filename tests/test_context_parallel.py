"""Context parallelism over torch.distributed (gloo, CPU): P processes, each holding its share
of one packed stream, against the same call in one process: the outputs, every final state,
the gradients of per-token inputs (this rank's slice) and of replicated ones (summed over the
ranks). Every process runs with a timeout, so a failure can never hang the suite."""
from __future__ import annotations

import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch

from linattn import specs
from linattn.spec import Role

#: (spec, lengths of the packed sequences, the ranks' shares)
CASES = {
    "gdn-P2-uneven-h0": ("GDN", [40, 23, 37], [55, 45]),
    "kda-P3-spans-all": ("KDA", [70, 10], [30, 0, 50]),
    "qwen-P4-empty-rank": ("QWEN3_NEXT_GDN", [17, 60, 3], [20, 25, 0, 35]),
    "mamba2-P3": ("NEMOTRON_MAMBA2", [33, 47], [16, 40, 24]),
    "gla-P2-chunk-inside": ("GLA", [90], [45, 45]),
    "linear-P2": ("LINEAR", [50, 30], [60, 20]),
    "deltanet-P3": ("DELTANET", [80], [10, 60, 10]),
    "simple-gla-P2": ("SIMPLE_GLA", [25, 25, 25], [40, 35]),
    "mamba2-P2": ("MAMBA2", [64, 16], [70, 10]),
    "kimi-P2": ("KIMI_KDA", [30, 14], [12, 32]),
    "comba-P3-transition": ("COMBA", [70, 13], [20, 30, 33]),
    "rwkv7-P2": ("RWKV7", [40, 23], [50, 13]),
}

#: cases whose group leaves rank 0 of the world out
SUBGROUP = {"gdn-subgroup-of-3": ("GDN", [30, 41], [26, 45])}
#: cu_seqlens that the ranks must reject, each with the same error
BAD_CU = {"disagree": [[0, 20, 50], [0, 30, 50]], "short": [[0, 20, 40], [0, 20, 40]],
          "empty-sequence": [[0, 20, 20, 50], [0, 20, 20, 50]]}

#: the drop-in ops with cp_group: (op, the ranks' shares) over sequences of 30 and 50 tokens
DROPIN = {"chunk_gated_delta_rule": [35, 45], "chunk_kda": [50, 30], "chunk_simple_gla": [20, 0, 60],
          "mamba_chunk_scan_combined": [35, 45]}

#: a training step of each tiny model: (the ranks' shares) of sequences of 20 and 35 tokens; the
#: 2-token share is shorter than the convolutions' W - 1 = 3 inputs before a token
MODELS = {"qwen3_next": [25, 2, 28], "kimi_linear": [30, 25], "nemotron_h": [10, 30, 15]}

_TIMEOUT = 240


def _dropin_inputs(name: str) -> tuple[dict, set, object]:
    """Global inputs of a drop-in op (two packed sequences, 30 and 50 tokens), the names of
    the per-token ones, and the call: ``run(tensors, cp_group) -> (out, states)``."""
    from linattn import ops

    gen = torch.Generator().manual_seed(3)
    T, H, K, V = 80, 2, 16, 16
    rand = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731
    cu = torch.tensor([0, 30, 80], dtype=torch.int32)
    if name == "mamba_chunk_scan_combined":
        t = {"x": rand(1, T, H, V), "dt": rand(1, T, H), "A": -torch.rand(H, generator=gen) - 0.5, "B": rand(1, T, 1, K),
             "C": rand(1, T, 1, K), "D": rand(H), "z": rand(1, T, H, V), "dt_bias": rand(H), "initial_states": rand(1, H, V, K)}
        seq_idx = torch.tensor([0] * 30 + [1] * 50, dtype=torch.int32)[None]

        def run(t, group, a=0, b=T):
            out, states = ops.mamba_chunk_scan_combined(t["x"], t["dt"], t["A"], t["B"], t["C"], 64, D=t["D"], z=t["z"],
                                                        dt_bias=t["dt_bias"], initial_states=t["initial_states"],
                                                        seq_idx=seq_idx[:, a:b], cu_seqlens=cu, dt_softplus=True,
                                                        return_varlen_states=True, cp_group=group)
            return out, states

        return t, {"x", "dt", "B", "C", "z"}, run
    g = -torch.rand(1, T, H, K, generator=gen) if name == "chunk_kda" else -torch.rand(1, T, H, generator=gen)
    t = {"q": rand(1, T, H, K), "k": rand(1, T, H, K), "v": rand(1, T, H, V), "g": g, "initial_state": rand(2, H, K, V)}
    if name != "chunk_simple_gla":
        t["beta"] = torch.rand(1, T, H, generator=gen)

    def run(t, group, a=0, b=T):
        kw = {n: x for n, x in t.items() if n not in ("q", "k", "v")}
        if name != "chunk_simple_gla":
            kw["use_qk_l2norm_in_kernel"] = True
        return getattr(ops, name)(t["q"], t["k"], t["v"], output_final_state=True, cu_seqlens=cu, cp_group=group, **kw)

    return t, {"q", "k", "v", "g", "beta"}, run


def _on_first_rank(group, compute):
    """``compute()`` run once, on the group's first rank, and sent to the others (the
    single-process reference: P copies of it would only load the CPU)."""
    import torch.distributed as dist

    box = [compute() if dist.get_rank(group) == 0 else None]
    dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0), group=group)
    return box[0]


def _model_worker(rank: int, world: int, family: str, group) -> None:
    import torch.distributed as dist

    from helpers import tiny_model

    torch.manual_seed(0)
    model = tiny_model(family).float()
    torch.manual_seed(0)
    twin = tiny_model(family).float()  # the same weights, its own gradients
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 97, (1, 55), generator=gen)
    cu = torch.tensor([0, 20, 55], dtype=torch.int32)
    w = torch.randn(1, 55, model.config.vocab_size, generator=gen)

    def reference():
        logits = model(ids, cu_seqlens=cu)
        (logits * w).sum().backward()
        return logits.detach(), [p.grad for p in model.parameters()]

    logits, grads = _on_first_rank(group, reference)
    shares = MODELS[family]
    a, b = sum(shares[:rank]), sum(shares[: rank + 1])
    mine = twin(ids[:, a:b], cu_seqlens=cu, cp_group=group)
    (mine * w[:, a:b]).sum().backward()
    tol = dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(mine, logits[:, a:b], **tol)
    for (n, p), q, grad in zip(twin.named_parameters(), twin.parameters(), grads):
        g = q.grad.clone() if q.grad is not None else torch.zeros_like(p)
        dist.all_reduce(g, group=group)  # each rank's contribution; their sum is the gradient
        ref = grad if grad is not None else torch.zeros_like(p)
        torch.testing.assert_close(g, ref, **tol, msg=lambda m, n=n: f"{family} rank {rank} d{n}: {m}")


def _dropin_worker(rank: int, world: int, name: str, group) -> None:
    import torch.distributed as dist

    t, token, run = _dropin_inputs(name)
    shares = DROPIN[name]
    a, b = sum(shares[:rank]), sum(shares[: rank + 1])
    def reference():
        full = {n: x.clone().requires_grad_() for n, x in t.items()}
        out, states = run(full, None)
        gen = torch.Generator().manual_seed(9)
        w_o, w_s = torch.randn(out.shape, generator=gen), torch.randn(states.shape, generator=gen)
        ((out * w_o).sum() + (states * w_s).sum()).backward()
        return out.detach(), states.detach(), w_o, w_s, {n: x.grad for n, x in full.items()}

    out, states, w_o, w_s, grads = _on_first_rank(group, reference)
    mine = {n: (x[:, a:b] if n in token else x).detach().clone().requires_grad_() for n, x in t.items()}
    out_cp, states_cp = run(mine, group, a, b)
    ((out_cp * w_o[:, a:b]).sum() + (states_cp * w_s).sum() / world).backward()
    tol = dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out_cp, out[:, a:b], **tol)
    torch.testing.assert_close(states_cp, states, **tol)
    for n, x in mine.items():
        if n in token:
            torch.testing.assert_close(x.grad, grads[n][:, a:b], **tol, msg=lambda m, n=n: f"{name} rank {rank} d{n}: {m}")
        else:
            g = x.grad.clone()
            dist.all_reduce(g, group=group)
            torch.testing.assert_close(g, grads[n], **tol, msg=lambda m, n=n: f"{name} rank {rank} d{n}: {m}")


def _inputs(spec, lengths):
    from linattn.testing import random_inputs

    return random_inputs(spec, H=2, HV=2, K=16, V=16, dtype=torch.float32, seed=1, lengths=lengths, h0=True)


def _worker(rank: int, world: int, init: str, case: str) -> None:
    import torch.distributed as dist

    import linattn

    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world, timeout=timedelta(seconds=120))
    if case in BAD_CU:  # shares of 25 tokens each against cu_seqlens that disagree or end short
        group = dist.new_group(list(range(world)))
        x = _inputs(specs.GDN, [25])
        cu = torch.tensor(BAD_CU[case][rank], dtype=torch.int32)
        kw = {n: t for n, t in x.kwargs.items() if n not in ("cu_seqlens", "initial_state")}
        with pytest.raises(ValueError, match="cu_seqlens"):
            linattn.compile(specs.GDN)(x.q, x.k, x.v, cu_seqlens=cu, cp_group=group, **kw)
        dist.destroy_process_group()
        return
    if case == "model-empty-share":  # every rank raises, none waits
        from helpers import tiny_model

        group = dist.new_group(list(range(world)))
        ids = torch.randint(0, 97, (1, [4, 0, 3][rank]))
        with pytest.raises(ValueError, match="share"):
            tiny_model("nemotron_h")(ids, cu_seqlens=torch.tensor([0, 7], dtype=torch.int32), cp_group=group)
        dist.destroy_process_group()
        return
    if case in MODELS:
        _model_worker(rank, world, case, dist.new_group(list(range(world))))
        dist.destroy_process_group()
        return
    if case in DROPIN:
        _dropin_worker(rank, world, case, dist.new_group(list(range(world))))
        dist.destroy_process_group()
        return
    if case in SUBGROUP:
        name, lengths, shares = SUBGROUP[case]
        group = dist.new_group([1, 2])  # every rank of the world creates it
        if rank == 0:
            dist.destroy_process_group()
            return
        rank, world = dist.get_rank(group), 2
    else:
        name, lengths, shares = CASES[case]
        group = dist.new_group(list(range(world)))
    spec = getattr(specs, name)
    op = linattn.compile(spec)
    x = _inputs(spec, lengths)
    token = {o.name for o in spec.operands if o.role in (Role.TOKEN, Role.TOKEN_CHANNEL)} | {"z", *spec.correction_inputs}
    gen = torch.Generator().manual_seed(7)
    T, N = sum(lengths), len(lengths)
    w_o = torch.randn(1, T, x.v.shape[2], x.v.shape[3], generator=gen)
    w_h = torch.randn(N, x.v.shape[2], x.q.shape[3], x.v.shape[3], generator=gen)

    def leaves(src):
        return {n: t.detach().clone().requires_grad_(t.is_floating_point()) for n, t in src.items()}

    full = leaves({"q": x.q, "k": x.k, "v": x.v, **{n: t for n, t in x.kwargs.items() if isinstance(t, torch.Tensor)}})

    def reference():
        kw = {n: t for n, t in full.items() if n not in ("q", "k", "v")}
        o, ht = op(full["q"], full["k"], full["v"], output_final_state=True, **kw)
        ((o * w_o).sum() + (ht * w_h).sum()).backward()
        return o.detach(), ht.detach(), {n: t.grad for n, t in full.items()}

    o, ht, grads = _on_first_rank(group, reference)

    a, b = sum(shares[:rank]), sum(shares[: rank + 1])
    mine = {}
    for n, t in full.items():
        t = t.detach()
        mine[n] = t[:, a:b] if n in ("q", "k", "v") or n in token else t
    mine = leaves(mine)
    kw = {n: t for n, t in mine.items() if n not in ("q", "k", "v")}
    o_cp, ht_cp = op(mine["q"], mine["k"], mine["v"], output_final_state=True, cp_group=group, **kw)
    # the final states are replicated: each rank's share of their loss
    ((o_cp * w_o[:, a:b]).sum() + (ht_cp * w_h).sum() / world).backward()

    tol = dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(o_cp, o[:, a:b], **tol)
    torch.testing.assert_close(ht_cp, ht, **tol)
    every = [torch.empty_like(ht_cp) for _ in range(world)]
    dist.all_gather(every, ht_cp.detach().contiguous(), group=group)
    assert all(torch.equal(h, every[0]) for h in every), "the final states differ between ranks"
    for n, t in mine.items():
        if t.grad is None and grads[n] is None:
            continue
        if n in ("q", "k", "v") or n in token:
            torch.testing.assert_close(t.grad, grads[n][:, a:b], **tol, msg=lambda m, n=n: f"{case} rank {rank} d{n}: {m}")
        else:  # replicated: the ranks' contributions add up to the gradient
            g = t.grad.clone()
            dist.all_reduce(g, group=group)
            torch.testing.assert_close(g, grads[n], **tol, msg=lambda m, n=n: f"{case} rank {rank} d{n}: {m}")
    dist.destroy_process_group()


def _run(world: int, case: str, tmp_path: Path) -> None:
    init = tmp_path / "init"
    # the workers import what this process imports (its sys.path, this folder first)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), *(p for p in sys.path if p)])}
    procs = [
        subprocess.Popen([sys.executable, __file__, str(r), str(world), str(init), case], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for r in range(world)
    ]
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=_TIMEOUT)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"{case}: a rank did not finish in {_TIMEOUT} s")
    failed = [(r, out) for r, (p, out) in enumerate(zip(procs, outs)) if p.returncode != 0]
    assert not failed, "\n".join(f"rank {r}:\n{out[-3000:]}" for r, out in failed)


@pytest.mark.parametrize("case", sorted(CASES))
def test_context_parallel_matches_one_process(case, tmp_path):
    _run(len(CASES[case][2]), case, tmp_path)


@pytest.mark.parametrize("name", sorted(DROPIN))
def test_drop_in_ops_take_cp_group(name, tmp_path):
    """fla's and mamba_ssm's drop-in ops with ``cp_group``: mamba with its own conventions
    (``seq_idx`` this rank's slice, ``initial_states`` mamba's, the states through
    ``return_varlen_states``)."""
    _run(len(DROPIN[name]), name, tmp_path)


@pytest.mark.parametrize("family", sorted(MODELS))
def test_model_training_step_under_context_parallelism(family, tmp_path):
    """A tiny model's logits and every parameter's gradient under context parallelism
    (each rank its share of a packed batch) equal the single-process ones."""
    _run(len(MODELS[family]), family, tmp_path)


def test_model_rejects_an_empty_share_on_every_rank(tmp_path):
    _run(3, "model-empty-share", tmp_path)


def test_context_parallel_on_a_subgroup(tmp_path):
    """A group of ranks 1 and 2 of a world of 3: ranks are the group's, not the world's."""
    _run(3, "gdn-subgroup-of-3", tmp_path)


@pytest.mark.parametrize("case", sorted(BAD_CU))
def test_context_parallel_rejects_bad_cu_seqlens_on_every_rank(case, tmp_path):
    """Ranks holding different cu_seqlens, shares that do not add up to it, or an empty
    sequence: every rank raises a ValueError naming cu_seqlens (none is left waiting)."""
    _run(2, case, tmp_path)


def test_readme_torchrun_example(tmp_path):
    """The README's torchrun example, run as torchrun would (2 ranks, env:// rendezvous)."""
    import socket

    text = (Path(__file__).parent.parent / "README.md").read_text()
    body = text[text.index("# cp.py, run with"):]
    script = tmp_path / "cp.py"
    script.write_text(body[: body.index("```")])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for r in range(2):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(r), "WORLD_SIZE": "2",
               "LOCAL_RANK": str(r)}
        procs.append(subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    try:
        outs = [p.communicate(timeout=_TIMEOUT)[0] for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"the README example did not finish in {_TIMEOUT} s")
    for r, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, out[-3000:]
        assert f"{r} torch.Size([1, 50, 2, 16]) torch.Size([2, 2, 16, 16])" in out, out[-3000:]


if __name__ == "__main__":
    import fast_interpreter

    fast_interpreter.install()
    _worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
