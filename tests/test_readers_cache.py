"""The .npz cache of parsed annotation files (lit_mllm/data/readers/cache.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from reader_files import LLAVA_GOOD, PROMPT, coco_file, image_root

from lit_mllm.data.readers import BadSampleError, load_coco_captions, load_llava
from lit_mllm.data.readers import llava as llava_reader


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return image_root(tmp_path)


def test_cache_parses_once_and_keys_on_file_and_options(tmp_path, root, monkeypatch):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps(LLAVA_GOOD[0]) + "\n{bad\n")
    cache = tmp_path / "cache"
    first = load_llava(path, root, on_bad_sample="skip", cache_dir=cache)
    assert len(list(cache.glob("c.jsonl.llava.*.npz"))) == 1

    def no_parse(*a, **k):
        raise AssertionError("re-parsed although cached")

    monkeypatch.setattr(llava_reader, "_iter_llava", no_parse)
    again = load_llava(path, root, on_bad_sample="skip", cache_dir=cache)
    assert list(again) == list(first) and again.skipped == {"malformed_json": 1}
    monkeypatch.undo()
    # a different option or a changed file is a different key: rebuilt, not served stale
    with pytest.raises(BadSampleError):
        load_llava(path, root, cache_dir=cache)
    path.write_text(json.dumps(LLAVA_GOOD[0]) + "\n" + json.dumps(LLAVA_GOOD[1]) + "\n")
    assert len(load_llava(path, root, on_bad_sample="skip", cache_dir=cache)) == 2


def test_coco_cache_roundtrip(tmp_path, root):
    path = coco_file(tmp_path)
    a = load_coco_captions(path, root, one_sample_per_caption=True, cache_dir=tmp_path / "cc")
    b = load_coco_captions(path, root, one_sample_per_caption=True, cache_dir=tmp_path / "cc")
    assert list(a) == list(b) and b.skipped == {"no_captions": 1} and b.prompt == PROMPT
