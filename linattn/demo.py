"""The demo: the built-in specs, the two reference forms agreeing, a compiled KDA, a model,
and transformers' own model on linattn's kernels (when transformers is installed).

:func:`sections` lists the demo's parts in order, each with a one-line description said
before it runs and a function returning its report lines; :func:`report` runs them and
writes each part's lines as they come (``python -m linattn demo`` prints through it: the whole
demo takes minutes on a CPU, where the kernels run through Triton's interpreter);
:func:`run` returns every line at once.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch

from linattn.codegen import manifest

from . import specs
from .op import compile as compile_spec
from .specs import BUILTIN
from .testing import random_inputs, rel_err

__all__ = ["TINY_QWEN3_NEXT", "Section", "check_arguments", "report", "run", "sections"]


@dataclass(frozen=True)
class Section:
    """One part of the demo: ``title`` says what it is about to do; ``lines()`` does it,
    giving its report lines as they come (a long part reports its steps as it goes)."""

    title: str
    lines: Callable[[], Iterable[str]]


def _builtin_specs() -> Iterator[str]:
    return (repr(spec) for spec in BUILTIN.values())


def _references() -> Iterator[str]:
    from linattn.reference import chunkwise, recurrent  # the demo exercises the oracles; the library never does

    B, T, H, HV, K, V = 2, 200, 2, 4, 32, 32
    yield "reference check: chunkwise form (C=64, fp32) vs token-by-token oracle (fp64),"
    yield f"random inputs with gates down to -3 per token and an initial state; B={B} T={T} H={H} HV={HV} K={K} V={V}"
    yield f"{'spec':<16} {'rel err o':>10} {'rel err S':>10} {'ms':>7}"
    for spec in BUILTIN.values():
        x = random_inputs(spec, B=B, T=T, H=H, HV=HV, K=K, V=V, strength=3.0, h0=True)
        o_ref, s_ref = recurrent(spec, x.q, x.k, x.v, output_final_state=True, **x.kwargs)
        f32 = {n: (t.float() if isinstance(t, torch.Tensor) else t) for n, t in x.kwargs.items()}
        t0 = time.perf_counter()
        o, s = chunkwise(spec, x.q.float(), x.k.float(), x.v.float(), output_final_state=True, **f32)
        ms = (time.perf_counter() - t0) * 1e3
        yield f"{spec.name:<16} {rel_err(o, o_ref):>10.2e} {rel_err(s, s_ref):>10.2e} {ms:>7.1f}"


def _compiled_kda() -> Iterator[str]:
    from linattn.reference import recurrent

    spec = specs.KIMI_KDA
    device = "cuda" if torch.cuda.is_available() else "cpu"
    op = compile_spec(spec)
    gen, _ = op.module("bf16", 64, 64)
    yield f"compiled {spec!r}"
    yield f"  stages: {' -> '.join(gen.plan.stages)}; generated source: {len(gen.source.splitlines())} lines"
    for k in gen.kernels:
        first = next(ln for ln in k.source.splitlines() if ln.strip().startswith('"""')).strip().strip('"')
        yield f"    {k.symbol:<22} grid={manifest.dims_text(k.grid):<12} warps={k.num_warps}  {first}"
    where = "compiled on " + torch.cuda.get_device_name() if device == "cuda" else "Triton's interpreter on the CPU"
    yield f"  running it ({where}) against the float64 oracle, B=2 T=150 H=2 HV=4 K=V=64, h0, g down to -5:"
    for dtype in (torch.float32, torch.bfloat16):
        x = random_inputs(spec, B=2, T=150, H=2, HV=4, K=64, V=64, dtype=dtype, strength=5.0, h0=True)
        args = {n: (t.to(device) if isinstance(t, torch.Tensor) else t) for n, t in x.kwargs.items()}
        with torch.no_grad():
            o, s = op(x.q.to(device), x.k.to(device), x.v.to(device), output_final_state=True, **args)
        up = {n: (t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t) for n, t in x.kwargs.items()}
        o_ref, s_ref = recurrent(spec, x.q.double(), x.k.double(), x.v.double(), output_final_state=True, **up)
        yield f"    {str(dtype):<15} rel err o {rel_err(o.cpu(), o_ref):.2e}   final state {rel_err(s.cpu(), s_ref):.2e}"
    yield "  and its gradients (fp32, through the generated backward kernels) against the oracle's autograd:"
    x = random_inputs(spec, B=1, T=100, H=2, HV=4, K=64, V=64, dtype=torch.float32, strength=5.0, h0=True, seed=1)
    tensors = {n: t.to(device).requires_grad_() for n, t in x.tensors().items()}
    kw = {n: tensors.get(n, t) for n, t in x.kwargs.items()}
    o, s = op(tensors["q"], tensors["k"], tensors["v"], output_final_state=True, **kw)
    (o.sum() + s.sum()).backward()
    ref = {n: t.detach().double().requires_grad_() for n, t in x.tensors().items()}
    o_ref, s_ref = recurrent(spec, ref["q"], ref["k"], ref["v"], output_final_state=True, **{n: ref.get(n, t) for n, t in x.kwargs.items()})
    (o_ref.sum() + s_ref.sum()).backward()
    yield "    " + "  ".join(f"d{n} {rel_err(tensors[n].grad.cpu(), ref[n].grad):.1e}" for n in tensors)
    yield "see the whole generated source with: python -m linattn source KIMI_KDA --K 64 --V 64"


#: the random Qwen3-Next the demo builds when no checkpoint folder is given
TINY_QWEN3_NEXT = dict(
    model_type="qwen3_next", vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
    linear_key_head_dim=16, linear_value_head_dim=16, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
    shared_expert_intermediate_size=64, full_attention_interval=4, partial_rotary_factor=0.5, mtp_num_hidden_layers=1,
)


def _model(folder: str | None, new_tokens: int) -> Iterator[str]:
    from linattn import models
    from linattn.models.qwen3_next import Qwen3NextConfig, Qwen3NextForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if folder is None:
        torch.manual_seed(0)
        model = Qwen3NextForCausalLM(Qwen3NextConfig.from_dict(TINY_QWEN3_NEXT))
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        model = model.cast(torch.float32, device)
        what = "a tiny random Qwen3-Next (4 layers: 3 Gated DeltaNet + 1 gated attention, 8 experts, 1 MTP layer)"
    else:
        model = models.from_pretrained(folder, device=device)
        what = f"{type(model).__name__} from {folder}"
    vocab = model.config.vocab_size
    prompt = torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(1)).to(device)
    yield f"model: {what}"
    yield f"  prompt: 2 sequences of 24 random token ids; {new_tokens} new tokens each"
    t0 = time.perf_counter()
    greedy = model.generate(prompt, new_tokens)
    ms = (time.perf_counter() - t0) * 1e3
    yield f"  greedy (prefill through the chunk kernels, then the step kernels), {ms:.0f} ms:"
    yield from (f"    {row[24:].tolist()}" for row in greedy)
    with torch.no_grad():
        full = model(greedy[:, :-1])[:, 23:]
        cache = model.new_cache()
        steps = [model(prompt, cache)[:, -1:]]
        steps += [model(greedy[:, i:i + 1], cache) for i in range(24, greedy.shape[1] - 1)]
    yield f"  prefill + decode vs one full forward: max |logit difference| {(torch.cat(steps, 1) - full).abs().max():.2e}"
    sampled = model.generate(prompt, new_tokens, do_sample=True, temperature=0.8, top_p=0.9,
                             generator=torch.Generator(device).manual_seed(0))
    yield f"  sampled (temperature 0.8, top-p 0.9): {sampled[0, 24:].tolist()}"
    if hasattr(model, "mtp"):
        spec = model.generate_speculative(prompt[:1], new_tokens)
        same = torch.equal(spec.tokens, greedy[:1])
        yield (f"  self-speculative decoding with the MTP layer: same tokens as greedy: {same}; "
               f"{spec.accepted}/{spec.proposed} drafts accepted")


def _transformers_model(new_tokens: int) -> Iterator[str]:
    """transformers' own Qwen3-Next model, switched onto linattn's kernels."""
    try:
        import linattn.integrations.transformers as lt

        names = lt.enable()
    except ImportError as err:
        yield f"skipped: {err} (pip install 'linattn[transformers]')"
        return
    try:
        import transformers

        config = {k: v for k, v in TINY_QWEN3_NEXT.items() if k not in ("model_type", "mtp_num_hidden_layers")}
        config.update(num_hidden_layers=2, full_attention_interval=2, linear_num_value_heads=2)  # small: interpreted
        torch.manual_seed(0)
        model = transformers.Qwen3NextForCausalLM(transformers.Qwen3NextConfig(**config)).eval()
        yield f"switched {len(names)} of transformers' kernel functions: {', '.join(names)}"
        prompt = torch.randint(0, config["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(1))
        t0 = time.perf_counter()
        with torch.no_grad():
            greedy = model.generate(prompt, max_new_tokens=new_tokens, do_sample=False, pad_token_id=None,
                                    eos_token_id=None)
        ms = (time.perf_counter() - t0) * 1e3
        yield f"  transformers.Qwen3NextForCausalLM.generate on linattn's kernels, {ms:.0f} ms:"
        yield from (f"    {row[24:].tolist()}" for row in greedy)
        pieces = [prompt[0, :9], prompt[1]]
        batch = transformers.DataCollatorWithFlattening(return_flash_attn_kwargs=True, return_seq_idx=True)(
            [{"input_ids": p.tolist()} for p in pieces])
        batch.pop("labels")
        with torch.no_grad():
            packed = model(**batch, use_cache=False).logits[0]
            alone = torch.cat([model(p[None], use_cache=False).logits[0] for p in pieces])
        yield (f"  two sequences packed by DataCollatorWithFlattening vs run alone: max |logit difference| "
               f"{(packed - alone).abs().max():.2e}")
    finally:
        lt.disable()


def check_arguments(model: str | None = None, new_tokens: int = 8) -> None:
    """Raise ValueError (one line) unless ``new_tokens`` is positive and ``model`` is None or
    a checkpoint folder the models load: a directory with config.json, safetensors weights
    and a supported ``model_type`` (no weights are read; the demo checks this before any work)."""
    if isinstance(new_tokens, bool) or not isinstance(new_tokens, int) or new_tokens < 1:
        raise ValueError(f"new_tokens: expected a positive number of tokens, got {new_tokens!r}")
    if model is not None:
        from linattn import models
        models.check_folder(model)


def sections(model: str | None = None, new_tokens: int = 8) -> list[Section]:
    """The demo's parts, in order (nothing runs until a section's ``lines()`` is called)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    where = "on " + torch.cuda.get_device_name() if device == "cuda" else "through Triton's interpreter on the CPU"
    what = f"the checkpoint {model}" if model is not None else "a tiny random Qwen3-Next"

    return [
        Section(f"showing the {len(BUILTIN)} built-in specs", _builtin_specs),
        Section("checking the chunkwise reference form (fp32) against the token-by-token oracle (fp64)", _references),
        Section(f"compiling {specs.KIMI_KDA.name} and checking it {where} against the oracle", _compiled_kda),
        Section(f"generating with {what} ({new_tokens} new tokens)", lambda: _model(model, new_tokens)),
        Section("running transformers' own Qwen3-Next on linattn (linattn.integrations.transformers)",
                lambda: _transformers_model(new_tokens)),
    ]


def report(model: str | None = None, new_tokens: int = 8, write: Callable[[str], None] = print) -> float:
    """Run the sections in order: ``write`` each one's heading (``[i/n] what it does ...``)
    before it starts and each of its report lines as soon as it is known; returns the total seconds.
    The arguments are checked before any work (ValueError, see :func:`check_arguments`)."""
    check_arguments(model, new_tokens)
    parts = sections(model, new_tokens)
    start = time.perf_counter()
    for i, section in enumerate(parts, 1):
        write(f"[{i}/{len(parts)}] {section.title} ...")
        t0 = time.perf_counter()
        for line in section.lines():
            write(line)
        write(f"[{i}/{len(parts)}] done in {time.perf_counter() - t0:.1f} s")
        write("")
    total = time.perf_counter() - start
    write(f"demo finished in {total:.0f} s")
    return total


def run(model: str | None = None, new_tokens: int = 8) -> list[str]:
    """Show every built-in spec, check the reference forms, run a compiled KDA against the oracle,
    and generate with a model (a tiny random Qwen3-Next, or the checkpoint folder ``model``);
    every report line, once all sections have run."""
    lines: list[str] = []
    report(model, new_tokens, lines.append)
    return lines
