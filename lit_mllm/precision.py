"""bf16 on a CPU only where the CPU multiplies bf16 itself.

PyTorch runs bf16 matrix products on every x86 CPU, but without AVX512-BF16 or AMX (AVX2-only
chips: many AMD EPYC / Ryzen and older Intel parts) it emulates them, far slower than float32:
on a 2-core AMD EPYC with AVX2, 0.8 GFLOP/s against 62 (benchmarks/RESULTS.md). A recipe written
for a CPU with AMX (``configs/tiny.yaml``: ``bf16-mixed``) would then take hours instead of
minutes. The CLIs measure both speeds once and train in ``32-true`` there, saying so.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Mapping
from typing import Any

import torch

BF16_PRECISIONS = ("bf16-mixed", "bf16-true", "bf16")
FALLBACK_PRECISION = "32-true"
# bf16 is kept when it reaches this fraction of float32's speed: native bf16 is faster than
# float32 (AMX: several times), emulated bf16 is ~1-2 % of it, so any threshold between works
SLOW_BF16_RATIO = 0.5

log = logging.getLogger(__name__)


@functools.cache
def cpu_matmul_gflops(dtype: torch.dtype, size: int = 256, repeats: int = 3) -> float:
    """Best of ``repeats`` (size x size) @ (size x size) products, in GFLOP/s (~0.2 s at worst)."""
    generator = torch.Generator().manual_seed(0)  # the global RNG (seeded runs) is not touched
    a = torch.randn(size, size, generator=generator).to(dtype)
    b = torch.randn(size, size, generator=generator).to(dtype)
    with torch.inference_mode():
        a @ b  # first call: allocation and kernel selection
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - start)
    return 2 * size**3 / max(best, 1e-9) / 1e9


def cpu_bf16_is_fast() -> bool:
    """Whether this CPU multiplies bf16 at least half as fast as float32."""
    return cpu_matmul_gflops(torch.bfloat16) >= SLOW_BF16_RATIO * cpu_matmul_gflops(torch.float32)


def runs_on_cpu(trainer: Mapping[str, Any]) -> bool:
    """Where a Trainer with these settings trains (``auto`` picks CUDA, then MPS, then the CPU)."""
    accelerator = trainer.get("accelerator")
    if accelerator in (None, "auto"):
        return not torch.cuda.is_available() and not torch.backends.mps.is_available()
    return accelerator == "cpu"


def fall_back_from_slow_bf16(trainer: Any, enabled: bool = True) -> bool:
    """Set ``trainer.precision`` to ``32-true`` for a bf16 run on a CPU that emulates bf16.

    ``trainer``: the parsed ``trainer`` section (a jsonargparse Namespace or a dict), changed in
    place before the Trainer is built, so the saved config says what ran. Returns whether it
    changed; ``enabled=False`` (``--cpu_bf16_fallback false``) keeps bf16 anyway."""
    if trainer is None or not enabled:
        return False
    precision = str(trainer.get("precision"))
    if precision not in BF16_PRECISIONS or not runs_on_cpu(trainer) or cpu_bf16_is_fast():
        return False
    trainer["precision"] = FALLBACK_PRECISION
    log.warning(
        "trainer.precision %s: this CPU multiplies bf16 matrices at %.1f GFLOP/s against %.1f "
        "in float32 (no native bf16: AVX512-BF16 or AMX), so this run trains in %s. Pass "
        "--trainer.precision %s to say so yourself, or --cpu_bf16_fallback false to keep %s",
        precision,
        cpu_matmul_gflops(torch.bfloat16),
        cpu_matmul_gflops(torch.float32),
        FALLBACK_PRECISION,
        FALLBACK_PRECISION,
        precision,
    )
    return True
