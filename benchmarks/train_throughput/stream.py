"""The seeded stream of synthetic conversations that every row reads, and its rendering."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from benchmarks.train_throughput.sizes import Sizes
from lit_mllm.data.slicing import plan_slices
from lit_mllm.tokens import IGNORE_INDEX

ASPECT_RANGE = (1 / 3, 3.0)  # width / height of the sliced rows' images, log-uniform


@dataclass
class Sample:
    """One conversation: text ids, which of them are assistant replies, where the image goes,
    and the size of its image (read by the sliced rows only; the others use the square one)."""

    text: torch.Tensor  # (T,) int64
    supervised: torch.Tensor  # (T,) bool
    image_at: int
    image_size: tuple[int, int] | None = None  # (width, height); None = sizes.image_size square


def _split(total: int, parts: int, rng: np.random.Generator) -> list[int]:
    """``parts`` positive integers summing to ``total`` (uniform random cut points)."""
    if parts <= 1:
        return [total]
    cuts = np.sort(rng.choice(np.arange(1, total), size=parts - 1, replace=False))
    return np.diff(np.concatenate([[0], cuts, [total]])).astype(int).tolist()


def draw_image_size(rng: np.random.Generator, sizes: Sizes) -> tuple[int, int]:
    """An image (width, height) whose slice plan has 1 to ``sizes.max_views`` views.

    With ``A = scale_resolution**2``: an area multiple ``m`` uniform in 1 .. max_views-1, the area
    uniform in ((m-1) A, m A] (0.5 A .. A for m = 1: one view), the aspect log-uniform in
    1:3 .. 3:1; sizes whose plan has more views are drawn again. The plan never has 2 views (a
    grid has at least 2 slices), and it may pick n-1, n or n+1 slices for n = m.
    """
    area = sizes.slicing.scale_resolution**2
    low, high = (math.log(a) for a in ASPECT_RANGE)
    while True:
        multiple = int(rng.integers(1, max(sizes.max_views, 2)))
        pixels = area * rng.uniform(max(multiple - 1, 0.5), multiple)
        aspect = math.exp(rng.uniform(low, high))
        width = max(1, round(math.sqrt(pixels * aspect)))
        height = max(1, round(pixels / width))
        if len(plan_slices(width, height, sizes.slicing).view_sizes) <= sizes.max_views:
            return width, height


def make_sample(index: int, sizes: Sizes, seed: int, vocab: tuple[int, int]) -> Sample:
    """Sample ``index`` of the stream; depends only on (seed, index), so every row sees it.
    The image size comes from a generator of its own: the text is the same with or without it."""
    image_size = draw_image_size(np.random.default_rng([seed, index, 1]), sizes)
    rng = np.random.default_rng([seed, index])
    length = round(rng.lognormal(math.log(sizes.text_median), sizes.text_sigma))
    length = int(min(max(length, sizes.text_min), sizes.text_max))
    turns = max(1, min(int(rng.integers(1, 5)), length // 8))
    share = float(np.clip(rng.beta(3.0, 7.0), 0.05, 0.9))  # mean 0.3
    supervised = min(max(turns, round(share * length)), length - turns)
    user = _split(length - supervised, turns, rng)
    assistant = _split(supervised, turns, rng)
    mask = torch.cat(
        [
            torch.cat([torch.zeros(u, dtype=torch.bool), torch.ones(a, dtype=torch.bool)])
            for u, a in zip(user, assistant, strict=True)
        ]
    )
    text = torch.from_numpy(rng.integers(vocab[0], vocab[1], size=length)).long()
    return Sample(text, mask, image_at=min(3, user[0]), image_size=image_size)


class SampleStream:
    """Timed steps read samples 0, 1, 2, ... in order; warm-up steps read a disjoint range."""

    WARMUP_OFFSET = 1_000_000

    def __init__(self, sizes: Sizes, seed: int, vocab: tuple[int, int]) -> None:
        self.sizes, self.seed, self.vocab = sizes, seed, vocab
        self._cache: dict[int, Sample] = {}

    def get(self, index: int) -> Sample:
        """Sample ``index``, made once: every row and every probe reuses it."""
        if index not in self._cache:
            self._cache[index] = make_sample(index, self.sizes, self.seed, self.vocab)
        return self._cache[index]

    def batch(self, step: int, size: int, warmup: bool) -> list[Sample]:
        start = (self.WARMUP_OFFSET if warmup else 0) + step * size
        return [self.get(start + j) for j in range(size)]


def make_prompt(stream: SampleStream, index: int, length: int = 12) -> Sample:
    """A caption prompt: ``length`` random text tokens with the image after the third."""
    rng = np.random.default_rng([stream.seed, 7, index])
    text = torch.from_numpy(rng.integers(stream.vocab[0], stream.vocab[1], size=length)).long()
    return Sample(text, torch.zeros(length, dtype=torch.bool), image_at=3)


def render(sample: Sample, image_block: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Input ids with the image block inserted, labels = ids on assistant tokens else -100."""
    a = sample.image_at
    text_labels = torch.where(sample.supervised, sample.text, IGNORE_INDEX)
    ids = torch.cat([sample.text[:a], image_block, sample.text[a:]])
    ignore = torch.full((len(image_block),), IGNORE_INDEX, dtype=torch.long)
    labels = torch.cat([text_labels[:a], ignore, text_labels[a:]])
    return ids, labels


def batch_stats(sequences: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, Any]:
    """Real lengths and supervised targets of a batch: what FLOPs and tokens/s are counted on."""
    lengths = [len(ids) for ids, _ in sequences]
    supervised = sum(int((labels[1:] != IGNORE_INDEX).sum()) for _, labels in sequences)
    return {"lengths": lengths, "supervised": supervised, "num_samples": len(sequences)}
