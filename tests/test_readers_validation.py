"""File-level errors shared by every reader (lit_mllm/data/readers/validation.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from reader_files import LLAVA_GOOD, image_root, write_json

from lit_mllm.data.readers import load_llava


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return image_root(tmp_path)


def test_file_level_errors(tmp_path, root):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_llava(tmp_path / "nope.json", root)
    with pytest.raises(FileNotFoundError, match="image_root"):
        load_llava(write_json(tmp_path / "ok.json", LLAVA_GOOD), tmp_path / "no_images")
    bad = tmp_path / "bad.json"
    bad.write_text('[{"id": 1,\n "conversations": ]')
    with pytest.raises(ValueError, match=r"bad\.json: not valid JSON at line 2 column 19"):
        load_llava(bad, root)
    lines = tmp_path / "lines.json"
    lines.write_text(json.dumps(LLAVA_GOOD[0]) + "\n" + json.dumps(LLAVA_GOOD[1]) + "\n")
    with pytest.raises(ValueError, match=r"name the file \.jsonl"):
        load_llava(lines, root)
    with pytest.raises(ValueError, match="expected a JSON list"):
        load_llava(write_json(tmp_path / "obj.json", {"a": 1}), root)
    with pytest.raises(ValueError, match="on_bad_sample"):
        load_llava(write_json(tmp_path / "ok.json", LLAVA_GOOD), root, on_bad_sample="ignore")
