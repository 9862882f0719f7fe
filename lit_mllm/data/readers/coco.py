"""COCO caption files (``captions_train2017.json`` layout) -> a SampleStore."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lit_mllm.data.options import OnBadSample
from lit_mllm.data.readers.cache import load_cached
from lit_mllm.data.readers.captions import DEFAULT_CAPTION_PROMPT, add_caption_image
from lit_mllm.data.readers.image_paths import ImageResolver
from lit_mllm.data.readers.validation import (
    Collector,
    InvalidRecord,
    check_file,
    is_id,
    read_json,
    require,
    require_dict,
)
from lit_mllm.data.records import SampleStore, StoreBuilder


def load_coco_captions(
    annotation_file: str | Path,
    image_root: str | Path,
    *,
    prompt: str = DEFAULT_CAPTION_PROMPT,
    one_sample_per_caption: bool = False,
    on_bad_sample: OnBadSample = "error",
    check_images: bool = True,
    cache_dir: str | Path | None = None,
) -> SampleStore:
    """Read a COCO caption file: ``images[]{id,file_name}`` + ``annotations[]{id,image_id,caption}``.

    Sample ids: ``coco:{image_id}`` (one per image) or ``coco:{image_id}:{ann_id}`` (per caption).
    Images with no caption are left out and counted under ``skipped["no_captions"]``.

    Duplicate ids (``duplicate_id``): an image id used by two entries is ambiguous, since captions
    join images by id; every entry of it and every caption pointing at it are left out, never
    attached to one of the images. A repeated annotation id keeps its first annotation.
    """
    path = check_file(annotation_file)
    options = {"prompt": prompt, "per_caption": one_sample_per_caption}
    options |= {"on_bad": on_bad_sample, "check": check_images}

    def build() -> SampleStore:
        col = Collector(path, on_bad_sample)
        resolve = ImageResolver(image_root, check_images)
        top = read_json(path)
        if not isinstance(top, dict) or not all(k in top for k in ("images", "annotations")):
            raise ValueError(
                f"{path}: not a COCO caption file (expected an object with 'images' and "
                "'annotations' lists, e.g. captions_val2017.json)"
            )
        for key in ("images", "annotations"):
            if not isinstance(top[key], list):
                raise ValueError(f"{path}: {key!r} must be a list, got {type(top[key]).__name__}")
        images: dict[Any, tuple[str, str]] = {}  # image id -> (where, file name)
        first_use: dict[Any, str] = {}  # image id -> where it first appeared
        ambiguous: set[Any] = set()  # image ids of two or more entries: dropped with captions
        for i, im in enumerate(top["images"]):
            where, sid = f"images[{i}]", None
            try:
                im = require_dict(im, "an image entry")
                if is_id(im.get("id")):
                    sid = f"coco:{im['id']}"
                image_id = require(im, "id", (int, str), "the image id")
                if image_id in first_use:
                    ambiguous.add(image_id)
                    duplicate = InvalidRecord(
                        "duplicate_id",
                        f"image id {image_id!r} is used by both {first_use[image_id]} and {where}",
                    )
                    col.bad(where, sid, duplicate)  # raises unless skipping
                    if images.pop(image_id, None) is not None:  # the first entry goes too
                        col.bad(first_use[image_id], sid, duplicate)
                    continue
                first_use[image_id] = where
                file_name = require(im, "file_name", str, "the image file, relative to image_root")
                images[image_id] = (where, file_name)
            except InvalidRecord as e:
                col.bad(where, sid, e)

        captions: dict[Any, list[tuple[Any, str]]] = {}
        ann_seen: dict[Any, str] = {}  # annotation id -> where it was first kept
        for i, ann in enumerate(top["annotations"]):
            where, sid = f"annotations[{i}]", None
            try:
                ann = require_dict(ann, "an annotation")
                if is_id(ann.get("image_id")) and is_id(ann.get("id")):
                    sid = f"coco:{ann['image_id']}:{ann['id']}"
                image_id = require(ann, "image_id", (int, str), "the captioned image")
                ann_id = require(ann, "id", (int, str), "the annotation id")
                caption = require(ann, "caption", str, "the caption text").strip()
                if not caption:
                    raise InvalidRecord("empty_caption", "caption is empty")
                if ann_id in ann_seen:
                    raise InvalidRecord(
                        "duplicate_id",
                        f"annotation id {ann_id!r} is used by both {ann_seen[ann_id]} and {where}",
                    )
                if image_id in ambiguous:
                    raise InvalidRecord(
                        "duplicate_id",
                        f"image_id {image_id!r} names several entries of 'images' "
                        "(the caption cannot be attributed to one of them)",
                    )
                if image_id not in images:
                    raise InvalidRecord(
                        "unknown_image", f"image_id {image_id!r} is not in 'images'"
                    )
                ann_seen[ann_id] = where
                captions.setdefault(image_id, []).append((ann_id, caption))
            except InvalidRecord as e:
                col.bad(where, sid, e)

        builder = StoreBuilder(resolve.root, source=path, prompt=prompt)
        for image_id, (where, file_name) in images.items():
            caps = captions.get(image_id)
            if not caps:
                col.note("no_captions")
                continue
            try:
                rel = resolve(file_name)
            except InvalidRecord as e:
                col.bad(where, f"coco:{image_id}", e)
                continue
            add_caption_image(builder, "coco", image_id, rel, caps, one_sample_per_caption)
        return builder.build(dict(col.skipped))

    return load_cached("coco", path, image_root, options, cache_dir, build)
