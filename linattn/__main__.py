"""Command line.

    python -m linattn demo [--model FOLDER]     the built-in specs, the oracles, a compiled KDA, generation
    python -m linattn show [SPEC ...]           built-in specs as recurrences
    python -m linattn source SPEC [--dtype ...] the generated Triton source
    python -m linattn inspect SPEC [--arch 90]  registers, spills, shared memory per kernel (no GPU needed)
"""
from __future__ import annotations

import argparse
import sys


def _spec_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", help="a built-in spec name (see `show`)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--K", type=int, default=128, help="key head size")
    p.add_argument("--V", type=int, default=128, help="value head size")
    p.add_argument("--chunk-size", type=int, default=64)


def _demo(model: str | None, new_tokens: int) -> int:
    """Run the demo, printing each section as it goes; a bad argument fails at once (exit 2)."""
    from . import demo

    def write(line: str) -> None:
        print(line, flush=True)

    try:
        demo.check_arguments(model, new_tokens)
    except ValueError as err:  # before any work: one line, argparse's exit status
        print(f"linattn demo: error: {err}", file=sys.stderr, flush=True)
        return 2
    demo.report(model, new_tokens, write)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="linattn", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    demo_p = sub.add_parser("demo", help="show the built-in specs, check the references and a compiled KDA, generate with a model")
    demo_p.add_argument("--model", metavar="FOLDER", help="a Hugging Face checkpoint folder (default: a tiny random Qwen3-Next)")
    demo_p.add_argument("--new-tokens", type=int, default=8, help="tokens to generate")
    show = sub.add_parser("show", help="print built-in specs as recurrences")
    show.add_argument("names", nargs="*", help="spec names (default: all)")
    source = sub.add_parser("source", help="print the generated Triton source of a spec")
    _spec_args(source)
    source.add_argument("--backward", action="store_true", help="the module of the backward (on the spec's core)")
    insp = sub.add_parser("inspect", help="compile a spec's kernels ahead of time; print their resources")
    _spec_args(insp)
    insp.add_argument("--arch", type=int, default=90, help="target compute capability (90: H100/H200)")
    insp.add_argument("--backward", action="store_true", help="the kernels of the backward pass")
    args = parser.parse_args(argv)

    if args.command == "demo":
        return _demo(args.model, args.new_tokens)

    from . import specs

    try:
        if args.command == "show":
            chosen = [specs.by_name(n) for n in args.names] or list(specs.BUILTIN.values())
            lines = [repr(s) for s in chosen]
        elif args.command == "source":
            from linattn import codegen

            spec = specs.by_name(args.spec)
            if args.backward:  # the backward kernels run on the spec's core recurrence
                spec = codegen.plan.core_spec(spec)
            plan = codegen.make_plan(spec, args.dtype, args.K, args.V, codegen.Options(chunk_size=args.chunk_size))
            lines = [codegen.generate(plan, backward=args.backward).source]
        else:
            from linattn.codegen.aot import format_reports

            from .inspection import inspect_spec

            spec = specs.by_name(args.spec)
            reports = inspect_spec(
                spec, args.dtype, args.K, args.V, args.arch, backward=args.backward, chunk_size=args.chunk_size
            )
            what = " backward" if args.backward else ""
            lines = [f"{spec.name}{what}: {args.dtype} K={args.K} V={args.V} sm_{args.arch}", *format_reports(reports)]
            if any(r.spills for r in reports):
                lines.append("SPILLS: at least one kernel spills registers")
    except ValueError as err:
        parser.error(str(err))
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
