"""Optional GPU kernel packages (FlashAttention-4, quack): whether one can run on a device, said
in one line that names what is missing, for the model to raise before any layer runs."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import torch

HOPPER_OR_BLACKWELL = (9, 10)  # CUDA compute capability majors of the CuTe DSL kernels


def module_installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


def gpu_kernel_problem(
    device: torch.device, kernel: str, module: str, install: str, installed: Callable[[], bool]
) -> str | None:
    """Why ``kernel`` (importable as ``module``, installed by ``install``) cannot run on
    ``device``; None when it can. ``installed`` is asked last, and only on a capable GPU."""
    if device.type != "cuda":
        return f"{kernel} runs on CUDA GPUs only, not on {device.type}"
    major, minor = torch.cuda.get_device_capability(device)
    if major not in HOPPER_OR_BLACKWELL:
        return f"{kernel} needs a Hopper or Blackwell GPU; {device} is sm{major}{minor}"
    if not installed():
        return f"{kernel} ({module}) is not installed: {install}"
    return None
