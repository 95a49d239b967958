"""Every ```python block of README.md runs as written (CPU, small shapes, in this process).

A block may opt out only by starting with the exact line ``# needs a checkpoint folder``;
at most one may, and such a block is reported as skipped, never silently passed.
"""
from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"
SKIP_MARKER = "# needs a checkpoint folder"

# a fence line (possibly indented inside a list item), its info string, its body, the closing fence
_FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<info>[^\n`]*)\n(?P<body>.*?)^(?P=indent)```[ \t]*$", re.M | re.S)


def _blocks(text: str) -> list[tuple[str, int, str]]:
    """(info string, line of the body's first line (0-based), dedented body) of every fenced block."""
    return [
        (m["info"].strip(), text.count("\n", 0, m.start("body")), textwrap.dedent(m["body"]))
        for m in _FENCE.finditer(text)
    ]


BLOCKS = _blocks(README.read_text(encoding="utf-8"))
PYTHON = [(line, body) for info, line, body in BLOCKS if info == "python"]


def _label(i: int, line: int, body: str) -> str:
    """``index:README line:first line`` so that a failure names its block."""
    first = next((s.strip() for s in body.splitlines() if s.strip()), "")
    return f"{i}:L{line + 1}:{first[:50]}"


def test_blocks_found_and_fenced():
    text = README.read_text(encoding="utf-8")
    assert PYTHON and len(PYTHON) == text.count("```python\n"), "a ```python block the extraction missed"
    # a python block under another tag would escape the run below
    for info, line, _ in BLOCKS:
        assert info in ("python", "text", "bash"), f"README.md:{line}: fence tag {info!r} (python, text or bash)"
    # every fence was paired: no ``` left outside a matched block
    rest = _FENCE.sub("", text)
    assert "```" not in rest, "an unmatched ``` fence in README.md"


def test_at_most_one_skipped_block():
    skipped = [line for line, body in PYTHON if body.lstrip().startswith(SKIP_MARKER)]
    assert len(skipped) <= 1, f"{len(skipped)} README blocks marked {SKIP_MARKER!r}; at most one may be"


@pytest.mark.parametrize(("line", "body"), PYTHON, ids=[_label(i, line, body) for i, (line, body) in enumerate(PYTHON)])
def test_readme_block(line, body):
    if body.lstrip().startswith(SKIP_MARKER):
        pytest.skip(f"marked {SKIP_MARKER!r}")
    torch.manual_seed(0)
    # padded so that a traceback's line numbers are README.md's
    code = compile("\n" * line + body, str(README), "exec")
    exec(code, {"__name__": "__readme__"})  # noqa: S102 (the README's own examples)
