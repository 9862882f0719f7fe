"""benchmarks/cpu_step.py: the CPU step per batching / attention variant, on the micro preset."""

from __future__ import annotations

import argparse
import json

import pytest

from benchmarks import cpu_step


def test_variants_are_parsed_and_checked() -> None:
    assert cpu_step.parse_variant("packed:lit_varlen") == ("packed", "lit_varlen")
    for bad in ("packed", "rolled:eager", "padded:"):
        with pytest.raises(argparse.ArgumentTypeError, match="padded|packed"):
            cpu_step.parse_variant(bad)


def test_variants_time_the_same_model_on_the_same_batches(tmp_path) -> None:
    """Padded eager, padded SDPA and packed rows compute the same losses (float32), each with a
    positive step time; the table and its JSON are written."""
    out = tmp_path / "step.md"
    args = ["--data", str(tmp_path / "synthetic"), "--num-train", "48", "--image-size", "32"]
    args += ["--preset", "micro", "--batch-size", "8", "--steps", "2", "--out", str(out)]
    variants = ["padded:eager", "padded:sdpa", "packed:lit_varlen"]
    assert cpu_step.main([*args, *(f"--variant={v}" for v in variants)]) == 0
    rows = json.loads(out.with_suffix(".json").read_text())
    assert [row["variant"] for row in rows] == variants
    assert all(row["step_s"] > 0 and len(row["first_losses"]) == 4 for row in rows)
    for row in rows[1:]:
        assert row["first_losses"] == pytest.approx(rows[0]["first_losses"], abs=2e-4)
    assert out.read_text().count("\n| ") == 4  # header + 3 rows
