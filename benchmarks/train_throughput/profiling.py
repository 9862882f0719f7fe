"""Where the step time goes: torch.profiler over a row's training steps (CUDA only)."""

from __future__ import annotations

import time
from typing import Any

from benchmarks.train_throughput.device import sync
from benchmarks.train_throughput.measure import Measurement
from benchmarks.train_throughput.sizes import row_label
from benchmarks.train_throughput.stream import SampleStream
from benchmarks.train_throughput.trainee import Trainee

KERNEL_GROUPS = (  # (group, name fragments), first match wins; lower-case
    ("attention (flash / SDPA)", ("flash", "fmha", "attention")),
    ("matmul (GEMM)", ("gemm", "cutlass", "nvjet", "sm90_xmma", "cublas", "matmul", "wgmma")),
    ("optimizer (AdamW)", ("adam", "multi_tensor")),
    ("compiled fused elementwise (triton)", ("triton",)),
    ("cross-entropy / softmax", ("softmax", "cross_entropy", "nll", "log_softmax")),
    ("copies / casts", ("copy", "memcpy", "memset", "cat", "fill")),
)


def profile_training(trainee: Trainee, stream: SampleStream, final: Measurement, steps: int) -> str:
    """torch.profiler over ``steps`` training steps at the row's final micro-batch: GPU busy
    share of wall time, kernel time by group and the top kernels, to say what holds MFU back."""
    batch_size = final.batch_size
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    batches = [trainee.collate(stream.batch(i, batch_size, warmup=False)) for i in range(steps)]
    trainee.step(batches[0])  # warm: no compile or allocator growth inside the window
    sync(trainee.device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for batch in batches:
            trainee.step(batch)
        sync(trainee.device)
        wall_us = (time.perf_counter() - start) * 1e6
    # GPU-side user annotations ("Optimizer.step#AdamW.step", "ProfilerStep#3") span kernels
    # that are listed on their own: leave them out so no time is counted twice
    kernels = [
        e for e in prof.key_averages() if e.device_type == DeviceType.CUDA and "#" not in e.key
    ]

    def self_us(event: Any) -> float:
        return float(getattr(event, "self_device_time_total", 0.0) or 0.0)

    total = sum(self_us(e) for e in kernels)
    groups: dict[str, float] = {}
    for event in kernels:
        name = event.key.lower()
        group = next((g for g, keys in KERNEL_GROUPS if any(k in name for k in keys)), "other")
        groups[group] = groups.get(group, 0.0) + self_us(event)
    lines = [
        f"{row_label(final.row)}, {final.decoder}, micro-batch {batch_size}, {steps} "
        f"profiled steps: wall {wall_us / 1e3 / steps:.1f} ms/step, GPU kernels "
        f"{total / 1e3 / steps:.1f} ms/step (**GPU busy {100 * total / wall_us:.1f} %** of wall)",
        "",
        "| kernel group | ms/step | share of kernel time |",
        "|---|---|---|",
    ]
    for group, us in sorted(groups.items(), key=lambda kv: -kv[1]):
        lines.append(f"| {group} | {us / 1e3 / steps:.1f} | {100 * us / max(total, 1):.1f} % |")
    lines += ["", "| top kernels | ms/step | calls/step |", "|---|---|---|"]
    for event in sorted(kernels, key=self_us, reverse=True)[:12]:
        name = event.key if len(event.key) <= 90 else event.key[:87] + "..."
        name = name.replace("|", "/")
        lines.append(
            f"| `{name}` | {self_us(event) / 1e3 / steps:.2f} | {event.count / steps:.0f} |"
        )
    return "\n".join(lines)
