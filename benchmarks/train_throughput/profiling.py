"""Where the step time goes: torch.profiler over a row's training steps (CUDA only)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from benchmarks.train_throughput.device import sync
from benchmarks.train_throughput.measure import Measurement
from benchmarks.train_throughput.sizes import row_label
from benchmarks.train_throughput.stream import SampleStream, make_prompt
from benchmarks.train_throughput.trainee import Trainee

KERNEL_GROUPS = (  # (group, name fragments), first match wins; lower-case
    ("attention (flash / SDPA)", ("flash", "fmha", "attention")),
    ("matmul (GEMM)", ("gemm", "cutlass", "nvjet", "sm90_xmma", "cublas", "matmul", "wgmma")),
    ("optimizer (AdamW)", ("adam", "multi_tensor")),
    ("compiled fused elementwise (triton)", ("triton",)),
    ("cross-entropy / softmax", ("softmax", "cross_entropy", "nll", "log_softmax")),
    ("copies / casts", ("copy", "memcpy", "memset", "cat", "fill")),
)


PHASE_PREFIX = "lit_mllm/"  # the model's record_function ranges


def is_annotation(name: str) -> bool:
    """A user range, not a kernel: the profiler's step marks and the model's phases."""
    return "#" in name or name.startswith(PHASE_PREFIX)


def kernel_group(name: str) -> str:
    """The KERNEL_GROUPS group of a CUDA kernel's name (first match wins), else "other"."""
    lower = name.lower()
    return next((g for g, keys in KERNEL_GROUPS if any(k in lower for k in keys)), "other")


def profile_training(trainee: Trainee, stream: SampleStream, final: Measurement, steps: int) -> str:
    """torch.profiler over ``steps`` training steps at the row's final micro-batch: GPU busy
    share of wall time, kernel time by group and the top kernels, to say what holds MFU back."""
    batch_size = final.batch_size
    batches = [trainee.collate(stream.batch(i, batch_size, warmup=False)) for i in range(steps)]
    trainee.step(batches[0])  # warm: no compile or allocator growth inside the window

    def run() -> None:
        for batch in batches:
            trainee.step(batch)

    header = f"{row_label(final.row)}, {final.decoder}, micro-batch {batch_size}, {steps} "
    return kernel_summary(trainee.device, run, steps, header + "profiled steps", "step")


def profile_generation(
    trainee: Trainee, stream: SampleStream, batch_size: int, new_tokens: int, cache: str
) -> str:
    """torch.profiler over one caption batch (after a warm-up batch that compiles/captures):
    where decoding time goes (vision tower, prefill, per-token steps)."""
    prompts = [make_prompt(stream, i) for i in range(batch_size)]
    trainee.generate(prompts, new_tokens, cache=cache)
    header = (
        f"{row_label(trainee.row)}, {trainee.decoder_key}, captions: batch {batch_size}, "
        f"{new_tokens} new tokens, cache {cache}, 1 profiled batch"
    )
    return kernel_summary(
        trainee.device,
        lambda: trainee.generate(prompts, new_tokens, cache=cache),
        1,
        header,
        "batch",
    )


def kernel_summary(
    device: torch.device, run: Callable[[], Any], units: int, header: str, unit: str
) -> str:
    """Profile ``run`` (``units`` steps or batches): wall and GPU kernel time per unit, the
    GPU busy share, kernel time by group and the top kernels."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    sync(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        run()
        sync(device)
        wall_us = (time.perf_counter() - start) * 1e6
    # GPU-side user annotations ("Optimizer.step#AdamW.step", "ProfilerStep#3", the model's
    # "lit_mllm/..." phases) span kernels that are listed on their own: leave them out so no
    # time is counted twice
    averages = prof.key_averages()
    kernels = [e for e in averages if e.device_type == DeviceType.CUDA and not is_annotation(e.key)]

    def self_us(event: Any) -> float:
        return float(getattr(event, "self_device_time_total", 0.0) or 0.0)

    total = sum(self_us(e) for e in kernels)
    groups: dict[str, float] = {}
    for event in kernels:
        group = kernel_group(event.key)
        groups[group] = groups.get(group, 0.0) + self_us(event)
    lines = [
        f"{header}: wall {wall_us / 1e3 / units:.1f} ms/{unit}, GPU kernels "
        f"{total / 1e3 / units:.1f} ms/{unit} (**GPU busy {100 * total / wall_us:.1f} %** of wall)",
        "",
        f"| kernel group | ms/{unit} | share of kernel time |",
        "|---|---|---|",
    ]
    for group, us in sorted(groups.items(), key=lambda kv: -kv[1]):
        lines.append(f"| {group} | {us / 1e3 / units:.1f} | {100 * us / max(total, 1):.1f} % |")
    phases = [e for e in averages if e.key.startswith(PHASE_PREFIX)]
    lines += phase_lines([e for e in phases if e.device_type == DeviceType.CPU], units, unit)
    lines += ["", f"| top kernels | ms/{unit} | calls/{unit} |", "|---|---|---|"]
    for event in sorted(kernels, key=self_us, reverse=True)[:12]:
        name = event.key if len(event.key) <= 90 else event.key[:87] + "..."
        name = name.replace("|", "/")
        lines.append(
            f"| `{name}` | {self_us(event) / 1e3 / units:.2f} | {event.count / units:.0f} |"
        )
    return "\n".join(lines)


def phase_lines(phases: list[Any], units: int, unit: str) -> list[str]:
    """Host wall time of the model's own ``record_function("lit_mllm/...")`` phases (their CPU
    events: vision tower and splicing, prefill, decoding steps): with the GPU busy share, it
    says whether a phase waits for the GPU or the GPU waits for it."""
    if not phases:
        return []
    lines = ["", f"| phase (host wall) | ms/{unit} | calls/{unit} |", "|---|---|---|"]
    for event in phases:
        lines.append(
            f"| {event.key} | {event.cpu_time_total / 1e3 / units:.1f} | {event.count / units:.0f} |"
        )
    return lines
