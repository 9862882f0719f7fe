"""Timing and peak memory of training steps: one row at one micro-batch size."""

from __future__ import annotations

import gc
import sys
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field

import torch

from benchmarks.train_throughput.device import (
    failure_status,
    free_memory,
    peak_memory_bytes,
    reset_peak,
    sync,
)
from benchmarks.train_throughput.stream import SampleStream
from benchmarks.train_throughput.trainee import Trainee

# a timed step slower than this many times its row's median counts as a stall
STALL_FACTOR = 2.0


@dataclass
class Measurement:
    """One timed run of one row at one micro-batch size."""

    row: str
    decoder: str
    connector: str
    image_tokens: int
    batch_size: int
    attention: str
    compiled: bool
    stage: str = "final"
    status: str = "ok"
    steps: int = 0
    seconds: float = float("nan")
    samples: int = 0
    supervised: int = 0
    real_tokens: int = 0
    padded_tokens: int = 0
    flops: float = 0.0
    palm_flops: float = 0.0  # the same with the LM head charged on every token (PaLM-style)
    peak_bytes: int = 0
    images: int = 0
    views: int = 0  # encoder inputs: one per image, or a thumbnail + slices per sliced image
    image_slots: int = 0  # <im_patch> tokens (= image feature rows) over the timed steps
    view_sizes: int = 0  # distinct view sizes summed over the timed steps
    view_hist: dict[int, int] = field(default_factory=dict)  # views per image -> images
    step_times_ms: list[float] = field(default_factory=list)  # each timed step, in order
    # the host's time to issue each timed step (the step's Python; with a GPU the kernels may
    # still run after it): a stall here and not in step_times_ms is the GPU's, both: the host's
    step_host_ms: list[float] = field(default_factory=list)
    gc_pauses: list[tuple[int, int, float]] = field(default_factory=list)  # see GcPauses
    step_real_tokens: list[int] = field(default_factory=list)  # the same steps' real tokens
    alloc_retries: int = 0  # CUDA caching allocator: frees-all-and-retry events while timed

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def step_ms(self) -> float:
        return 1000 * self.seconds / max(self.steps, 1)

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.seconds if self.ok else float("nan")

    @property
    def supervised_per_s(self) -> float:
        return self.supervised / self.seconds if self.ok else float("nan")

    @property
    def real_per_s(self) -> float:
        return self.real_tokens / self.seconds if self.ok else float("nan")

    @property
    def padding_pct(self) -> float:
        return 100.0 * (self.padded_tokens - self.real_tokens) / max(self.padded_tokens, 1)

    @property
    def median_step_ms(self) -> float:
        """The upper median of the timed steps (nan before any)."""
        times = sorted(self.step_times_ms)
        return times[len(times) // 2] if times else float("nan")

    def steady(self) -> tuple[float, int]:
        """Real tokens/s over the timed steps no slower than ``STALL_FACTOR`` x the median
        step, and how many were left out: a one-off stall (a recompile, a new shape's set-up)
        that a long run pays once weighs heavily on 20 steps' mean."""
        if not self.ok or not self.step_times_ms:
            return float("nan"), 0
        limit = STALL_FACTOR * self.median_step_ms
        steps = zip(self.step_times_ms, self.step_real_tokens, strict=True)
        kept = [(t, n) for t, n in steps if t <= limit]
        seconds = sum(t for t, _ in kept) / 1000
        return sum(n for _, n in kept) / seconds, len(self.step_times_ms) - len(kept)

    @property
    def peak_gib(self) -> float:
        return self.peak_bytes / 2**30

    @property
    def views_per_image(self) -> float:
        return self.views / self.images if self.images else float("nan")

    @property
    def view_sizes_per_step(self) -> float:
        return self.view_sizes / self.steps if self.steps else float("nan")

    @property
    def image_tokens_per_sample(self) -> float:
        return self.image_slots / self.samples if self.samples else float("nan")

    def tflop_per_step(self) -> float:
        return self.flops / max(self.steps, 1) / 1e12

    def mfu(self, peak: float) -> float:
        return 100.0 * self.flops / self.seconds / peak if self.ok else float("nan")

    def palm_mfu(self, peak: float) -> float:
        return 100.0 * self.palm_flops / self.seconds / peak if self.ok else float("nan")


def alloc_retries(device: torch.device) -> int:
    """Times the CUDA caching allocator found no free block, freed its cache and retried (a
    synchronising stall of up to a second); 0 on a CPU."""
    if device.type != "cuda":
        return 0
    return int(torch.cuda.memory_stats(device).get("num_alloc_retries", 0))


class StepMark:
    """A point between two steps: a CUDA event (no sync, so the steps still overlap the host's
    work) or the host clock on a CPU."""

    def __init__(self, device: torch.device) -> None:
        self.event = torch.cuda.Event(enable_timing=True) if device.type == "cuda" else None
        if self.event is not None:
            self.event.record()
        self.clock = time.perf_counter()

    def ms_until(self, later: StepMark) -> float:
        if self.event is not None and later.event is not None:
            return float(self.event.elapsed_time(later.event))
        return self.host_ms_until(later)

    def host_ms_until(self, later: StepMark) -> float:
        return 1000 * (later.clock - self.clock)


class GcPauses:
    """Python's cyclic garbage collector while the timed steps run: one ``(timed step,
    generation, ms)`` per pass, so a step's stall can be told from a collection (or not)."""

    def __init__(self) -> None:
        self.pauses: list[tuple[int, int, float]] = []
        self.step = 0
        self.started: float | None = None

    def __enter__(self) -> GcPauses:
        gc.callbacks.append(self.on_gc)
        return self

    def __exit__(self, *_exc: object) -> None:
        gc.callbacks.remove(self.on_gc)

    def on_gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self.started = time.perf_counter()
        elif self.started is not None:
            ms = 1000 * (time.perf_counter() - self.started)
            self.pauses.append((self.step, int(info["generation"]), ms))
            self.started = None


def measure(
    trainee: Trainee,
    stream: SampleStream,
    batch_size: int,
    warmup: int,
    steps: int,
    *,
    stage: str = "final",
    budget_bytes: int | None = None,
) -> Measurement:
    """Warm up (excluded), then time ``steps`` steps; OOM and errors become a status."""
    result = Measurement(
        row=trainee.row,
        decoder=trainee.decoder_key,
        connector=trainee.connector,
        image_tokens=trainee.image_tokens,
        batch_size=batch_size,
        attention=trainee.attention,
        compiled=trainee.compiled,
        stage=stage,
    )
    device = trainee.device
    warm = [trainee.collate(stream.batch(i, batch_size, warmup=True)) for i in range(warmup)]
    timed = [trainee.collate(stream.batch(i, batch_size, warmup=False)) for i in range(steps)]
    failure = None
    try:
        for batch in warm:
            trainee.step(batch)
        sync(device)
        free_memory(device)
        reset_peak(device)
        retries = alloc_retries(device)
        start = time.perf_counter()
        marks = [StepMark(device)]
        with GcPauses() as collections:
            for batch in timed:
                trainee.step(batch)
                marks.append(StepMark(device))
                collections.step += 1
        sync(device)
        result.seconds = time.perf_counter() - start
        pairs = list(zip(marks, marks[1:], strict=False))
        result.step_times_ms = [a.ms_until(b) for a, b in pairs]
        result.step_host_ms = [a.host_ms_until(b) for a, b in pairs]
        result.gc_pauses = collections.pauses
        result.alloc_retries = alloc_retries(device) - retries
    except Exception as error:  # OOM or a failing kernel/compile: recorded, run continues
        failure = failure_status(error)
        if failure != "OOM":  # the table keeps one line: the whole story goes to stderr
            traceback.print_exc(file=sys.stderr)
    if failure is not None:  # outside the except: the traceback's tensors are released
        result.status = failure
        trainee.zero_grad()
        free_memory(device)
        return result
    result.steps = steps
    result.samples = sum(b["num_samples"] for b in timed)
    result.supervised = sum(b["supervised"] for b in timed)
    result.step_real_tokens = [int(b["num_tokens"]) for b in timed]
    result.real_tokens = sum(result.step_real_tokens)
    result.padded_tokens = sum(b["num_padded_tokens"] for b in timed)
    result.flops = sum(trainee.flops(b) for b in timed)
    result.palm_flops = sum(trainee.flops(b, head_on_every_token=True) for b in timed)
    per_image = [v for b in timed for v in b.get("views_per_image", [1] * b["num_samples"])]
    result.images = len(per_image)
    result.views = sum(per_image)
    result.view_hist = dict(sorted(Counter(per_image).items()))
    result.view_sizes = sum(len(b.get("view_patches") or [()]) for b in timed)
    result.image_slots = sum(
        b.get("image_slots", b["num_samples"] * trainee.image_tokens) for b in timed
    )
    result.peak_bytes = peak_memory_bytes(device)
    if budget_bytes is not None and result.peak_bytes > budget_bytes:
        result.status = "over budget"
    return result
