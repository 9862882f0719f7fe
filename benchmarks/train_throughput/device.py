"""Device bookkeeping shared by the measurements: syncs, peak memory, freeing, OOM detection."""

from __future__ import annotations

import gc
import resource

import torch


def sync(device: torch.device) -> None:
    """Wait for queued CUDA work, so that wall-clock time covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_bytes(device: torch.device) -> int:
    """Peak allocated GPU memory; on CPU the process's peak resident set (Linux: KiB)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def free_memory(device: torch.device) -> None:
    """Collect the garbage of a finished or failed run before the next one measures memory."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error)


def failure_status(error: BaseException) -> str:
    """The status cell of a run that raised: ``OOM`` or the first line of the error."""
    text = "OOM" if is_oom(error) else f"error: {type(error).__name__}: {error}"
    return text.splitlines()[0][:160]
