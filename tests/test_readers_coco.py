"""The COCO caption reader (lit_mllm/data/readers/coco.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from reader_files import PROMPT, coco_file, image_root, real, write_json

from lit_mllm.data.readers import BadSampleError, load_coco_captions
from lit_mllm.data.records import Sample


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return image_root(tmp_path)


def test_coco_one_sample_per_image(tmp_path, root):
    store = load_coco_captions(coco_file(tmp_path), root)
    assert len(store) == 2
    assert store.skipped == {"no_captions": 1}
    s = store[0]
    assert s == Sample(
        sample_id="coco:1",
        image_paths=(real(root, "a.jpg"),),
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
        coco_file(tmp_path), root, prompt="Caption:", one_sample_per_caption=True
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
    path = coco_file(tmp_path, annotations=anns)
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
    path = coco_file(tmp_path, annotations=anns[:1], images=images[:2])
    with pytest.raises(BadSampleError, match=r"images\[1\] \(id 'coco:1'\).*both images\[0\]"):
        load_coco_captions(path, root)
    path = coco_file(tmp_path, annotations=anns[:1] + anns[2:], images=images[:1] + images[3:])
    with pytest.raises(BadSampleError, match=r"images\[1\] \(id 'coco:3'\).*outside image_root"):
        load_coco_captions(path, root)
    path = coco_file(tmp_path, annotations=anns, images=images)
    store = load_coco_captions(path, root, on_bad_sample="skip")
    # image 2's entry is bad, so its annotation points at an unknown image; image id 1 is
    # ambiguous, so both its entries and its caption are left out
    expected = {"duplicate_id": 3, "bad_type": 1, "unknown_image": 1, "path_escape": 1}
    assert [s.sample_id for s in store] == [] and store.skipped == expected


def test_coco_not_a_caption_file(tmp_path, root):
    path = write_json(tmp_path / "x.json", {"images": []})
    with pytest.raises(ValueError, match=r"x\.json: not a COCO caption file"):
        load_coco_captions(path, root)


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
    path = coco_file(tmp_path, annotations=anns, images=images)
    with pytest.raises(BadSampleError) as e:
        load_coco_captions(path, root)
    msg = str(e.value)
    assert e.value.reason == "duplicate_id" and e.value.sample_id == "coco:1"
    assert str(path) in msg and "image id 1 is used by both images[0] and images[2]" in msg
    for per_caption in (False, True):
        store = load_coco_captions(
            path, root, on_bad_sample="skip", one_sample_per_caption=per_caption
        )
        assert [s.image_paths for s in store] == [(real(root, "b.jpg"),)] * len(store)
        assert [s.references for s in store] == [("A cat.",)] * len(store) and len(store) == 1
        assert store.skipped == {"duplicate_id": 4}  # two image entries and their two captions


def test_coco_duplicate_annotation_id_keeps_one_sample_per_id(tmp_path, root):
    images = [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg"}]
    anns = [
        {"image_id": 1, "id": 10, "caption": "A dog."},
        {"image_id": 2, "id": 20, "caption": "A cat."},
        {"image_id": 1, "id": 10, "caption": "A brown dog."},
    ]
    path = coco_file(tmp_path, annotations=anns, images=images)
    with pytest.raises(BadSampleError) as e:
        load_coco_captions(path, root)
    msg = str(e.value)
    assert e.value.reason == "duplicate_id" and e.value.sample_id == "coco:1:10"
    assert "annotation id 10 is used by both annotations[0] and annotations[2]" in msg
    store = load_coco_captions(path, root, on_bad_sample="skip", one_sample_per_caption=True)
    assert [s.sample_id for s in store] == ["coco:1:10", "coco:2:20"]
    assert store[0].references == ("A dog.",) and store.skipped == {"duplicate_id": 1}
