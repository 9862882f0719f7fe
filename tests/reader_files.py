"""Small annotation files and an image root for the reader tests (tests/test_readers*.py).

Images are empty files: readers only check that they exist, they never open them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

PROMPT = "Describe the image briefly."

LLAVA_GOOD = [
    {
        "id": "single",
        "image": "a.jpg",
        "conversations": [
            {"from": "human", "value": "<image>\nWhat is this?"},
            {"from": "gpt", "value": "A dog."},
        ],
    },
    {
        "id": "multi",
        "image": ["a.jpg", "sub/d.jpg"],
        "conversations": [
            {"from": "human", "value": "<image><image>\nCompare."},
            {"from": "gpt", "value": "Same."},
        ],
    },
    {
        "id": 42,
        "conversations": [
            {"role": "system", "content": "Be terse."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"},
        ],
    },
]


def touch(root: Path, *names: str) -> None:
    for name in names:
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"")


def write_json(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path


def image_root(tmp_path: Path) -> Path:
    """``tmp_path/images`` with the image files every reader test names."""
    r = tmp_path / "images"
    touch(r, "a.jpg", "b.jpg", "c.jpg", "sub/d.jpg", "val2014/v1.jpg", "train2014/t1.jpg")
    touch(r, "train2014/t2.jpg", "val2014/v2.jpg", "val2014/v3.jpg")
    return r


def real(root: Path, name: str) -> str:
    """The path a reader stores for ``name`` under ``root`` (symlinks of the root resolved)."""
    return os.path.join(os.path.realpath(root), name)


def coco_file(tmp_path: Path, annotations=None, images=None) -> Path:
    """``captions.json``: by default images 1 (two captions), 2 (one) and 3 (none)."""
    images = images or [
        {"id": 1, "file_name": "a.jpg"},
        {"id": 2, "file_name": "b.jpg"},
        {"id": 3, "file_name": "c.jpg"},  # no captions
    ]
    annotations = annotations or [
        {"image_id": 1, "id": 10, "caption": "A dog runs. "},
        {"image_id": 2, "id": 20, "caption": "A cat."},
        {"image_id": 1, "id": 11, "caption": "A brown dog.\n"},
    ]
    return write_json(tmp_path / "captions.json", {"images": images, "annotations": annotations})


def karpathy_file(tmp_path: Path) -> Path:
    """``dataset_coco.json`` with one image in each split and two in train."""

    def img(split, filepath, filename, cocoid, caps):
        sents = [{"raw": c, "sentid": 100 * cocoid + k} for k, c in enumerate(caps)]
        return {"split": split, "filepath": filepath, "filename": filename, "cocoid": cocoid}, sents

    rows = [
        img("train", "train2014", "t1.jpg", 1, ["Train one. ", "Train one b."]),
        img("restval", "val2014", "v1.jpg", 2, ["Restval."]),
        img("val", "val2014", "v2.jpg", 3, ["Val a.", "Val b."]),
        img("test", "val2014", "v3.jpg", 4, ["Test."]),
        img("train", "train2014", "t2.jpg", 5, ["Train two."]),
    ]
    images = [{**meta, "imgid": i, "sentences": s} for i, (meta, s) in enumerate(rows)]
    return write_json(tmp_path / "dataset_coco.json", {"images": images, "dataset": "coco"})
