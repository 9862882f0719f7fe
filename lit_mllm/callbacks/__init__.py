"""Lightning callbacks: throughput/MFU, the TensorBoard caption gallery, the end-of-run report.

Resolved on first use (PEP 562): the report and the gallery need the caption metrics
(pycocoevalcap), a training run with only the throughput monitor does not."""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = {
    "CaptionGallery": "lit_mllm.callbacks.gallery",
    "CaptionReport": "lit_mllm.callbacks.report",
    "ThroughputMonitor": "lit_mllm.callbacks.throughput",
}

__all__ = list(_HOMES)


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name]), name)


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
