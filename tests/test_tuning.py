"""The tuned-options table: the sweep that writes it (bench/tune.py) and the plans that read it."""
import json
import logging

import pytest
from linattn.codegen import tuning

import linattn
from bench import tune
from linattn import specs


@pytest.fixture
def table_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("LINATTN_TUNED_DIR", str(tmp_path))
    monkeypatch.setattr(tuning, "device_name", lambda: "Fake GPU 80GB")
    return tmp_path


def _write(folder, options):
    path = tuning.device_file("Fake GPU 80GB")
    assert path.parent == folder and path.name == "Fake_GPU_80GB.json"
    path.write_text(json.dumps({"device": "Fake GPU 80GB", "options": options}))


def test_plans_take_the_devices_tuned_options(table_dir):
    _write(table_dir, {"GDN/bf16/K32/V32": {"block_v": 16, "fused_output": False}})
    op = linattn.compile(specs.GDN)
    assert op.plan("bf16", 32, 32).BV == 16
    assert op.options_for("bf16", 32, 32).fused_output is False
    assert op.plan("bf16", 64, 64).BV == 64  # no entry for these head sizes: the defaults
    assert op.plan("fp32", 32, 32).BV == 32  # nor for this dtype
    assert linattn.compile(specs.GDN, block_v=32).plan("bf16", 32, 32).BV == 32  # the caller's option wins
    assert linattn.compile(specs.KDA).plan("bf16", 32, 32).BV == 32  # another spec


def test_no_device_or_no_table_changes_nothing(table_dir, monkeypatch):
    op = linattn.compile(specs.GDN)
    assert op.plan("bf16", 32, 32).BV == 32  # no table for this device
    _write(table_dir, {"GDN/bf16/K32/V32": {"block_v": 16}})
    monkeypatch.setattr(tuning, "device_name", lambda: None)  # no GPU
    assert linattn.compile(specs.GDN).plan("bf16", 32, 32).BV == 32


def test_bad_entries_are_reported_and_ignored(table_dir, caplog):
    _write(table_dir, {"GDN/bf16/K32/V32": {"block_vv": 16}, "KDA/bf16/K32/V32": {"block_v": 3}})
    with caplog.at_level(logging.WARNING, logger="linattn"):
        assert linattn.compile(specs.GDN).plan("bf16", 32, 32).BV == 32
        assert linattn.compile(specs.KDA).plan("bf16", 32, 32).BV == 32
    assert "block_vv" in caplog.text and "block_v" in caplog.text


def test_sweep_keeps_a_winner_only_past_the_margin(tmp_path, monkeypatch):
    """The selection and the table, with the timings given (the interpreter's mean nothing)."""
    fake = {"{}": 10.0, '{"block_v": 64}': 8.0, '{"fused_output": false}': 9.9}
    monkeypatch.setattr(tune, "_fwd_bwd", lambda op, spec, *a: op.options)
    monkeypatch.setattr(tune, "_median_ms", lambda opts, device: fake.get(
        json.dumps({k: v for k, v in {"block_v": opts.block_v, "fused_output": opts.fused_output}.items() if v is not None},
                   sort_keys=True), 10.0))
    path = tune.sweep(["GDN", "KDA"], [(1, 64, 2, 32)], 60, tmp_path, "cpu")
    table = json.loads(path.read_text())
    assert table["device"] == "cpu" and path.name == "cpu.json"
    assert table["options"]["GDN/bf16/K32/V32"] == {"block_v": 64}
    assert set(table["measured"]["GDN/bf16/K32/V32@B1T64H2"]) >= {"{}", '{"block_v": 64}', '{"num_warps": 8}'}
    fake['{"block_v": 64}'] = 9.9  # within the margin of the defaults: no entry
    table = json.loads(tune.sweep(["GDN"], [(1, 64, 2, 32)], 60, tmp_path, "cpu").read_text())
    assert "GDN/bf16/K32/V32" not in table["options"]


def test_sweep_runs_in_the_interpreter(tmp_path):
    """The real thing on a tiny shape: a budget that ends the list early still writes the table."""
    assert tune.main(["--device", "cpu", "--budget", "1", "--ops", "GDN", "--shapes", "1,16,1,16", "--out", str(tmp_path)]) == 0
    table = json.loads((tmp_path / "cpu.json").read_text())
    times = table["measured"]["GDN/bf16/K16/V16@B1T16H1"]
    assert isinstance(times["{}"], float) and times["{}"] > 0
