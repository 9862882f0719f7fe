"""The Karpathy split reader (lit_mllm/data/readers/karpathy.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from reader_files import image_root, karpathy_file, real, write_json

from lit_mllm.data.readers import BadSampleError, load_karpathy


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return image_root(tmp_path)


def test_karpathy_splits_and_restval(tmp_path, root):
    path = karpathy_file(tmp_path)
    train = load_karpathy(path, root, "train")
    assert [s.image_id for s in train] == [1, 2, 5]
    assert train[1].image_paths == (real(root, "val2014/v1.jpg"),)
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
    path = write_json(
        tmp_path / "dataset_flickr30k.json", {"images": images, "dataset": "flickr30k"}
    )
    with pytest.raises(BadSampleError) as e:
        load_karpathy(path, root, "test")
    assert "images[1] (id 'flickr30k:1')" in str(e.value) and "'raw'" in str(e.value)
    store = load_karpathy(path, root, "test", on_bad_sample="skip")
    assert [(s.sample_id, s.image_id) for s in store] == [("flickr30k:0", 0)]
    assert store.skipped == {"missing_key": 1, "missing_image": 1, "no_captions": 1, "bad_value": 1}


# --------------------------------------------------------------------------------------------
# Duplicate ids (#15.10): counted as duplicate_id or named with both positions; never merged


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
        path = write_json(tmp_path / f"karpathy{bad}.json", {"images": [images[0], images[bad]]})
        with pytest.raises(BadSampleError) as e:
            load_karpathy(path, root, "train")
        assert e.value.reason == "duplicate_id" and str(path) in str(e.value)
        assert needle.replace(f"images[{bad}]", "images[1]") in str(e.value)
    path = write_json(tmp_path / "karpathy.json", {"images": images})
    store = load_karpathy(path, root, "train", on_bad_sample="skip", one_sample_per_caption=True)
    assert [s.sample_id for s in store] == ["coco:1:100", "coco:1:101", "coco:4:400"]
    assert store.skipped == {"duplicate_id": 3}
    assert len({s.sample_id for s in store}) == len(store)
