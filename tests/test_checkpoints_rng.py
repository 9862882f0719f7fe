"""RNG state in checkpoints (lit_mllm.checkpoints.rng): restored generators continue the same
streams, and the state survives a ``weights_only=True`` save and load."""

from __future__ import annotations

import io
import random

import numpy as np
import torch

from lit_mllm.checkpoints.rng import collect_rng_state, restore_rng_state


def draws() -> tuple[float, float, torch.Tensor]:
    return random.random(), float(np.random.rand()), torch.rand(3)


def test_restored_generators_repeat_their_draws() -> None:
    buffer = io.BytesIO()
    torch.save(collect_rng_state(), buffer)
    expected = draws()
    buffer.seek(0)
    restore_rng_state(torch.load(buffer, weights_only=True))
    again = draws()
    assert again[:2] == expected[:2] and torch.equal(again[2], expected[2])
