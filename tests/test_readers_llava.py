"""The LLaVA JSON/JSONL reader (lit_mllm/data/readers/llava.py)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from reader_files import LLAVA_GOOD, image_root, real, write_json

from lit_mllm.data.readers import BadSampleError, load_llava


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return image_root(tmp_path)


def test_llava_json_variants(tmp_path, root):
    store = load_llava(write_json(tmp_path / "llava.json", LLAVA_GOOD), root)
    assert len(store) == 3 and store.skipped == {}
    single, multi, text = store
    assert single.sample_id == "single" and single.image_paths == (real(root, "a.jpg"),)
    assert single.conversation == tuple(LLAVA_GOOD[0]["conversations"])
    assert single.image_id is None and single.references == ()
    assert multi.image_paths == (real(root, "a.jpg"), real(root, "sub/d.jpg"))
    assert text.sample_id == "42" and text.image_paths == ()
    assert text.conversation[0] == {"role": "system", "content": "Be terse."}


def test_llava_jsonl_and_fallback_ids(tmp_path, root):
    lines = [
        json.dumps(LLAVA_GOOD[0]),
        "",
        json.dumps({"conversations": LLAVA_GOOD[2]["conversations"]}),
    ]
    path = tmp_path / "llava.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    store = load_llava(path, root)
    assert [s.sample_id for s in store] == ["single", "llava.jsonl:L3"]
    assert store[1].conversation == tuple(LLAVA_GOOD[2]["conversations"])


def test_llava_malformed_jsonl_line(tmp_path, root, caplog):
    path = tmp_path / "bad.jsonl"
    path.write_text(
        json.dumps(LLAVA_GOOD[0]) + "\n\n{not json\n" + json.dumps(LLAVA_GOOD[1]) + "\n"
    )
    with pytest.raises(BadSampleError, match=r"bad\.jsonl: line 3: not valid JSON") as e:
        load_llava(path, root)
    assert e.value.reason == "malformed_json"
    with caplog.at_level(logging.WARNING, logger="lit_mllm.data.readers"):
        store = load_llava(path, root, on_bad_sample="skip")
    assert [s.sample_id for s in store] == ["single", "multi"]
    assert store.skipped == {"malformed_json": 1}
    summaries = [r.getMessage() for r in caplog.records if "left out" in r.getMessage()]
    assert summaries == [f"{path}: kept 2 samples, left out 1 records: {{'malformed_json': 1}}"]


BAD_LLAVA = [
    ("list", ["x"], "bad_type", "a sample must be a JSON object"),
    ("no_conv", {"id": "no_conv", "image": "a.jpg"}, "missing_key", "missing key 'conversations'"),
    (
        "conv_str",
        {"id": "conv_str", "conversations": "hi"},
        "bad_type",
        "'conversations' must be list",
    ),
    ("empty", {"id": "empty", "conversations": []}, "bad_value", "'conversations' is empty"),
    (
        "val_int",
        {"id": "val_int", "conversations": [{"from": "human", "value": 3}]},
        "bad_type",
        "conversations[0]['value'] must be str, got int",
    ),
    (
        "no_value",
        {"id": "no_value", "conversations": [{"role": "user", "text": "x"}]},
        "missing_key",
        "conversations[0] has no 'content'",
    ),
    (
        "img_int",
        {"id": "img_int", "image": 5, "conversations": LLAVA_GOOD[0]["conversations"]},
        "bad_type",
        "'image' must be a string or a list",
    ),
    (
        "img_list_int",
        {
            "id": "img_list_int",
            "image": ["a.jpg", 1],
            "conversations": LLAVA_GOOD[0]["conversations"],
        },
        "bad_type",
        "image path must be a string, got int",
    ),
    (
        "escape",
        {
            "id": "escape",
            "image": "../../etc/passwd",
            "conversations": LLAVA_GOOD[0]["conversations"],
        },
        "path_escape",
        "outside image_root",
    ),
    (
        "absolute",
        {"id": "absolute", "image": "/etc/passwd", "conversations": LLAVA_GOOD[0]["conversations"]},
        "path_escape",
        "'/etc/passwd' resolves to '/etc/passwd', outside image_root",
    ),
    (
        "bad_id",
        {"id": [1], "conversations": LLAVA_GOOD[0]["conversations"]},
        "bad_type",
        "'id' must be str/int",
    ),
]


@pytest.mark.parametrize(
    ("sid", "record", "reason", "needle"), BAD_LLAVA, ids=[b[0] for b in BAD_LLAVA]
)
def test_llava_each_error_names_file_and_sample(tmp_path, root, sid, record, reason, needle):
    path = write_json(tmp_path / "data.json", [LLAVA_GOOD[0], record])
    with pytest.raises(BadSampleError) as e:
        load_llava(path, root)
    msg = str(e.value)
    expected_id = (
        sid if isinstance(record, dict) and isinstance(record.get("id"), str) else "data.json:1"
    )
    assert msg.startswith(f"{path}: record 1 (id {expected_id!r}): ") and needle in msg, msg
    assert e.value.reason == reason and e.value.sample_id == expected_id
    store = load_llava(path, root, on_bad_sample="skip")
    assert len(store) == 1 and store.skipped == {reason: 1}


def test_llava_skip_counts_mixed(tmp_path, root):
    conv = LLAVA_GOOD[0]["conversations"]
    lines = [
        json.dumps(LLAVA_GOOD[0]),
        "[oops",
        json.dumps({"id": "t1", "conversations": "x"}),
        json.dumps({"id": "t2", "conversations": [{"from": "gpt", "value": None}]}),
        json.dumps({"id": "esc", "image": "../x.jpg", "conversations": conv}),
        json.dumps({"id": "gone", "image": "nope.jpg", "conversations": conv}),
        json.dumps(LLAVA_GOOD[2]),
    ]
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(lines), encoding="utf-8")
    store = load_llava(path, root, on_bad_sample="skip")
    assert [s.sample_id for s in store] == ["single", "42"]
    expected = {"malformed_json": 1, "bad_type": 2, "path_escape": 1, "missing_image": 1}
    assert store.skipped == expected


# --------------------------------------------------------------------------------------------
# Duplicate ids (#15.10): counted as duplicate_id or named with both positions; never merged


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_llava_duplicate_ids_are_named_or_counted(tmp_path, root, suffix):
    conv = LLAVA_GOOD[0]["conversations"]
    text = [{"from": "human", "value": "Hi"}, conv[1]]
    records = [
        {"id": "x", "image": "a.jpg", "conversations": conv},
        {"id": "y", "image": "b.jpg", "conversations": conv},
        {"id": "x", "image": "c.jpg", "conversations": conv},
        {"id": 42, "conversations": text},
        {"id": "42", "conversations": text},  # the same sample id as 42
    ]
    path = tmp_path / f"dup{suffix}"
    if suffix == ".json":
        write_json(path, records)
        first, second = "record 0", "record 2"
    else:
        path.write_text("\n".join(json.dumps(r) for r in records) + "\n", encoding="utf-8")
        first, second = "line 1", "line 3"
    with pytest.raises(BadSampleError) as e:
        load_llava(path, root)
    assert e.value.reason == "duplicate_id" and e.value.sample_id == "x"
    assert str(path) in str(e.value) and f"'x' is used by both {first} and {second}" in str(e.value)
    store = load_llava(path, root, on_bad_sample="skip")
    assert [s.sample_id for s in store] == ["x", "y", "42"]
    assert store[0].image_paths == (real(root, "a.jpg"),)
    assert store.skipped == {"duplicate_id": 2}
