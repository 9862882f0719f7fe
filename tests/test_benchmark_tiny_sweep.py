"""benchmarks/tiny_sweep.py: variants x seeds, one table with the means (runs stubbed here; a
real run is a `lit-mllm fit` per row, as tests/test_cli.py covers)."""

from __future__ import annotations

import argparse
import json

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
