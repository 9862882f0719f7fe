"""Captioning speed: batched greedy decoding with the training weights."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

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
    cache: str = "dynamic"
    status: str = "ok"
    seconds: float = float("nan")
    captions: int = 0
    agreement: float = float("nan")  # share of tokens equal to the row's dynamic-cache run

    @property
    def captions_per_s(self) -> float:
        return self.captions / self.seconds if self.status == "ok" else float("nan")


def measure_generation(
    trainee: Trainee,
    stream: SampleStream,
    batch_size: int,
    batches: int,
    new_tokens: int,
    cache: str = "dynamic",
    reference: torch.Tensor | None = None,
) -> tuple[GenResult, torch.Tensor | None]:
    """Batched greedy captions of exactly ``new_tokens`` tokens; the first batch is warm-up
    (and compiles, with a static cache). Returns the result and the warm-up batch's tokens,
    whose images come from a fixed seed, so another cache's run can be compared with them
    (``reference``: the share of equal tokens becomes ``agreement``)."""
    result = GenResult(trainee.row, trainee.decoder_key, batch_size, new_tokens, cache)
    prompts = [make_prompt(stream, i) for i in range(batch_size)]
    failure, out = None, None
    try:
        torch.manual_seed(0)  # the same random images in every run of this row
        out = trainee.generate(prompts, new_tokens, cache=cache)
        if out.shape != (batch_size, new_tokens):
            raise RuntimeError(f"generated shape {tuple(out.shape)}")
        if reference is not None:
            result.agreement = float((out == reference).float().mean())
        sync(trainee.device)
        start = time.perf_counter()
        for _ in range(batches):
            trainee.generate(prompts, new_tokens, cache=cache)
        sync(trainee.device)
        result.seconds = time.perf_counter() - start
        result.captions = batches * batch_size
    except Exception as error:
        failure = failure_status(error)
    if failure is not None:  # outside the except: the traceback's tensors are released
        result.status = failure
        free_memory(trainee.device)
        out = None
    if not math.isfinite(result.seconds):
        out = None
    return result, out
