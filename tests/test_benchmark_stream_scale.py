"""The streamed-shards scale benchmark runs end to end on a few samples."""

from __future__ import annotations

import json

from benchmarks.stream_scale.__main__ import main


def test_shard_read_and_speed(tmp_path, capsys) -> None:
    shards = tmp_path / "shards"
    main(["--json", str(tmp_path / "shard.json"), "shard", "--count", "40", "--out", str(shards),
          "--workers", "1"])  # fmt: skip
    shard = json.loads((tmp_path / "shard.json").read_text())
    assert shard["samples"] == 40 and shard["bytes_on_disk"] > 40 * 500
    main(["--json", str(tmp_path / "read.json"), "read", "--dir", str(shards), "--workers", "0",
          "--batch-size", "8", "--checkpoints", "16", "100"])  # fmt: skip
    read = json.loads((tmp_path / "read.json").read_text())
    assert [row["samples"] for row in read["checkpoints"]] == [16, 104]  # past one epoch of 40
    assert all(row["rss_mib"] > row["anon_mib"] > 50 for row in read["checkpoints"])
    main(["speed", "--dir", str(shards), "--workers", "0", "--batch-size", "8", "--batches", "2"])
    assert "16 samples in" in capsys.readouterr().out
