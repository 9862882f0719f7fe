"""What every row of the table is to the measuring code: batches, a step, FLOPs, captions."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch

from benchmarks.train_throughput.sizes import Sizes
from benchmarks.train_throughput.stream import Sample
from lit_mllm.flops import FlopsSpec, step_flops


def autocast(device: torch.device) -> AbstractContextManager[Any]:
    """bf16 autocast on CUDA (every row alike); the CPU smoke run stays in float32."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


class Trainee(ABC):
    """What the measuring code needs from a row: batches, a training step, FLOPs, captions."""

    row: str
    connector: str
    attention: str = "sdpa"
    compiled: bool = False
    can_compile: bool = True  # False: the row stays eager whatever --compile says
    image_tokens: int
    spec: FlopsSpec
    optimizer: torch.optim.Optimizer

    def __init__(self, sizes: Sizes, decoder: str, device: torch.device) -> None:
        self.sizes, self.decoder_key, self.device = sizes, decoder, device

    @abstractmethod
    def collate(self, samples: Sequence[Sample]) -> dict[str, Any]:
        """The row's batch of ``samples`` (padded or packed) with ``batch_stats`` merged in."""

    @abstractmethod
    def step(self, batch: dict[str, Any]) -> None:
        """One optimiser step: forward, backward, update, gradients dropped."""

    @abstractmethod
    def generate(
        self, samples: Sequence[Sample], new_tokens: int, cache: str = "dynamic"
    ) -> torch.Tensor:
        """Greedy captions of exactly ``new_tokens`` tokens: (len(samples), new_tokens) ids.
        ``cache``: ``dynamic`` or ``static`` KV cache (the baselines: dynamic only)."""

    def pixels(self, n: int) -> torch.Tensor:
        size = self.sizes.image_size
        return torch.randn(n, 3, size, size, device=self.device)

    def flops(self, batch: dict[str, Any], head_on_every_token: bool = False) -> float:
        """Model FLOPs of one step (``lit_mllm.flops.step_flops``): the decoder on the real
        sample lengths, plus the encoder and connector on every image view at its own patch
        grid. ``batch["view_patches"]``: (views, patches per view) for each view size (sliced
        rows); else one ``sizes.image_size`` image per sample. ``head_on_every_token``: the
        PaLM-style count, the LM head charged on every token instead of the supervised ones."""
        groups = batch.get("view_patches") or [(batch["num_samples"], self.sizes.patches)]
        return step_flops(
            self.spec,
            view_patches=[patches for count, patches in groups for _ in range(count)],
            sample_lengths=batch["lengths"],
            supervised_tokens=batch["num_tokens"] if head_on_every_token else batch["supervised"],
        )

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def close(self) -> None:
        """Drop every reference to the model, its layers and the optimizer state."""
        self.__dict__.clear()
