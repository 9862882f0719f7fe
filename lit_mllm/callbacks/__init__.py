"""Lightning callbacks: throughput/MFU, the TensorBoard caption gallery, the end-of-run report."""

from lit_mllm.callbacks.gallery import CaptionGallery
from lit_mllm.callbacks.report import CaptionReport
from lit_mllm.callbacks.throughput import ThroughputMonitor

__all__ = ["CaptionGallery", "CaptionReport", "ThroughputMonitor"]
