"""CaptionMetrics under 2-process gloo DDP equals a single process, bit for bit."""

from __future__ import annotations

import json
import os
import random
import socket
from pathlib import Path

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

pytest.importorskip("pycocoevalcap")  # caption metrics; not on every GPU image

from lit_mllm.metrics.caption import CaptionMetrics

# METEOR adds two JVM start-ups (~12 CPU-s) and nothing DDP-specific; CIDEr's corpus-wide IDF is
# what a duplicated or lost image would change. METEOR parity: test_caption_metrics.py.
METRICS = ("BLEU", "ROUGE_L", "CIDEr")
VOCABULARY = "a the dog cat man bus red small sitting riding on in near with field street kite"
WORDS = VOCABULARY.split()
N_IMAGES = 23  # odd: DistributedSampler pads rank 1 with a copy of image 0


def _dataset() -> list[tuple[int, str, list[str]]]:
    rng = random.Random(0)

    def caption() -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9)))

    return [(10 * i + 3, caption(), [caption() for _ in range(4)]) for i in range(N_IMAGES)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        data = _dataset()
        # what a padded DistributedSampler(shuffle=False) hands each rank
        indices = list(range(len(data)))
        indices += indices[: (-len(indices)) % world]
        mine = [data[i] for i in indices[rank::world]]
        metric = CaptionMetrics(metrics=METRICS)
        for start in range(0, len(mine), 4):
            batch = mine[start : start + 4]
            metric.update([b[0] for b in batch], [b[1] for b in batch], [b[2] for b in batch])
        scores = metric.compute()
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(scores))
    finally:
        dist.destroy_process_group()


def test_two_process_gloo_equals_single_process(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    data = _dataset()
    single = CaptionMetrics(metrics=METRICS)
    single.update([d[0] for d in data], [d[1] for d in data], [d[2] for d in data])
    expected = single.compute()
    results = [json.loads(Path(tmp_path, f"rank{r}.json").read_text()) for r in range(2)]
    assert list(expected) == ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr"]
    assert results[0] == expected  # exact: same samples, same order, same arithmetic
    assert results[1] == expected  # broadcast from rank 0
