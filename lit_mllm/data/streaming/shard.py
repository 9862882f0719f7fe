"""A source -> LitData chunks (``lit-mllm-data shard``): checked in parallel, then optimized.

Every record goes through the readers that map-style data uses (same checks, same reason keys)
and every image is decoded once here, so a sample that would be skipped in training is skipped
(and counted) now, or the run stops naming it under ``on_bad_sample="error"``. What cannot be
known without a tokenizer (a reply truncated away by ``max_length``) is still checked when read.
The chunks hold the image files as stored; ``lit_mllm_shards.json`` beside them says what was
sharded, how many samples were kept and why the others were not.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from lit_mllm.data.options import OnBadSample
from lit_mllm.data.readers import load_source
from lit_mllm.data.records import Sample, SampleStore
from lit_mllm.data.streaming.record import to_item
from lit_mllm.data.synthetic.settings import SyntheticSettings
from lit_mllm.data.synthetic.writer import encode_image, render_sample, worker_context
from lit_mllm.data.transforms import DEFAULT_MAX_IMAGE_PIXELS, BadImageError, load_rgb_image

MANIFEST = "lit_mllm_shards.json"
SHARD_VERSION = 1
_CHECK_CHUNK = 256  # samples per task of the checking pass


@dataclass
class ShardSummary:
    out: str
    source: dict[str, Any]
    samples: int
    skipped: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    bytes_on_disk: int = 0
    chunks: int = 0

    def line(self) -> str:
        skipped = ", ".join(f"{k}: {v}" for k, v in sorted(self.skipped.items())) or "none"
        return (
            f"sharded {self.samples:,} samples into {self.chunks} chunks in {self.out} "
            f"({self.bytes_on_disk / 2**20:,.1f} MiB) in {self.seconds:.1f} s; skipped: {skipped}"
        )


def _prepare(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} exists and is not a folder; choose a folder for the shards")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ValueError(f"{out} is not empty; choose a new folder or pass --overwrite")
        if not (out / MANIFEST).is_file():
            raise ValueError(f"{out} holds no {MANIFEST}: not lit-mllm shards, not overwritten")
        for path in out.iterdir():
            if path.name == MANIFEST or path.name == "index.json" or path.suffix == ".bin":
                path.unlink()
    out.mkdir(parents=True, exist_ok=True)


def _workers(workers: int | None) -> int:
    return max(1, (os.cpu_count() or 1) if workers is None else int(workers))


def _image_names(store: SampleStore, sample: Sample) -> list[str]:
    return [os.path.relpath(path, store.image_root or "/") for path in sample.image_paths]


def _check_chunk(
    store: SampleStore, indices: range, max_pixels: int, on_bad_sample: OnBadSample
) -> tuple[list[int], Counter[str], str | None]:
    """Decode every image of the samples at ``indices``: (kept, skipped by reason, the first
    error under ``on_bad_sample="error"``, as text: exceptions with extra fields do not pickle)."""
    kept, skipped = [], Counter()
    for index in indices:
        sample = store[index]
        try:
            for path in sample.image_paths:
                load_rgb_image(path, max_pixels=max_pixels)
        except BadImageError as error:
            if on_bad_sample == "error":
                message = f"{error} (sample {sample.sample_id} of {store.source})"
                return kept, skipped, message
            skipped[error.reason] += 1
            continue
        kept.append(index)
    return kept, skipped, None


class _SourceItems:
    """``optimize``'s function: a kept sample index -> its item (files read as stored)."""

    def __init__(self, store: SampleStore, captions: bool) -> None:
        self.store, self.captions = store, captions

    def __call__(self, index: int) -> dict[str, Any]:
        sample = self.store[index]
        data = [Path(path).read_bytes() for path in sample.image_paths]
        caption = sample.conversation[-1]["content"] if self.captions else None
        return to_item(sample, _image_names(self.store, sample), data, caption)


class _SyntheticItems:
    """``optimize``'s function: an index -> a synthetic image with one of its captions (they
    take turns: image i trains on caption i mod 5) and all five as references."""

    def __init__(self, settings: SyntheticSettings, split: str) -> None:
        self.settings, self.split = settings, split

    def __call__(self, index: int) -> dict[str, Any]:
        image, _, captions, _ = render_sample(self.settings, self.split, index)
        name = f"{self.split}/{index + 1:07d}.{self.settings.image_format}"
        sample = Sample(f"{self.split}-{index + 1:07d}", (name,), (), index + 1, tuple(captions))
        data = encode_image(image, self.settings.image_format)
        return to_item(sample, [name], [data], captions[index % len(captions)])


def _optimize(function: Any, inputs: list[int], out: Path, workers: int, chunk_bytes: str) -> None:
    from litdata import optimize

    optimize(
        fn=function,
        inputs=inputs,
        output_dir=str(out.resolve()),
        chunk_bytes=chunk_bytes,
        num_workers=min(workers, max(1, len(inputs))),
        reorder_files=False,
        start_method=worker_context().get_start_method(),
        verbose=True,
    )


def _finish(out: Path, summary: ShardSummary, started: float) -> ShardSummary:
    summary.seconds = round(time.perf_counter() - started, 2)
    files = [p for p in out.iterdir() if p.is_file()]
    summary.chunks = sum(p.suffix == ".bin" for p in files)
    manifest = {"version": SHARD_VERSION, **asdict(summary)}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    summary.bytes_on_disk = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    return summary


def shard_source(
    kind: Literal["coco", "karpathy", "llava"],
    file: str,
    image_root: str,
    out: str | Path,
    *,
    split: str | None = None,
    one_sample_per_caption: bool = True,
    on_bad_sample: OnBadSample = "error",
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    workers: int | None = None,
    chunk_bytes: str = "64MB",
    overwrite: bool = False,
) -> ShardSummary:
    """Shard one annotation file. ``one_sample_per_caption`` (COCO/Karpathy): a sample per
    caption (training) or per image (evaluation, all captions as references)."""
    started = time.perf_counter()
    out = Path(out)
    _prepare(out, overwrite)
    options: dict[str, Any] = {"on_bad_sample": on_bad_sample}
    if kind != "llava":
        options["one_sample_per_caption"] = one_sample_per_caption
    if kind == "karpathy":
        options["split"] = split or "train"
    store = load_source(kind, file, image_root, **options)
    skipped: Counter[str] = Counter(store.skipped)
    kept: list[int] = []
    tasks = [
        range(a, min(a + _CHECK_CHUNK, len(store))) for a in range(0, len(store), _CHECK_CHUNK)
    ]
    n = _workers(workers)
    results: Any
    if n == 1 or len(tasks) <= 1:
        results = (_check_chunk(store, t, max_image_pixels, on_bad_sample) for t in tasks)
        results = _progress(results, len(tasks), "checking images")
        collected = list(results)
    else:
        with ProcessPoolExecutor(n, mp_context=worker_context()) as pool:
            futures = pool.map(
                _check_chunk,
                [store] * len(tasks),
                tasks,
                [max_image_pixels] * len(tasks),
                [on_bad_sample] * len(tasks),
            )
            collected = list(_progress(futures, len(tasks), "checking images"))
    for chunk_kept, chunk_skipped, error in collected:
        if error is not None:
            raise ValueError(error)
        kept.extend(chunk_kept)
        skipped.update(chunk_skipped)
    if not kept:
        raise ValueError(f"{file}: no usable sample to shard (skipped: {dict(skipped)})")
    _optimize(_SourceItems(store, captions=kind != "llava"), kept, out, n, chunk_bytes)
    source = {"kind": kind, "file": str(file), "image_root": str(image_root), "split": split}
    summary = ShardSummary(str(out), source, len(kept), dict(skipped))
    return _finish(out, summary, started)


def shard_synthetic(
    settings: SyntheticSettings,
    count: int,
    out: str | Path,
    *,
    split: str = "train",
    workers: int | None = None,
    chunk_bytes: str = "64MB",
    overwrite: bool = False,
) -> ShardSummary:
    """``count`` synthetic images of ``split`` drawn straight into chunks (no image files)."""
    settings.check()
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    started = time.perf_counter()
    out = Path(out)
    _prepare(out, overwrite)
    _optimize(
        _SyntheticItems(settings, split), list(range(count)), out, _workers(workers), chunk_bytes
    )
    source = {"kind": "synthetic", "split": split, **settings.content()}
    return _finish(out, ShardSummary(str(out), source, count), started)


def _progress(items: Any, total: int, what: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(items, total=total, desc=what, unit="task", leave=False)
