"""Captioning speed: batched greedy decoding with the training weights."""

from __future__ import annotations

import time
from dataclasses import dataclass

from benchmarks.train_throughput.device import failure_status, free_memory, sync
from benchmarks.train_throughput.stream import SampleStream, make_prompt
from benchmarks.train_throughput.trainee import Trainee


@dataclass
class GenResult:
    """Timed caption batches of one row."""

    row: str
    decoder: str
    batch_size: int
    new_tokens: int
    status: str = "ok"
    seconds: float = float("nan")
    captions: int = 0

    @property
    def captions_per_s(self) -> float:
        return self.captions / self.seconds if self.status == "ok" else float("nan")


def measure_generation(
    trainee: Trainee, stream: SampleStream, batch_size: int, batches: int, new_tokens: int
) -> GenResult:
    """Batched greedy captions of exactly ``new_tokens`` tokens; the first batch is warm-up."""
    result = GenResult(trainee.row, trainee.decoder_key, batch_size, new_tokens)
    prompts = [make_prompt(stream, i) for i in range(batch_size)]
    failure = None
    try:
        out = trainee.generate(prompts, new_tokens)
        if out.shape != (batch_size, new_tokens):
            raise RuntimeError(f"generated shape {tuple(out.shape)}")
        sync(trainee.device)
        start = time.perf_counter()
        for _ in range(batches):
            trainee.generate(prompts, new_tokens)
        sync(trainee.device)
        result.seconds = time.perf_counter() - start
        result.captions = batches * batch_size
    except Exception as error:
        failure = failure_status(error)
    if failure is not None:  # outside the except: the traceback's tensors are released
        result.status = failure
        free_memory(trainee.device)
    return result
