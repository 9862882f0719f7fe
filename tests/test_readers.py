"""The reader dispatcher (lit_mllm/data/readers/__init__.py): a source kind -> its reader."""

from __future__ import annotations

from pathlib import Path

import pytest
from reader_files import LLAVA_GOOD, coco_file, image_root, karpathy_file, write_json

from lit_mllm.data.readers import load_source


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return image_root(tmp_path)


def test_load_source_dispatch(tmp_path, root):
    assert len(load_source("llava", write_json(tmp_path / "l.json", LLAVA_GOOD), root)) == 3
    assert len(load_source("coco", coco_file(tmp_path), root)) == 2
    assert len(load_source("karpathy", karpathy_file(tmp_path), root, split="val")) == 1
    with pytest.raises(ValueError, match="unknown source kind"):
        load_source("webdataset", tmp_path / "l.json", root)
