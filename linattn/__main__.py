"""Command line: ``python -m linattn demo`` | ``python -m linattn show [SPEC ...]``."""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="linattn", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="show the built-in specs and check the reference forms against each other")
    show = sub.add_parser("show", help="print built-in specs as recurrences")
    show.add_argument("names", nargs="*", help="spec names (default: all)")
    args = parser.parse_args(argv)

    if args.command == "demo":
        from . import demo

        lines = demo.run()
    else:
        from . import specs

        try:
            chosen = [specs.by_name(n) for n in args.names] or list(specs.BUILTIN.values())
        except ValueError as err:
            parser.error(str(err))
        lines = [repr(s) for s in chosen]
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
