"""Tests for the data readers (lit_mllm/data/sources.py) and the sample store (records.py)."""

from __future__ import annotations

import json
import logging
import os
import pickle
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from lit_mllm.data import sources
from lit_mllm.data.records import Sample, SampleStore, StoreBuilder
from lit_mllm.data.sources import (
    BadSampleError,
    MissingImageError,
    load_coco_captions,
    load_karpathy,
    load_llava,
    load_source,
)

PROMPT = "Describe the image briefly."


def _touch(root: Path, *names: str) -> None:
    for name in names:
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"")


def _write_json(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "images"
    _touch(r, "a.jpg", "b.jpg", "c.jpg", "sub/d.jpg", "val2014/v1.jpg", "train2014/t1.jpg")
    _touch(r, "train2014/t2.jpg", "val2014/v2.jpg", "val2014/v3.jpg")
    return r


def _abs(root: Path, name: str) -> str:
    return os.path.join(os.path.realpath(root), name)


# --------------------------------------------------------------------------------------------
# COCO captions


def _coco(tmp_path: Path, annotations=None, images=None) -> Path:
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
    return _write_json(tmp_path / "captions.json", {"images": images, "annotations": annotations})


def test_coco_one_sample_per_image(tmp_path, root):
    store = load_coco_captions(_coco(tmp_path), root)
    assert len(store) == 2
    assert store.skipped == {"no_captions": 1}
    s = store[0]
    assert s == Sample(
        sample_id="coco:1",
        image_paths=(_abs(root, "a.jpg"),),
        conversation=(
            {"role": "user", "content": "<image>\n" + PROMPT},
            {"role": "assistant", "content": "A dog runs."},
        ),
        image_id=1,
        references=("A dog runs.", "A brown dog."),
    )
    assert store[1].sample_id == "coco:2" and store[1].references == ("A cat.",)


def test_coco_one_sample_per_caption_and_prompt(tmp_path, root):
    store = load_coco_captions(
        _coco(tmp_path), root, prompt="Caption:", one_sample_per_caption=True
    )
    assert [s.sample_id for s in store] == ["coco:1:10", "coco:1:11", "coco:2:20"]
    assert [s.conversation[1]["content"] for s in store] == [
        "A dog runs.",
        "A brown dog.",
        "A cat.",
    ]
    assert store[0].conversation[0]["content"] == "<image>\nCaption:"
    assert store[0].references == store[1].references == ("A dog runs.", "A brown dog.")


@pytest.mark.parametrize(
    ("ann", "reason", "where", "needle"),
    [
        (
            {"image_id": 1, "id": 12, "caption": 5},
            "bad_type",
            "annotations[3]",
            "'caption' must be str",
        ),
        ({"image_id": 1, "id": 12}, "missing_key", "annotations[3]", "missing key 'caption'"),
        (
            {"image_id": 9, "id": 12, "caption": "x"},
            "unknown_image",
            "annotations[3]",
            "image_id 9",
        ),
        ({"image_id": 1, "id": 12, "caption": "  "}, "empty_caption", "annotations[3]", "empty"),
    ],
)
def test_coco_bad_annotation(tmp_path, root, ann, reason, where, needle):
    anns = [
        {"image_id": 1, "id": 10, "caption": "A dog."},
        {"image_id": 2, "id": 20, "caption": "A cat."},
        {"image_id": 3, "id": 30, "caption": "A cow."},
        ann,
    ]
    path = _coco(tmp_path, annotations=anns)
    with pytest.raises(BadSampleError) as e:
        load_coco_captions(path, root)
    msg = str(e.value)
    assert str(path) in msg and where in msg and needle in msg and e.value.reason == reason
    assert e.value.sample_id == f"coco:{ann['image_id']}:12"
    store = load_coco_captions(path, root, on_bad_sample="skip")
    assert len(store) == 3 and store.skipped == {reason: 1}


def test_coco_bad_image_entries(tmp_path, root):
    images = [
        {"id": 1, "file_name": "a.jpg"},
        {"id": 1, "file_name": "b.jpg"},  # duplicate id
        {"id": 2, "file_name": ["b.jpg"]},  # bad type
        {"id": 3, "file_name": "../images/../../x.jpg"},  # escape
    ]
    anns = [{"image_id": i, "id": 10 + i, "caption": "c"} for i in (1, 2, 3)]
    path = _coco(tmp_path, annotations=anns[:1], images=images[:2])
    with pytest.raises(BadSampleError, match=r"images\[1\] \(id 'coco:1'\).*both images\[0\]"):
        load_coco_captions(path, root)
    path = _coco(tmp_path, annotations=anns[:1] + anns[2:], images=images[:1] + images[3:])
    with pytest.raises(BadSampleError, match=r"images\[1\] \(id 'coco:3'\).*outside image_root"):
        load_coco_captions(path, root)
    path = _coco(tmp_path, annotations=anns, images=images)
    store = load_coco_captions(path, root, on_bad_sample="skip")
    # image 2's entry is bad, so its annotation points at an unknown image; image id 1 is
    # ambiguous, so both its entries and its caption are left out
    expected = {"duplicate_id": 3, "bad_type": 1, "unknown_image": 1, "path_escape": 1}
    assert [s.sample_id for s in store] == [] and store.skipped == expected


def test_coco_not_a_caption_file(tmp_path, root):
    path = _write_json(tmp_path / "x.json", {"images": []})
    with pytest.raises(ValueError, match=r"x\.json: not a COCO caption file"):
        load_coco_captions(path, root)


# --------------------------------------------------------------------------------------------
# Karpathy


def _karpathy(tmp_path: Path) -> Path:
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
    return _write_json(tmp_path / "dataset_coco.json", {"images": images, "dataset": "coco"})


def test_karpathy_splits_and_restval(tmp_path, root):
    path = _karpathy(tmp_path)
    train = load_karpathy(path, root, "train")
    assert [s.image_id for s in train] == [1, 2, 5]
    assert train[1].image_paths == (_abs(root, "val2014/v1.jpg"),)
    no_restval = load_karpathy(path, root, "train", restval_in_train=False)
    assert [s.image_id for s in no_restval] == [1, 5]
    assert [s.image_id for s in load_karpathy(path, root, "restval")] == [2]
    val = load_karpathy(path, root, "val")
    assert [s.sample_id for s in val] == ["coco:3"] and val[0].references == ("Val a.", "Val b.")
    test = load_karpathy(path, root, "test", one_sample_per_caption=True)
    assert [s.sample_id for s in test] == ["coco:4:400"]
    per_cap = load_karpathy(path, root, "train", one_sample_per_caption=True)
    assert [s.sample_id for s in per_cap] == [
        "coco:1:100",
        "coco:1:101",
        "coco:2:200",
        "coco:5:500",
    ]
    assert per_cap[0].conversation[1]["content"] == "Train one."
    assert per_cap[1].references == ("Train one.", "Train one b.")
    with pytest.raises(ValueError, match="split must be one of"):
        load_karpathy(path, root, "training")


def test_karpathy_flickr_layout_and_errors(tmp_path, root):
    images = [
        {"split": "test", "filename": "a.jpg", "imgid": 0, "sentences": [{"raw": "x"}]},
        {"split": "test", "filename": "b.jpg", "imgid": 1, "sentences": [{"tokens": ["y"]}]},
        {"split": "test", "filename": "missing.jpg", "imgid": 2, "sentences": [{"raw": "z"}]},
        {"split": "test", "filename": "c.jpg", "imgid": 3, "sentences": []},
        {"split": "train", "filename": 7, "imgid": 4, "sentences": []},  # other split: not read
        {"split": "dev", "filename": "a.jpg", "imgid": 5, "sentences": [{"raw": "w"}]},
    ]
    path = _write_json(
        tmp_path / "dataset_flickr30k.json", {"images": images, "dataset": "flickr30k"}
    )
    with pytest.raises(BadSampleError) as e:
        load_karpathy(path, root, "test")
    assert "images[1] (id 'flickr30k:1')" in str(e.value) and "'raw'" in str(e.value)
    store = load_karpathy(path, root, "test", on_bad_sample="skip")
    assert [(s.sample_id, s.image_id) for s in store] == [("flickr30k:0", 0)]
    assert store.skipped == {"missing_key": 1, "missing_image": 1, "no_captions": 1, "bad_value": 1}


# --------------------------------------------------------------------------------------------
# LLaVA


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


def test_llava_json_variants(tmp_path, root):
    store = load_llava(_write_json(tmp_path / "llava.json", LLAVA_GOOD), root)
    assert len(store) == 3 and store.skipped == {}
    single, multi, text = store
    assert single.sample_id == "single" and single.image_paths == (_abs(root, "a.jpg"),)
    assert single.conversation == tuple(LLAVA_GOOD[0]["conversations"])
    assert single.image_id is None and single.references == ()
    assert multi.image_paths == (_abs(root, "a.jpg"), _abs(root, "sub/d.jpg"))
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
    with caplog.at_level(logging.WARNING, logger="lit_mllm.data.sources"):
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
    path = _write_json(tmp_path / "data.json", [LLAVA_GOOD[0], record])
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


def test_missing_image_error_and_check_images_off(tmp_path, root):
    rec = {"id": "gone", "image": "sub/nope.jpg", "conversations": LLAVA_GOOD[0]["conversations"]}
    path = _write_json(tmp_path / "d.json", [rec])
    with pytest.raises(
        MissingImageError, match=r"d\.json: record 0 \(id 'gone'\): image file .*nope"
    ) as e:
        load_llava(path, root)
    assert isinstance(e.value, FileNotFoundError) and e.value.sample_id == "gone"
    store = load_llava(path, root, check_images=False)
    assert store[0].image_paths == (_abs(root, "sub/nope.jpg"),)


def test_path_escape_symlinks_always_refused(tmp_path, root):
    outside = tmp_path / "outside"
    _touch(outside, "secret.jpg")
    os.symlink(outside / "secret.jpg", root / "link.jpg")  # file link leaving the root
    os.symlink(outside, root / "linkdir")  # directory link leaving the root
    os.symlink(root / "a.jpg", root / "inside_link.jpg")  # link staying inside: allowed
    conv = LLAVA_GOOD[0]["conversations"]
    names = [
        "link.jpg",
        "linkdir/secret.jpg",
        str(outside / "secret.jpg"),
        "sub/../../outside/secret.jpg",
    ]
    for check in (True, False):
        for name in names:
            path = _write_json(
                tmp_path / "s.json", [{"id": "s", "image": name, "conversations": conv}]
            )
            with pytest.raises(BadSampleError, match="outside image_root") as e:
                load_llava(path, root, check_images=check)
            assert e.value.reason == "path_escape"
    ok = [
        {"id": f"ok{k}", "image": n, "conversations": conv}
        for k, n in enumerate(("inside_link.jpg", str(root / "sub/d.jpg")))
    ]
    store = load_llava(_write_json(tmp_path / "ok.json", ok), root)
    assert [s.image_paths for s in store] == [(_abs(root, "a.jpg"),), (_abs(root, "sub/d.jpg"),)]


def test_file_level_errors(tmp_path, root):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_llava(tmp_path / "nope.json", root)
    with pytest.raises(FileNotFoundError, match="image_root"):
        load_llava(_write_json(tmp_path / "ok.json", LLAVA_GOOD), tmp_path / "no_images")
    bad = tmp_path / "bad.json"
    bad.write_text('[{"id": 1,\n "conversations": ]')
    with pytest.raises(ValueError, match=r"bad\.json: not valid JSON at line 2 column 19"):
        load_llava(bad, root)
    lines = tmp_path / "lines.json"
    lines.write_text(json.dumps(LLAVA_GOOD[0]) + "\n" + json.dumps(LLAVA_GOOD[1]) + "\n")
    with pytest.raises(ValueError, match=r"name the file \.jsonl"):
        load_llava(lines, root)
    with pytest.raises(ValueError, match="expected a JSON list"):
        load_llava(_write_json(tmp_path / "obj.json", {"a": 1}), root)
    with pytest.raises(ValueError, match="on_bad_sample"):
        load_llava(_write_json(tmp_path / "ok.json", LLAVA_GOOD), root, on_bad_sample="ignore")


def test_load_source_dispatch(tmp_path, root):
    assert len(load_source("llava", _write_json(tmp_path / "l.json", LLAVA_GOOD), root)) == 3
    assert len(load_source("coco", _coco(tmp_path), root)) == 2
    assert len(load_source("karpathy", _karpathy(tmp_path), root, split="val")) == 1
    with pytest.raises(ValueError, match="unknown source kind"):
        load_source("webdataset", tmp_path / "l.json", root)


# --------------------------------------------------------------------------------------------
# Cache


def test_cache_parses_once_and_keys_on_file_and_options(tmp_path, root, monkeypatch):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps(LLAVA_GOOD[0]) + "\n{bad\n")
    cache = tmp_path / "cache"
    first = load_llava(path, root, on_bad_sample="skip", cache_dir=cache)
    assert len(list(cache.glob("c.jsonl.llava.*.npz"))) == 1

    def no_parse(*a, **k):
        raise AssertionError("re-parsed although cached")

    monkeypatch.setattr(sources, "_iter_llava", no_parse)
    again = load_llava(path, root, on_bad_sample="skip", cache_dir=cache)
    assert list(again) == list(first) and again.skipped == {"malformed_json": 1}
    monkeypatch.undo()
    # a different option or a changed file is a different key: rebuilt, not served stale
    with pytest.raises(BadSampleError):
        load_llava(path, root, cache_dir=cache)
    path.write_text(json.dumps(LLAVA_GOOD[0]) + "\n" + json.dumps(LLAVA_GOOD[1]) + "\n")
    assert len(load_llava(path, root, on_bad_sample="skip", cache_dir=cache)) == 2


def test_coco_cache_roundtrip(tmp_path, root):
    path = _coco(tmp_path)
    a = load_coco_captions(path, root, one_sample_per_caption=True, cache_dir=tmp_path / "cc")
    b = load_coco_captions(path, root, one_sample_per_caption=True, cache_dir=tmp_path / "cc")
    assert list(a) == list(b) and b.skipped == {"no_captions": 1} and b.prompt == PROMPT


# --------------------------------------------------------------------------------------------
# Store


def _big_store(n: int) -> SampleStore:
    builder = StoreBuilder("/data/images", source="synthetic")
    for i in range(n):
        conv = [
            {"from": "human", "value": f"<image>\nq{i}"},
            {"from": "gpt", "value": f"answer {i}"},
        ]
        builder.add(f"s{i}", [f"img/{i % 97}.jpg"], conv)
    return builder.build({"bad_type": 3})


def test_store_50k_pickles_to_buffer_size():
    n = 50_000
    store = _big_store(n)
    blob = pickle.dumps(store, protocol=pickle.HIGHEST_PROTOCOL)
    assert store.nbytes <= len(blob) <= store.nbytes + 2048
    assert store._data.nbytes > 0.9 * store.nbytes  # the records buffer dominates
    tracemalloc.start()
    try:
        clone = pickle.loads(blob)
        used, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # numpy reports its buffers to tracemalloc: the copy costs its bytes, not n Python objects
    assert used < 1.1 * len(blob)
    assert len(clone) == n and clone.skipped == {"bad_type": 3}
    for i in (0, 1, 12_345, n - 1, -1):
        j = i % n
        s = clone[i]
        assert s.sample_id == f"s{j}" and s.image_paths == (f"/data/images/img/{j % 97}.jpg",)
        assert s.conversation[1] == {"from": "gpt", "value": f"answer {j}"}
    assert [s.sample_id for s in clone[3:6]] == ["s3", "s4", "s5"]
    assert clone[np.int64(7)].sample_id == "s7"
    with pytest.raises(IndexError):
        clone[n]


def test_store_from_samples_save_load(tmp_path):
    samples = [
        Sample("x", ("/abs/a.jpg",), ({"role": "user", "content": "ü<image>"},), 3, ("r1", "r2")),
        Sample("y", (), ({"from": "human", "value": "hi"},), None, ()),
    ]
    store = SampleStore.from_samples(samples, source="mem", skipped={"bad_value": 1})
    assert list(store) == samples
    store.save(tmp_path / "s.npz")
    loaded = SampleStore.load(tmp_path / "s.npz")
    assert list(loaded) == samples and loaded.skipped == {"bad_value": 1} and loaded.source == "mem"


# --------------------------------------------------------------------------------------------
# Duplicate ids (#15.10): counted as duplicate_id or named with both positions; never merged


def test_coco_duplicate_image_id_never_moves_a_caption_to_another_image(tmp_path, root):
    images = [
        {"id": 1, "file_name": "a.jpg"},
        {"id": 2, "file_name": "b.jpg"},
        {"id": 1, "file_name": "c.jpg"},  # the same id for another file
    ]
    anns = [
        {"image_id": 1, "id": 10, "caption": "A dog."},
        {"image_id": 2, "id": 20, "caption": "A cat."},
        {"image_id": 1, "id": 11, "caption": "A cow."},  # written for a.jpg or c.jpg?
    ]
    path = _coco(tmp_path, annotations=anns, images=images)
    with pytest.raises(BadSampleError) as e:
        load_coco_captions(path, root)
    msg = str(e.value)
    assert e.value.reason == "duplicate_id" and e.value.sample_id == "coco:1"
    assert str(path) in msg and "image id 1 is used by both images[0] and images[2]" in msg
    for per_caption in (False, True):
        store = load_coco_captions(
            path, root, on_bad_sample="skip", one_sample_per_caption=per_caption
        )
        assert [s.image_paths for s in store] == [(_abs(root, "b.jpg"),)] * len(store)
        assert [s.references for s in store] == [("A cat.",)] * len(store) and len(store) == 1
        assert store.skipped == {"duplicate_id": 4}  # two image entries and their two captions


def test_coco_duplicate_annotation_id_keeps_one_sample_per_id(tmp_path, root):
    images = [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg"}]
    anns = [
        {"image_id": 1, "id": 10, "caption": "A dog."},
        {"image_id": 2, "id": 20, "caption": "A cat."},
        {"image_id": 1, "id": 10, "caption": "A brown dog."},
    ]
    path = _coco(tmp_path, annotations=anns, images=images)
    with pytest.raises(BadSampleError) as e:
        load_coco_captions(path, root)
    msg = str(e.value)
    assert e.value.reason == "duplicate_id" and e.value.sample_id == "coco:1:10"
    assert "annotation id 10 is used by both annotations[0] and annotations[2]" in msg
    store = load_coco_captions(path, root, on_bad_sample="skip", one_sample_per_caption=True)
    assert [s.sample_id for s in store] == ["coco:1:10", "coco:2:20"]
    assert store[0].references == ("A dog.",) and store.skipped == {"duplicate_id": 1}


def test_karpathy_duplicate_image_and_sentence_ids(tmp_path, root):
    def image(cocoid, filename, *sentids):
        sentences = [{"raw": f"Caption {s}.", "sentid": s} for s in sentids]
        return {"split": "train", "filepath": "", "filename": filename, "cocoid": cocoid,
                "sentences": sentences}  # fmt: skip

    images = [
        image(1, "a.jpg", 100, 101),
        image(1, "b.jpg", 102),  # the image id again
        image(2, "c.jpg", 101),  # a sentid of another image
        image(3, "sub/d.jpg", 300, 300),  # a sentid twice in one image
        image(4, "train2014/t1.jpg", 400),
    ]
    cases = {
        1: "image id 1 is used by both images[0] and images[1]",
        2: "sentid 101 is used by both images[0].sentences[1] and images[2].sentences[0]",
        3: "sentid 300 is used by both images[3].sentences[0] and images[3].sentences[1]",
    }
    for bad, needle in cases.items():
        path = _write_json(tmp_path / f"karpathy{bad}.json", {"images": [images[0], images[bad]]})
        with pytest.raises(BadSampleError) as e:
            load_karpathy(path, root, "train")
        assert e.value.reason == "duplicate_id" and str(path) in str(e.value)
        assert needle.replace(f"images[{bad}]", "images[1]") in str(e.value)
    path = _write_json(tmp_path / "karpathy.json", {"images": images})
    store = load_karpathy(path, root, "train", on_bad_sample="skip", one_sample_per_caption=True)
    assert [s.sample_id for s in store] == ["coco:1:100", "coco:1:101", "coco:4:400"]
    assert store.skipped == {"duplicate_id": 3}
    assert len({s.sample_id for s in store}) == len(store)


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
        _write_json(path, records)
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
    assert store[0].image_paths == (_abs(root, "a.jpg"),)
    assert store.skipped == {"duplicate_id": 2}
