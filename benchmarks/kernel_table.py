"""The table shared by the kernel benchmarks (``varlen_attention``, ``swiglu_mlp``): one row per
kernel with its first call, forward and forward+backward time, TFLOP/s and error."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch
from torch import Tensor


def measure(
    forward: Callable[[], Tensor], train_step: Callable[[], list[Tensor]], repeats: int
) -> dict:
    """The first training step (compilation / JIT happens there; its outputs and gradients,
    copied, are the row's values), then CUDA-event times of ``repeats`` forwards and
    ``repeats`` training steps."""
    start = time.perf_counter()
    outputs = [t.detach().clone() for t in train_step()]
    torch.cuda.synchronize()
    first_call_s = time.perf_counter() - start
    events = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
    events[0].record()
    for _ in range(repeats):
        forward()
    events[1].record()
    for _ in range(repeats):
        train_step()
    events[2].record()
    torch.cuda.synchronize()
    return {
        "first_call_s": first_call_s,
        "forward_ms": events[0].elapsed_time(events[1]) / repeats,
        "both_ms": events[1].elapsed_time(events[2]) / repeats,
        "outputs": outputs,
    }


def relative_errors(outputs: Sequence[Tensor], reference: Sequence[Tensor]) -> list[float]:
    return [
        float((a.float() - b.float()).norm() / b.float().norm())
        for a, b in zip(outputs, reference, strict=True)
    ]


def timing_row(
    name: str, result: dict, reference: Sequence[Tensor], flops: float, both: float
) -> str:
    """``result``: :func:`measure`'s dict; ``flops`` / ``both``: the forward's and forward+backward's
    FLOP count."""
    errors = ", ".join(f"{e:.4f}" for e in relative_errors(result["outputs"], reference))
    fwd_ms, both_ms = result["forward_ms"], result["both_ms"]
    return (
        f"| {name} | {result['first_call_s']:.1f} | {fwd_ms:.3f} | {flops / fwd_ms / 1e9:.0f} | "
        f"{both_ms:.3f} | {both / both_ms / 1e9:.0f} | {errors} |"
    )
