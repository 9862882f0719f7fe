"""The sample store (lit_mllm/data/records.py): compact, picklable, saved and loaded whole."""

from __future__ import annotations

import pickle
import tracemalloc

import numpy as np
import pytest

from lit_mllm.data.records import Sample, SampleStore, StoreBuilder


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


def test_store_sizes_count_text_and_images_without_decoding_images():
    builder = StoreBuilder("/data/images", source="mem", prompt="Describe.")
    group = builder.add_references(["a red square", "one red square at the top"])
    builder.add("cap0", ["a.png"], 0, group=group)
    builder.add("cap1", ["a.png"], 1, group=group)
    llava = [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A cat."}]
    builder.add("llava", ["b.png", "c.png"], llava)
    parts = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]},
        {"role": "assistant", "content": "Hello!"},
    ]
    builder.add("parts", [], parts)
    chars, images = builder.build().sizes()
    assert chars.tolist() == [
        len("Describe.") + len("a red square"),
        len("Describe.") + len("one red square at the top"),
        len("<image>\nWhat?") + len("A cat."),
        len("Hi") + len("Hello!"),
    ]
    assert images.tolist() == [1, 1, 2, 0]
