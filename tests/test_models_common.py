"""The pieces the model families share: checkpoint reading, cache runners, layers, sampling."""
from __future__ import annotations

import importlib.util
import json
import logging
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from linattn import models
from helpers import TINY_MODELS, tiny_model
from linattn.models.cache import STEP_TOKENS, Cache, run_conv, run_recurrence
from linattn.models.checkpoint import CheckpointTensors, load_state, read_config, read_tensors
from linattn.models.generation import sample_next
from linattn.models.layers import GatedMLP, RMSNorm, attention, dispatch_experts, rotate_half_rope, stacked_experts

import linattn
from linattn.specs import QWEN3_NEXT_GDN


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 3)
        self.norm = RMSNorm(3)


def _folder(tmp_path, tensors, config=None, shards=1):
    tmp_path.mkdir(parents=True, exist_ok=True)
    names = sorted(tensors)
    for i in range(shards):
        part = {n: tensors[n].contiguous() for n in names[i::shards]}
        save_file(part, str(tmp_path / f"model-{i:05d}.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(config or {"model_type": "tiny"}))
    return tmp_path


def test_load_state_strict(tmp_path):
    src = Tiny()
    folder = _folder(tmp_path, {n: torch.randn_like(t) for n, t in src.state_dict().items()}, shards=2)
    tensors = read_tensors(folder)
    assert set(tensors) == {"proj.weight", "proj.bias", "norm.weight"}
    dst = Tiny()
    load_state(dst, tensors)
    for n, t in dst.state_dict().items():
        assert torch.equal(t, tensors[n])
    assert read_config(folder) == {"model_type": "tiny"}

    extra = {**tensors, "proj.extra": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"unknown checkpoint tensors: proj\.extra"):
        load_state(Tiny(), extra)
    partial = {n: t for n, t in tensors.items() if n != "norm.weight"}
    with pytest.raises(ValueError, match=r"missing parameters: norm\.weight"):
        load_state(Tiny(), partial)
    bad = {**tensors, "proj.bias": torch.zeros(5)}
    with pytest.raises(ValueError, match=r"shape mismatches: proj\.bias"):
        load_state(Tiny(), bad)
    renamed = {"old." + n: t for n, t in tensors.items()}
    load_state(Tiny(), renamed, rename=lambda n: n[len("old."):])


def test_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="folder"):
        read_config(tmp_path / "absent")
    with pytest.raises(ValueError, match="no config.json"):
        read_config(tmp_path)
    with pytest.raises(ValueError, match="no \\*.safetensors"):
        read_tensors(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-1.safetensors"}}))
    with pytest.raises(ValueError, match="names missing shards: model-1.safetensors"):
        read_tensors(tmp_path)


def test_check_folder_reads_no_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3_next", **TINY_MODELS["qwen3_next"]}))
    with pytest.raises(ValueError, match="no \\*.safetensors"):
        models.check_folder(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not read")  # a name is enough: nothing is read
    assert models.check_folder(tmp_path) == "qwen3_next"
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="model_type: 'llama'"):
        models.check_folder(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3_next", **TINY_MODELS["qwen3_next"],
                                                      "linear_num_key_heads": 3}))
    with pytest.raises(ValueError, match="linear_num_key_heads"):
        models.check_folder(tmp_path)


def test_loading_reports_each_shard(tmp_path, caplog, capsys, monkeypatch):
    """A checkpoint of several shards reports each one: a tqdm bar (stderr), or without tqdm a log line."""
    src = Tiny()
    tensors = {n: torch.randn_like(t) for n, t in src.state_dict().items()}
    folder = _folder(tmp_path / "two", tensors, shards=2)
    with monkeypatch.context() as m, caplog.at_level(logging.INFO, logger="linattn.models.checkpoint"):
        m.setitem(sys.modules, "tqdm.auto", None)  # tqdm not installed
        load_state(Tiny(), read_tensors(folder))
    shards = [r.getMessage() for r in caplog.records if r.getMessage().startswith("loading shard")]
    assert shards == ["loading shard 1/2: model-00000.safetensors", "loading shard 2/2: model-00001.safetensors"]
    assert all(r.levelno == logging.INFO for r in caplog.records if r.getMessage() in shards)
    assert capsys.readouterr().err == ""

    if importlib.util.find_spec("tqdm") is not None:  # (a dependency of transformers, not of the models)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="linattn.models.checkpoint"):
            load_state(Tiny(), read_tensors(folder))  # tqdm installed: a bar instead of the lines
        bar = capsys.readouterr().err
        assert "Loading checkpoint shards" in bar and "2/2" in bar, bar
        assert not [r for r in caplog.records if r.getMessage().startswith("loading shard")]

    caplog.clear()
    one = _folder(tmp_path / "one", tensors, shards=1)
    with caplog.at_level(logging.INFO, logger="linattn.models.checkpoint"):
        load_state(Tiny(), read_tensors(one))  # one shard: nothing to report
        load_state(Tiny(), read_tensors(folder), progress=False)  # not wanted: nothing either
    assert capsys.readouterr().err == ""
    assert not [r for r in caplog.records if r.getMessage().startswith("loading shard")]

    # a mismatch is reported from the shards' headers, before any tensor is read
    def unread(self, name):
        raise AssertionError(f"read {name}")

    monkeypatch.setattr(CheckpointTensors, "__getitem__", unread)
    bigger = Tiny()
    bigger.extra = nn.Linear(2, 2)
    with pytest.raises(ValueError, match=r"missing parameters: extra\.bias, extra\.weight"):
        load_state(bigger, read_tensors(folder))


def test_attention_matches_softmax():
    torch.manual_seed(0)
    B, Tk, Tq, H, Hkv, D = 2, 9, 3, 4, 2, 8
    q, k, v = torch.randn(B, Tq, H, D), torch.randn(B, Tk, Hkv, D), torch.randn(B, Tk, Hkv, D)
    o = attention(q, k, v, scale=0.3)
    for h in range(H):
        kh, vh = k[:, :, h // 2], v[:, :, h // 2]
        s = torch.einsum("bqd,bkd->bqk", q[:, :, h], kh) * 0.3
        pos_q = torch.arange(Tk - Tq, Tk)[:, None]
        s = s.masked_fill(torch.arange(Tk)[None, :] > pos_q, float("-inf"))
        ref = torch.einsum("bqk,bkd->bqd", s.softmax(-1), vh)
        torch.testing.assert_close(o[:, :, h], ref, rtol=1e-5, atol=1e-5)
    full = attention(q[:, :1].expand(B, Tk, H, D).contiguous(), k, v, 1.0)
    assert full.shape == (B, Tk, H, D)
    with pytest.raises(ValueError, match="k: its 3 heads"):
        attention(q, torch.randn(B, Tk, 3, D), torch.randn(B, Tk, 3, D), 1.0)


def test_partial_rope_rotates_pairs():
    torch.manual_seed(0)
    x = torch.randn(1, 5, 2, 8)
    theta = torch.rand(1, 5, 2)
    cos, sin = torch.cat([theta.cos()] * 2, -1), torch.cat([theta.sin()] * 2, -1)
    y = rotate_half_rope(x, cos, sin)
    assert torch.equal(y[..., 4:], x[..., 4:])
    for i in range(2):  # dims i and i + 2 rotate as a complex pair by theta_i
        c, s = theta[..., i].cos()[:, :, None], theta[..., i].sin()[:, :, None]
        a, b = x[..., i], x[..., i + 2]
        torch.testing.assert_close(y[..., i], a * c - b * s)
        torch.testing.assert_close(y[..., i + 2], b * c + a * s)


def test_dispatch_experts_matches_dense_loop():
    torch.manual_seed(0)
    experts = nn.ModuleList(nn.Linear(6, 6) for _ in range(5))
    x = torch.randn(11, 6)
    indices = torch.stack([torch.randperm(5)[:2] for _ in range(11)])
    weights = torch.rand(11, 2)
    ref = torch.stack([sum(weights[n, j] * experts[int(indices[n, j])](x[n]) for j in range(2)) for n in range(11)])
    torch.testing.assert_close(dispatch_experts(x, weights, indices, experts), ref, rtol=1e-5, atol=1e-6)


def test_dispatch_experts_decode_path_gathers_stacked_weights():
    """Without autograd and at most one (token, expert) pair per expert, the experts run on
    their stacked weights gathered on the device: the same sums as the routed path, and the
    experts' parameters become views of the stack (held once, kept shared by in-place
    updates, stacked again after a cast)."""
    torch.manual_seed(0)
    experts = nn.ModuleList(GatedMLP(6, 5) for _ in range(8))
    x, weights = torch.randn(3, 6), torch.rand(3, 2)
    indices = torch.tensor([[0, 7], [3, 1], [7, 2]])
    ref = torch.stack([sum(weights[n, j] * experts[int(indices[n, j])](x[n]) for j in range(2)) for n in range(3)])
    routed = dispatch_experts(x, weights, indices, experts)  # autograd on: the routed path
    with torch.no_grad():
        gathered = dispatch_experts(x, weights, indices, experts)
    torch.testing.assert_close(gathered, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gathered, routed, rtol=1e-5, atol=1e-6)
    stack = stacked_experts(experts)
    assert stack["up_proj.weight"].shape == (8, 5, 6)
    assert experts[3].up_proj.weight.data_ptr() == stack["up_proj.weight"][3].data_ptr()
    with torch.no_grad():
        experts[7].down_proj.weight.mul_(2.0)  # an in-place update reaches the stack
        assert torch.equal(stacked_experts(experts)["down_proj.weight"][7], experts[7].down_proj.weight)
        experts.double()  # new storage: stacked again, in the new dtype
        y = dispatch_experts(x.double(), weights.double(), indices, experts)
    ref = torch.stack([sum(weights[n, j].double() * experts[int(indices[n, j])](x[n].double()) for j in range(2)) for n in range(3)])
    torch.testing.assert_close(y, ref)
    assert stacked_experts(experts)["gate_proj.weight"].dtype == torch.float64


class _SyncDetector(TorchDispatchMode):
    """Records every op that makes the host wait for the device: a read of a value
    (``item``, ``tolist``, ``bool`` all go through ``_local_scalar_dense`` or the patched
    methods) or an op whose output shape depends on the data."""

    DATA_DEPENDENT = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2", "unique_consecutive",
                      "unique_dim", "repeat_interleave"}

    def __init__(self) -> None:
        super().__init__()
        self.hits: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        masks = [a for a in torch.utils._pytree.tree_leaves(args[1:]) if isinstance(a, torch.Tensor) and a.dtype == torch.bool]
        if name in self.DATA_DEPENDENT or (name in ("index", "index_put", "index_put_") and masks):
            self.hits.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("form", ["gated", "plain"])
def test_dispatch_experts_grouped_path(form, monkeypatch):
    """Without autograd and with more (token, expert) pairs than experts, the experts run as
    grouped products over the stacked weights (one expert getting no token): the dense sums
    in fp32, and in bf16 no further from the float64 sums than the routed path is."""
    from linattn.models.nemotron_h import NemotronHMLP

    calls = []
    grouped_mm = torch._grouped_mm
    monkeypatch.setattr(torch, "_grouped_mm", lambda *a, **k: (calls.append(1), grouped_mm(*a, **k))[1])
    torch.manual_seed(0)
    make = (lambda: GatedMLP(16, 8)) if form == "gated" else (lambda: NemotronHMLP(16, 8, "relu2", bias=True))
    experts = nn.ModuleList(make() for _ in range(6))
    x, weights = torch.randn(7, 16), torch.rand(7, 2)
    indices = torch.stack([torch.randperm(5)[:2] for _ in range(7)])  # expert 5 gets none
    dense = torch.stack([sum(weights[n, j].double() * experts[int(indices[n, j])].double()(x[n].double()) for j in range(2))
                         for n in range(7)])
    experts.float()
    with torch.no_grad():
        grouped = dispatch_experts(x, weights, indices, experts)
    assert calls, "the grouped path did not run"
    torch.testing.assert_close(grouped.double(), dense, rtol=1e-5, atol=1e-5)
    experts.bfloat16()
    xb = x.bfloat16()
    routed = dispatch_experts(xb, weights, indices, experts)  # autograd on: the routed path
    with torch.no_grad():
        grouped = dispatch_experts(xb, weights, indices, experts)
    err = lambda y: (y.double() - dense).abs().max().item()  # noqa: E731
    assert err(grouped) <= 2 * max(err(routed), 2**-8 * dense.abs().max().item()), (err(grouped), err(routed))


@pytest.mark.parametrize("batch", [2, 5], ids=["pairs<=experts", "pairs>experts"])
@pytest.mark.parametrize("family", sorted(TINY_MODELS))
def test_decode_step_never_waits_for_the_device(family, batch, monkeypatch):
    """A decode step of every model (all its layers: the recurrences, the convolutions,
    attention, the MoE) reads nothing back to the host, so it can be captured in a CUDA graph:
    at a batch whose (token, expert) pairs fit the experts once (4 experts, top 2) and at one
    whose pairs outnumber them."""
    model = tiny_model(family)
    detector = _SyncDetector()
    for method in ("tolist", "item", "__bool__", "__int__", "__float__"):
        original = getattr(torch.Tensor, method)
        monkeypatch.setattr(torch.Tensor, method, lambda self, *a, _m=method, _f=original, **k: (detector.hits.append(_m), _f(self, *a, **k))[1])
    with torch.no_grad():
        cache = model.new_cache()
        model(torch.randint(0, 97, (batch, 7)), cache)  # prefill (the routed MoE path reads counts: allowed)
        detector.hits.clear()
        with detector:
            logits = model(torch.randint(0, 97, (batch, 1)), cache)
    assert logits.shape == (batch, 1, 97)
    assert detector.hits == [], f"{family}: host synchronisations in a decode step: {detector.hits}"


def test_sampling():
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    greedy = sample_next(logits)
    assert torch.equal(greedy, logits.argmax(-1))
    g = torch.Generator().manual_seed(1)
    assert torch.equal(sample_next(logits, do_sample=True, top_k=1, generator=g), greedy)
    assert torch.equal(sample_next(logits, do_sample=True, top_p=1e-6, generator=g), greedy)
    a = sample_next(logits, do_sample=True, temperature=0.7, generator=torch.Generator().manual_seed(5))
    b = sample_next(logits, do_sample=True, temperature=0.7, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    # top-k keeps only the k best: 2000 draws never leave them
    draws = torch.stack([sample_next(logits, do_sample=True, top_k=3, generator=g) for _ in range(200)])
    allowed = torch.topk(logits, 3, -1).indices
    assert all(bool((allowed[r] == draws[:, r, None]).any(-1).all()) for r in range(3))
    # top-p: the kept set is the smallest prefix of the sorted probabilities reaching p
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    kept = {int(sample_next(probs, do_sample=True, top_p=0.75, generator=g)) for _ in range(300)}
    assert kept == {0, 1}
    for bad in ({"temperature": 0.0}, {"top_k": 0}, {"top_p": 1.5}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            sample_next(logits, do_sample=True, **bad)


def test_cache_runners_continue_the_sequence():
    """Prefill, one-token steps and a long continuation equal one pass over the whole sequence."""
    torch.manual_seed(0)
    op = linattn.compile(QWEN3_NEXT_GDN)
    B, H, HV, K, V, W = 2, 1, 2, 16, 16, 4
    T = 5 + 2 + STEP_TOKENS + 3
    q, k = torch.randn(B, T, H, K), torch.randn(B, T, H, K)
    v = torch.randn(B, T, HV, V)
    ops = dict(a=torch.randn(B, T, HV), b=torch.randn(B, T, HV))
    params = dict(A_log=torch.randn(HV) * 0.5, dt_bias=torch.randn(HV))
    x, w = torch.randn(B, T, 6), torch.randn(6, W)
    full_o = run_recurrence("l", None, op, q, k, v, **ops, **params)
    full_y = run_conv("c", None, x, w, None, "silu")
    cache = Cache()
    outs, ys = [], []
    for s, e in [(0, 5), (5, 6), (6, 7), (7, T)]:  # prefill, two steps, a chunked continuation
        outs.append(run_recurrence("l", cache, op, q[:, s:e], k[:, s:e], v[:, s:e], **{n: t[:, s:e] for n, t in ops.items()}, **params))
        ys.append(run_conv("c", cache, x[:, s:e], w, None, "silu"))
    torch.testing.assert_close(torch.cat(outs, 1), full_o, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.cat(ys, 1), full_y, rtol=1e-5, atol=1e-5)
    snap = cache.snapshot()
    run_recurrence("l", cache, op, q[:, :1], k[:, :1], v[:, :1], **{n: t[:, :1] for n, t in ops.items()}, **params)
    assert not torch.equal(cache.recurrent["l"], snap.recurrent["l"])
    before = snap.recurrent["l"].clone()
    cache.restore(snap)
    assert torch.equal(cache.recurrent["l"], before)


def test_models_import_without_transformers():
    code = (
        "import sys; sys.modules['transformers'] = None\n"
        "import models, models.cache, models.generation, models.checkpoint, models.layers\n"
        "import pkgutil, importlib\n"
        "for m in pkgutil.iter_modules(models.__path__): importlib.import_module('linattn.models.' + m.name)\n"
        "assert 'transformers' not in {n.split('.')[0] for n, v in sys.modules.items() if v is not None}\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
