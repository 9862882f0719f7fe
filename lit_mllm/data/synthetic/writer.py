"""Writing the synthetic set to disk: images in parallel, COCO and LLaVA files, the manifest.

Image ids run 1..N over train, then val, then test, so they are unique across splits; file names
are the zero-padded id. Every image depends only on ``(seed, split, index)`` and the content
settings, so the files are byte-identical whatever the number of worker processes. The
manifest records the content settings; a folder whose manifest matches is not written again.
"""

from __future__ import annotations

import io
import json
import logging
import multiprocessing
import os
import re
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from lit_mllm.data.synthetic.language import NUM_CAPTIONS, make_captions, make_conversation
from lit_mllm.data.synthetic.scene import (
    BACKGROUNDS,
    COLOURS,
    KINDS,
    SPLIT_CODES,
    draw_scene,
    image_rng,
    sample_scene,
)
from lit_mllm.data.synthetic.settings import SYNTHETIC_VERSION, SyntheticSettings

log = logging.getLogger(__name__)
MANIFEST = "synthetic_manifest.json"
_OWNED_IMAGE = re.compile(r"^\d{6,}\.(png|jpg)$")
_CHUNK = 64  # images per task sent to a worker


@dataclass(frozen=True)
class _Job:
    settings: SyntheticSettings
    split: str
    index: int
    image_id: int


def render_sample(
    settings: SyntheticSettings, split: str, index: int
) -> tuple[Image.Image, dict[str, Any], list[str], list[dict[str, str]]]:
    """Image ``index`` of ``split``: (image, scene, 5 captions, conversation). It depends only on
    ``(seed, split, index)`` and the content settings (make_sample's steps, with the canvas: the
    same random numbers in the same order)."""
    s = settings
    rng = image_rng(s.seed, split, index)
    scene = sample_scene(rng, s.image_size, s.max_shapes, s.jitter, canvas=s.canvas)
    captions = make_captions(scene, rng)
    conv = make_conversation(scene, captions, rng)
    return draw_scene(scene, rng), scene.to_dict(), captions, conv


def encode_image(image: Image.Image, image_format: str) -> bytes:
    """The file bytes the set stores for an image (PNG, or JPEG at quality 95 without chroma
    subsampling)."""
    out = io.BytesIO()
    if image_format == "png":
        image.save(out, format="PNG", optimize=False, compress_level=6)
    else:
        image.save(out, format="JPEG", quality=95, subsampling=0)
    return out.getvalue()


def _render_one(job: _Job) -> dict[str, Any]:
    s = job.settings
    img, scene, captions, conv = render_sample(s, job.split, job.index)
    file_name = f"{job.image_id:06d}.{s.image_format}"
    path = Path(s.dir) / "images" / job.split / file_name
    path.write_bytes(encode_image(img, s.image_format))
    return {
        "id": job.image_id,
        "file_name": file_name,
        "scene": scene,
        "captions": captions,
        "conversations": conv,
    }


def _render_chunk(jobs: list[_Job]) -> list[dict[str, Any]]:
    return [_render_one(j) for j in jobs]


def worker_context() -> multiprocessing.context.BaseContext:
    """Fork where the OS has it: it starts fast and works from notebooks and stdin scripts
    (spawn re-imports ``__main__``); the workers only touch numpy and PIL."""
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else "spawn")


def _dump(path: Path, obj: Any, indent: int | None = None) -> None:
    seps = (",", ": ") if indent else (",", ":")
    path.write_text(json.dumps(obj, indent=indent, separators=seps, ensure_ascii=False) + "\n")


def _prepare_out_dir(out: Path, splits: list[str]) -> None:
    """Refuse foreign non-empty folders; clear only our own old images so no stale file remains."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"output path {out} exists and is not a folder; choose a folder path")
    if out.exists() and any(out.iterdir()) and not (out / MANIFEST).exists():
        raise ValueError(
            f"{out} is not empty and holds no {MANIFEST}; "
            "choose an empty or new folder for the synthetic data set"
        )
    for split in SPLIT_CODES:
        d = out / "images" / split
        if d.is_dir():
            for f in d.iterdir():
                if _OWNED_IMAGE.match(f.name):
                    f.unlink()
    for split in splits:
        (out / "images" / split).mkdir(parents=True, exist_ok=True)


def write_synthetic(settings: SyntheticSettings, workers: int | None = None) -> dict[str, Any]:
    """Write images, COCO caption files, LLaVA conversation files and a manifest to
    ``settings.dir``; return a summary. ``workers=None`` uses all CPU cores; 0 or 1 runs
    in-process (the bytes are the same either way)."""
    settings.check()  # fail before any worker starts
    counts = settings.counts()
    splits = list(counts)
    out = Path(settings.dir)
    t0 = time.perf_counter()
    _prepare_out_dir(out, splits)

    jobs: dict[str, list[_Job]] = {}
    next_id = 1
    for split in splits:
        jobs[split] = [_Job(settings, split, i, next_id + i) for i in range(counts[split])]
        next_id += counts[split]
    all_jobs = [j for s in splits for j in jobs[s]]
    chunks = [all_jobs[i : i + _CHUNK] for i in range(0, len(all_jobs), _CHUNK)]
    n_workers = (os.cpu_count() or 1) if workers is None else int(workers)
    n_workers = max(1, min(n_workers, len(chunks)))
    if n_workers == 1:
        results = [r for c in chunks for r in _render_chunk(c)]
    else:
        with ProcessPoolExecutor(n_workers, mp_context=worker_context()) as pool:
            results = [r for rs in pool.map(_render_chunk, chunks) for r in rs]
    by_id = {r["id"]: r for r in results}

    for split in splits:
        recs = [by_id[j.image_id] for j in jobs[split]]
        _write_split(out, split, recs, settings.canvas_size())
    _dump(out / MANIFEST, manifest(settings), indent=2)
    return {
        "out_dir": str(out),
        "counts": counts,
        "images": len(results),
        "workers": n_workers,
        "seconds": round(time.perf_counter() - t0, 3),
        "manifest": str(out / MANIFEST),
    }


def generate_synthetic_dataset(
    out_dir: str | Path,
    num_train: int,
    num_val: int,
    num_test: int = 0,
    *,
    workers: int | None = None,
    **settings: Any,
) -> dict[str, Any]:
    """:func:`write_synthetic` for scripts and tests: counts first, no test split by default,
    any other :class:`SyntheticSettings` field by keyword."""
    chosen = SyntheticSettings(
        dir=str(out_dir), num_train=num_train, num_val=num_val, num_test=num_test, **settings
    )
    return write_synthetic(chosen, workers=workers)


def manifest(settings: SyntheticSettings) -> dict[str, Any]:
    """What ``synthetic_manifest.json`` holds: the content settings, written as they are, plus
    what a reader wants to know without opening the other files."""
    return {
        "name": "lit-mllm synthetic shapes",
        "version": SYNTHETIC_VERSION,
        **settings.content(),
        "counts": settings.counts(),
        "captions_per_image": NUM_CAPTIONS,
        "kinds": list(KINDS),
        "colours": list(COLOURS),
        "backgrounds": list(BACKGROUNDS),
    }


def read_manifest(out_dir: str | Path) -> dict[str, Any] | None:
    """The manifest of a written set, or None when the folder holds none."""
    path = Path(out_dir) / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


def ensure_written(settings: SyntheticSettings) -> bool:
    """Write the set unless ``settings.dir`` already holds it; True if it was written."""
    written = read_manifest(settings.dir)
    if written is not None:
        if settings.matches(written):
            return False
        log.warning("%s was written with other settings: writing it again", settings.dir)
    log.info("writing the synthetic data set to %s", settings.dir)
    write_synthetic(settings)
    return True


def _write_split(out: Path, split: str, recs: list[dict[str, Any]], size: tuple[int, int]) -> None:
    images, annotations, llava = [], [], []
    for r in recs:
        images.append(
            {
                "id": r["id"],
                "file_name": r["file_name"],
                "width": size[0],
                "height": size[1],
                "scene": r["scene"],
            }
        )
        for k, cap in enumerate(r["captions"]):
            annotations.append(
                {"id": (r["id"] - 1) * NUM_CAPTIONS + k + 1, "image_id": r["id"], "caption": cap}
            )
        llava.append(
            {
                "id": f"{r['id']:06d}",
                "image": f"{split}/{r['file_name']}",
                "conversations": r["conversations"],
            }
        )
    coco = {
        "info": {
            "description": f"lit-mllm synthetic shapes, {split} split",
            "version": SYNTHETIC_VERSION,
            "year": 2025,
        },
        "licenses": [
            {
                "id": 1,
                "name": "CC0-1.0",
                "url": "https://creativecommons.org/publicdomain/zero/1.0/",
            }
        ],
        "images": images,
        "annotations": annotations,
    }
    _dump(out / f"captions_{split}.json", coco)
    if split in ("train", "val"):
        _dump(out / f"llava_{split}.json", llava)


def load_references(out_dir: str | Path, split: str = "val") -> dict[int, list[str]]:
    """The reference captions of a split as ``{image_id: [caption, ...]}``."""
    coco = json.loads((Path(out_dir) / f"captions_{split}.json").read_text())
    refs: dict[int, list[str]] = {img["id"]: [] for img in coco["images"]}
    for ann in coco["annotations"]:
        refs[ann["image_id"]].append(ann["caption"])
    return refs
