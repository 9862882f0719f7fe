"""Karpathy split files (``dataset_coco.json``, ``dataset_flickr30k.json``) -> a SampleStore."""

from __future__ import annotations

import os
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

KARPATHY_SPLITS = ("train", "restval", "val", "test")


def load_karpathy(
    split_file: str | Path,
    image_root: str | Path,
    split: str,
    *,
    prompt: str = DEFAULT_CAPTION_PROMPT,
    one_sample_per_caption: bool = False,
    restval_in_train: bool = True,
    on_bad_sample: OnBadSample = "error",
    check_images: bool = True,
    cache_dir: str | Path | None = None,
) -> SampleStore:
    """Read one split of a Karpathy file: ``images[]{split, filepath?, filename, sentences[].raw,
    cocoid|imgid}``. ``split="train"`` also takes ``"restval"`` images when ``restval_in_train``
    (the usual 113k-image COCO train split). Image paths are ``filepath/filename`` under
    image_root. Sample ids: ``{dataset}:{image_id}`` or ``{dataset}:{image_id}:{sentid}``.
    An image id or ``sentid`` used twice among the read splits is ``duplicate_id``; the first
    image entry that uses it is kept.
    """
    if split not in KARPATHY_SPLITS:
        raise ValueError(f"split must be one of {KARPATHY_SPLITS}, got {split!r}")
    path = check_file(split_file)
    wanted = {split, "restval"} if split == "train" and restval_in_train else {split}
    options = {"split": sorted(wanted), "prompt": prompt, "per_caption": one_sample_per_caption}
    options |= {"on_bad": on_bad_sample, "check": check_images}

    def build() -> SampleStore:
        col = Collector(path, on_bad_sample)
        resolve = ImageResolver(image_root, check_images)
        top = read_json(path)
        if not isinstance(top, dict) or not isinstance(top.get("images"), list):
            raise ValueError(
                f"{path}: not a Karpathy split file (expected an object with an 'images' list, "
                "e.g. dataset_coco.json)"
            )
        dataset = top.get("dataset") if isinstance(top.get("dataset"), str) else "coco"
        builder = StoreBuilder(resolve.root, source=path, prompt=prompt)
        seen: dict[Any, int] = {}
        sentences_seen: dict[Any, str] = {}  # sentid -> where it was first used
        for i, im in enumerate(top["images"]):
            where, sid = f"images[{i}]", None
            try:
                im = require_dict(im, "an image entry")
                image_id = im.get("cocoid", im.get("imgid"))
                if is_id(image_id):
                    sid = f"{dataset}:{image_id}"
                im_split = require(im, "split", str, "one of " + "/".join(KARPATHY_SPLITS))
                if im_split not in KARPATHY_SPLITS:
                    raise InvalidRecord("bad_value", f"unknown split {im_split!r}")
                if im_split not in wanted:
                    continue
                if image_id is None:
                    raise InvalidRecord(
                        "missing_key", "missing key 'cocoid' or 'imgid' (the image id)"
                    )
                if not is_id(image_id):
                    raise InvalidRecord(
                        "bad_type", f"image id must be int/str, got {type(image_id).__name__}"
                    )
                if image_id in seen:
                    raise InvalidRecord(
                        "duplicate_id",
                        f"image id {image_id!r} is used by both images[{seen[image_id]}] and "
                        f"{where}",
                    )
                seen[image_id] = i
                filename = require(im, "filename", str, "the image file name")
                filepath = im.get("filepath", "")
                if not isinstance(filepath, str):
                    raise InvalidRecord(
                        "bad_type", f"'filepath' must be str, got {type(filepath).__name__}"
                    )
                sentences = require(im, "sentences", list, "the reference captions")
                caps = []
                here: dict[Any, str] = {}  # this image's caption ids -> where
                explicit: dict[Any, str] = {}  # its own sentids: unique across the whole file
                for k, sent in enumerate(sentences):
                    sent = require_dict(sent, f"sentences[{k}]")
                    raw = require(sent, "raw", str, f"text of sentences[{k}]").strip()
                    if not raw:
                        raise InvalidRecord("empty_caption", f"sentences[{k}] is empty")
                    at = f"{where}.sentences[{k}]"
                    sent_id = sent.get("sentid")
                    own = is_id(sent_id)
                    if not own:  # no usable sentid: the position names the caption
                        sent_id = k
                    first = here.get(sent_id) or (sentences_seen.get(sent_id) if own else None)
                    if first is not None:
                        raise InvalidRecord(
                            "duplicate_id", f"sentid {sent_id!r} is used by both {first} and {at}"
                        )
                    here[sent_id] = at
                    if own:
                        explicit[sent_id] = at
                    caps.append((sent_id, raw))
                sentences_seen.update(explicit)
                if not caps:
                    col.note("no_captions")
                    continue
                rel = resolve(os.path.join(filepath, filename))
            except InvalidRecord as e:
                col.bad(where, sid, e)
                continue
            add_caption_image(builder, dataset, image_id, rel, caps, one_sample_per_caption)
        return builder.build(dict(col.skipped))

    return load_cached("karpathy", path, image_root, options, cache_dir, build)
