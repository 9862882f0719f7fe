"""The loader-speed benchmark on a small synthetic set: every task, padded and packed."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from benchmarks.loader_speed.__main__ import main
from lit_mllm.data.synthetic import generate_synthetic_dataset


def test_reports_speed_and_padding_waste_of_padded_and_packed_batches(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    generate_synthetic_dataset(tmp_path, 24, 2, seed=0, workers=0)
    main(["--dir", str(tmp_path), "--workers", "0", "--batch-size", "4", "--batches", "2"])
    lines = capsys.readouterr().out.splitlines()
    pattern = r"(\w+) +packing=(True|False) +([\d.]+) samples/s  padding waste +([\d.]+) %"
    rows = [re.fullmatch(pattern, line) for line in lines]
    assert all(rows), lines
    seen = [(m[1], m[2]) for m in rows]
    assert seen == [(t, p) for t in ("caption", "instruct") for p in ("False", "True")]
    for m in rows:
        assert float(m[3]) > 0
        # variable-length captions leave padding in a padded batch; a packed one has none
        assert (float(m[4]) == 0.0) == (m[2] == "True")
