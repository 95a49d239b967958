"""``python -m linattn demo``: arguments checked before any work, sections printed as they finish."""
from __future__ import annotations

import ast
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import TINY_MODELS
from linattn import __main__ as cli
from linattn import demo

ROOT = Path(__file__).resolve().parents[1]


def test_bad_model_folder_fails_at_once(tmp_path):
    t0 = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "linattn", "demo", "--model", str(tmp_path / "absent")],
                         cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    seconds = time.perf_counter() - t0
    assert run.returncode == 2, run.stderr
    assert run.stdout == ""  # no section started
    assert run.stderr.splitlines() == [f"linattn demo: error: folder: {str(tmp_path / 'absent')!r} is not a directory"]
    print(f"bad folder rejected in {seconds:.1f} s (the imports)")


@pytest.fixture
def no_sections(monkeypatch):
    """Any section that starts fails the test: the arguments must be refused before."""
    def refuse(*args, **kwargs):
        raise AssertionError("the demo started despite a bad argument")

    monkeypatch.setattr(demo, "sections", refuse)


@pytest.mark.parametrize("case, match", [
    ("no config", "no config.json"),
    ("bad json", "folder: config.json of .* is not valid JSON"),
    ("llama", "model_type: 'llama' is not one of nemotron_h, qwen3_next, kimi_linear"),
    ("untyped", "has no model_type"),
    ("bad config", "linear_num_key_heads"),
    ("no weights", r"no \*.safetensors files"),
])
def test_bad_model_folders_are_named_in_one_line(tmp_path, capsys, no_sections, case, match):
    config = {"model_type": "qwen3_next", **TINY_MODELS["qwen3_next"]}
    if case == "llama":
        config["model_type"] = "llama"
    elif case == "untyped":
        del config["model_type"]
    elif case == "bad config":
        config["linear_num_key_heads"] = 3
    if case == "bad json":
        (tmp_path / "config.json").write_text("{'model_type': ")
    elif case != "no config":
        (tmp_path / "config.json").write_text(json.dumps(config))
    assert cli.main(["demo", "--model", str(tmp_path)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1, err
    assert err.startswith("linattn demo: error: ")
    assert __import__("re").search(match, err), err


def test_bad_new_tokens(capsys, no_sections):
    assert cli.main(["demo", "--new-tokens", "0"]) == 2
    assert capsys.readouterr().err.startswith("linattn demo: error: new_tokens: expected a positive number")


def test_sections_in_order():
    titles = [s.title for s in demo.sections()]
    assert len(titles) == 5
    for title, words in zip(titles, ["built-in specs", "token-by-token oracle", "compiling KIMI_KDA",
                                     "generating with a tiny random Qwen3-Next (8 new tokens)",
                                     "transformers' own Qwen3-Next on linattn"]):
        assert words in title, (title, words)
    assert "the checkpoint /some/folder" in demo.sections("/some/folder", 3)[3].title
    # the first section runs alone (at once): every built-in spec, one repr each
    lines = list(demo.sections()[0].lines())
    assert len(lines) == len(demo.BUILTIN) and lines[0] == repr(next(iter(demo.BUILTIN.values())))


def test_each_section_is_printed_as_it_finishes(monkeypatch, capsys):
    """The heading is out (flushed) before a section runs and its lines right after it."""
    seen = []

    def section(i):
        def lines():
            seen.append(capsys.readouterr().out)  # what the user sees while section i runs
            return [f"result {i}"]
        return demo.Section(f"part {i}", lines)

    monkeypatch.setattr(demo, "sections", lambda model, new_tokens: [section(i) for i in (1, 2, 3)])
    assert cli.main(["demo"]) == 0
    rest = capsys.readouterr().out
    assert seen[0] == "[1/3] part 1 ...\n"
    assert seen[1].startswith("result 1\n[1/3] done in ") and seen[1].endswith("\n\n[2/3] part 2 ...\n")
    assert seen[2].startswith("result 2\n[2/3] done in ") and seen[2].endswith("\n\n[3/3] part 3 ...\n")
    assert rest.startswith("result 3\n[3/3] done in ") and rest.rstrip().splitlines()[-1].startswith("demo finished in ")
    # the same report as a list of lines
    lines = demo.run()
    assert [line for line in lines if line.startswith("[")][::2] == ["[1/3] part 1 ...", "[2/3] part 2 ...", "[3/3] part 3 ..."]


def test_transformers_section_runs_transformers_model_on_linattn():
    pytest.importorskip("transformers")
    lines = list(demo.sections(new_tokens=3)[4].lines())
    print("\n".join(lines))
    assert lines[0].startswith("switched 9 of transformers' kernel functions: ")
    greedy = [ast.literal_eval(line.strip()) for line in lines[2:4]]  # the token ids of each prompt
    assert all(len(row) == 3 for row in greedy)
    packed = float(lines[-1].rsplit(" ", 1)[1])
    assert "packed by DataCollatorWithFlattening" in lines[-1] and packed <= 1e-4, lines[-1]
    import linattn.integrations.transformers as lt

    assert not lt.enabled()
