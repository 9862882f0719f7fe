"""benchmarks/tiny_sweep.py: variants x seeds, one table with the means (runs stubbed here; a
real run is a `lit-mllm fit` per row, as tests/test_cli.py covers)."""

from __future__ import annotations

import argparse
import json
import os

import pytest

from benchmarks import tiny_sweep


def _row(variant: str, seed: int, kind: float, **extra) -> dict:
    facts = {"colour": 0.97, "size": 0.99, "place": 0.98, "kind": kind}
    return {"variant": variant, "seed": seed, "wall_s": 80.0, "rc": 0, "cider_ratio": 1.9,
            "loss": 0.56, **facts, **extra}  # fmt: skip


def test_variant_flags_are_split_like_a_shell() -> None:
    assert tiny_sweep.parse_variant('g="--data.length_grouping 8" ') == (
        "g",
        ["--data.length_grouping 8"],
    )
    assert tiny_sweep.parse_variant("base=") == ("base", [])
    assert tiny_sweep.parse_variant("x=--a 1 --b '[0.9,0.95]'") == (
        "x",
        ["--a", "1", "--b", "[0.9,0.95]"],
    )
    with pytest.raises(argparse.ArgumentTypeError, match="NAME=FLAGS"):
        tiny_sweep.parse_variant("no-equals-sign")


def test_table_gives_means_lowest_kind_and_failed_runs() -> None:
    rows = [_row("a", 1, 0.96), _row("a", 0, 0.92), _row("b", 0, 0.95)]
    rows.append({"variant": "b", "seed": 1, "wall_s": 3.0, "rc": 2, "error": "boom"})
    lines = tiny_sweep.table(rows).splitlines()
    assert lines[2].startswith("| a | 0 |") and lines[3].startswith("| a | 1 |")  # by seed
    assert "| **a mean of 2** (kind min 92.0) |" in lines[4] and "| 94.0 |" in lines[4]
    assert not any("b mean" in line for line in lines)  # one finished run: no mean row
    assert lines[-1] == "| b | 1 | failed (rc 2) | | | | | | |"


def test_main_runs_every_variant_and_seed_with_the_common_flags(tmp_path, monkeypatch) -> None:
    calls = []

    def fake_run(name, flags, seed, common, root, config):
        calls.append((name, flags, seed, common, config))
        return _row(name, seed, 0.9 + seed / 100)

    monkeypatch.setattr(tiny_sweep, "run_one", fake_run)
    out = tmp_path / "sweep.md"
    argv = ["--seeds", "0,2", "--parallel", "2", "--out", str(out), "--variant", "a=",
            "--variant", "b=--x 1", "--", "--trainer.accelerator", "gpu"]  # fmt: skip
    assert tiny_sweep.main(argv) == 0
    assert sorted((c[0], c[2]) for c in calls) == [("a", 0), ("a", 2), ("b", 0), ("b", 2)]
    assert all(c[3] == ["--trainer.accelerator", "gpu"] for c in calls)
    assert {tuple(c[1]) for c in calls} == {(), ("--x", "1")}
    assert "| **b mean of 2** (kind min 90.0) |" in out.read_text()
    assert len(json.loads(out.with_suffix(".json").read_text())) == 4


def _report(kind: float) -> str:
    facts = {"colour": 0.97, "size": 0.99, "place": 0.98, "kind": kind}
    metrics = [{"metric": "CIDEr", "model": 3.5, "reference": 1.87, "ratio": 1.9}]
    return json.dumps({"metrics": metrics, "loss": 0.56, "facts": facts})


def test_run_one_reads_this_runs_report_not_an_older_one(tmp_path, monkeypatch) -> None:
    out = tmp_path / "a-s0"
    for version in (2, 10):  # version_10 sorts before version_2 by name
        folder = out / "tensorboard" / f"version_{version}"
        folder.mkdir(parents=True)
        (folder / "caption_report.json").write_text(_report(0.5))
    old = out / "tensorboard" / "version_2" / "caption_report.json"
    os.utime(old, (1, 1))
    os.utime(out / "tensorboard" / "version_10" / "caption_report.json", (2, 2))

    def fit_writing(version: int | None):
        def call(command, stdout, stderr):
            if version is not None:
                folder = out / "tensorboard" / f"version_{version}"
                folder.mkdir(parents=True, exist_ok=True)
                (folder / "caption_report.json").write_text(_report(0.96))
            return 0

        return call

    monkeypatch.setattr(tiny_sweep.subprocess, "call", fit_writing(11))
    row = tiny_sweep.run_one("a", [], 0, [], tmp_path, "configs/tiny.yaml")
    assert row["kind"] == 0.96 and "error" not in row
    monkeypatch.setattr(tiny_sweep.subprocess, "call", fit_writing(None))  # rc 0, no report
    assert "error" in tiny_sweep.run_one("a", [], 0, [], tmp_path, "configs/tiny.yaml")
