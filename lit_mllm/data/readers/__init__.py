"""Readers: COCO caption JSON, Karpathy split JSON and LLaVA JSON/JSONL -> :class:`SampleStore`.

Why here: every structural problem (bad JSON, missing keys, wrong types, image paths escaping
``image_root``, missing image files) is found once at load time and reported with the file,
the record and what is wrong — instead of crashing a DataLoader worker hours into training.
With ``on_bad_sample="skip"`` bad records are dropped, counted by reason in ``store.skipped``
and summarised in one log line. Images are never opened here (decoding is the dataset's job).

One file per format (``coco``, ``karpathy``, ``llava``); what they share: ``validation`` (errors,
skip counts, record checks), ``image_paths`` (paths kept inside ``image_root``), ``cache`` (the
``.npz`` of a parsed file), ``captions`` (the caption prompt, one image -> samples).

Common keyword arguments of every reader:
- ``on_bad_sample``: ``"error"`` raises :class:`BadSampleError` (a ValueError) or
  :class:`MissingImageError` (a FileNotFoundError); ``"skip"`` counts by reason.
- ``check_images``: ``os.path.isfile`` per image (one stat; images are not opened).
  Path-escape checks (``..``, absolute paths, symlinks) run either way.
- ``cache_dir``: save the parsed store there as ``.npz`` keyed on the source's real path, size,
  mtime, the real image_root and all options, so big JSON is parsed once (build it in
  ``prepare_data``). Image existence is checked when the cache is built, not on cache hits.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from lit_mllm.data.readers.captions import DEFAULT_CAPTION_PROMPT
from lit_mllm.data.readers.coco import load_coco_captions
from lit_mllm.data.readers.karpathy import load_karpathy
from lit_mllm.data.readers.llava import load_llava
from lit_mllm.data.readers.validation import BadSampleError, MissingImageError
from lit_mllm.data.records import SampleStore

__all__ = [
    "DEFAULT_CAPTION_PROMPT",
    "BadSampleError",
    "MissingImageError",
    "load_coco_captions",
    "load_karpathy",
    "load_llava",
    "load_source",
]


def load_source(
    kind: Literal["coco", "karpathy", "llava"],
    path: str | Path,
    image_root: str | Path,
    **kwargs: Any,
) -> SampleStore:
    """Dispatch to the reader for ``kind``; ``kwargs`` go to it (Karpathy needs ``split=``)."""
    readers = {"coco": load_coco_captions, "karpathy": load_karpathy, "llava": load_llava}
    if kind not in readers:
        raise ValueError(f"unknown source kind {kind!r}; expected one of {sorted(readers)}")
    return readers[kind](path, image_root, **kwargs)
