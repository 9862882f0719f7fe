"""Streamed shards (LitData): sharding checks like the readers, bad items are counted like
map-style data, every sample is read once per epoch over ranks and workers, mixtures follow
their weights, and shards never unpickle. (Exact mid-epoch resume: ``test_resume.py``.)"""

from __future__ import annotations

import json
import os
import socket
from collections import Counter
from pathlib import Path

import pytest
import torch

pytest.importorskip("litdata", reason="streamed shards need litdata (not on every GPU image)")

from corrupt_corpus import CORPUS_NAME, write_corrupt_corpus
from micro import MICRO_MODEL
from test_bad_data import DATA_CONFIG, MAX_LENGTH, CountTrained, _trainer

from lit_mllm.data.cli import main as data_cli
from lit_mllm.data.conversation import ConversationTokenizer
from lit_mllm.data.datamodule import MLLMDataModule
from lit_mllm.data.dataset import SampleProcessor
from lit_mllm.data.readers import BadSampleError
from lit_mllm.data.records import Sample
from lit_mllm.data.streaming.dataset import (
    StreamedSamples,
    StreamLoader,
    build_streams,
    left_out_for_equal_ranks,
)
from lit_mllm.data.streaming.record import to_item
from lit_mllm.data.streaming.shard import MANIFEST, shard_source
from lit_mllm.data.streaming.source import StreamSource
from lit_mllm.data.synthetic import generate_synthetic_dataset
from lit_mllm.data.tokenizer import load_tokenizer
from lit_mllm.data.transforms import build_image_transform
from lit_mllm.module import MLLMModule


class SampleIds:
    """A processor that only names the sample (picklable, for workers and spawned ranks)."""

    def __call__(self, sample: Sample, source: str) -> dict:
        return {"sample_id": sample.sample_id}


def ids_of(items: list[dict]) -> list[str]:
    return [item["sample_id"] for item in items]


def _write_items(out: Path, items: list[dict], chunk_bytes: str = "64KB") -> Path:
    """Chunks holding exactly these items, written without the shard command's checks."""
    from litdata import optimize

    optimize(
        fn=_item_at,
        inputs=[json.dumps(item, default=_bytes_hex) for item in items],
        output_dir=str(out),
        chunk_bytes=chunk_bytes,
        num_workers=1,
        verbose=False,
    )
    return out


def _bytes_hex(value: bytes) -> dict:
    return {"hex": value.hex()}


def _item_at(text: str) -> dict:
    item = json.loads(text)
    if isinstance(item.get("images"), dict):
        item["images"] = bytes.fromhex(item["images"]["hex"])
    return item


def _caption_item(sample_id: str, caption: str = "a red circle") -> dict:
    return to_item(Sample(sample_id, (), ()), [], [], caption)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synthetic")
    generate_synthetic_dataset(out, 12, 4, 0, seed=0, image_size=32, workers=0)
    return out


@pytest.fixture(scope="module")
def processor() -> SampleProcessor:
    tokenize = ConversationTokenizer(load_tokenizer("tiny"), num_image_tokens=4, max_length=256)
    transform = build_image_transform(DATA_CONFIG, train=False)
    return SampleProcessor(tokenize, transform, on_bad_sample="skip")


# -- sharding -------------------------------------------------------------------------------------
def test_shard_keeps_the_files_as_stored_and_refuses_to_overwrite(synthetic, tmp_path) -> None:
    out = tmp_path / "shards"
    captions = str(synthetic / "captions_val.json")
    summary = shard_source("coco", captions, str(synthetic / "images/val"), out, workers=2,
                           one_sample_per_caption=False)  # fmt: skip
    assert summary.samples == 4 and summary.skipped == {} and summary.chunks >= 1
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["samples"] == 4 and manifest["source"]["kind"] == "coco"
    dataset = StreamedSamples(str(out), lambda sample, source: sample, caption_prompt="Describe.",
                              on_bad_sample="error", shuffle=False, seed=0)  # fmt: skip
    samples = [dataset[i] for i in range(len(dataset))]
    for sample in samples:  # the bytes of the file, the caption with the prompt of the run
        name = Path(sample.image_paths[0]).name
        assert sample.image_bytes[0] == (synthetic / "images/val" / name).read_bytes()
        assert sample.conversation[0]["content"].endswith("Describe.")
        assert (
            len(sample.references) == 5 and sample.conversation[1]["content"] in sample.references
        )
    with pytest.raises(ValueError, match="not empty; choose a new folder or pass --overwrite"):
        shard_source("coco", captions, str(synthetic / "images/val"), out)


def test_shard_command_synthetic(tmp_path, capsys) -> None:
    out = tmp_path / "synthetic"
    assert data_cli(["shard", "--source", "synthetic", "--count", "30", "--out", str(out),
                     "--workers", "1"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "sharded 30 samples" in printed and f"dir: {out}" in printed
    dataset = StreamedSamples(str(out), SampleIds(), caption_prompt="x", on_bad_sample="error",
                              shuffle=False, seed=0)  # fmt: skip
    assert sorted(dataset[i]["sample_id"] for i in range(30)) == [
        f"train-{i:07d}" for i in range(1, 31)
    ]
    assert data_cli(["shard", "--source", "coco", "--out", str(tmp_path / "x")]) == 2


# -- bad data -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def corpus(synthetic, tmp_path_factory) -> tuple[Path, dict]:
    """test_bad_data.py's corpus with known faults (and its ground truth)."""
    out = tmp_path_factory.mktemp("corrupt") / "corpus"
    return out, write_corrupt_corpus(synthetic, out, seed=3)


def test_a_corrupt_corpus_is_counted_exactly_as_map_style(corpus, tmp_path) -> None:
    """The corpus of test_bad_data.py, sharded and then trained on from the stream: every fault
    is counted once under the same reason (image faults now at shard time), every good sample
    trained on."""
    corpus_dir, truth = corpus
    shards = tmp_path / "shards"
    summary = shard_source("llava", str(corpus_dir / CORPUS_NAME), str(corpus_dir / "images"),
                           shards, on_bad_sample="skip", workers=2)  # fmt: skip
    with pytest.raises(ValueError, match=CORPUS_NAME):
        shard_source("llava", str(corpus_dir / CORPUS_NAME), str(corpus_dir / "images"),
                     tmp_path / "strict")  # fmt: skip

    torch.manual_seed(0)
    module = MLLMModule(**MICRO_MODEL)
    datamodule = MLLMDataModule(
        **module.data_settings(),
        train=StreamSource(str(shards)),
        batch_size=8,
        num_workers=0,
        max_length=MAX_LENGTH,
        on_bad_sample="skip",
    )
    counter = CountTrained()
    _trainer(tmp_path, [counter]).fit(module, datamodule)
    report = json.loads((tmp_path / "skipped_train.json").read_text())
    expected = Counter(truth["expected_skipped_at_load"]) + Counter(truth["expected_skipped_train"])
    assert Counter(summary.skipped) + Counter(report["skipped_samples"]) == expected
    assert report["skipped_at_load"] == summary.skipped  # from the shards' manifest
    assert counter.total == truth["good"] and sorted(counter.ids) == sorted(truth["good_ids"])


def test_bad_items_inside_chunks_are_counted_under_the_readers_reasons(
    tmp_path, synthetic, processor
) -> None:
    image = (synthetic / "images/train/000001.png").read_bytes()
    good = Sample("good", ("a.png",), ({"from": "human", "value": "<image>\nHi"},
                                       {"from": "gpt", "value": "a shape"}))  # fmt: skip
    items = [
        to_item(good, ["a.png"], [image], None),
        to_item(Sample("broken", ("b.png",), good.conversation), ["b.png"], [b"\x89PNG junk"], None),
        {"meta": "{not json", "images": b""},
        {**to_item(good, ["a.png"], [image], None), "images": image[:-10]},  # sizes disagree
        {"meta": json.dumps({**json.loads(to_item(good, [], [], None)["meta"]),
                             "conversations": [{"from": "human"}]}), "images": b""},
    ]  # fmt: skip
    shards = _write_items(tmp_path / "bad", items)
    skipping = StreamedSamples(str(shards), processor, caption_prompt="x", on_bad_sample="skip",
                               shuffle=False, seed=0)  # fmt: skip
    got = [skipping[i] for i in range(len(items))]
    assert "input_ids" in got[0]
    assert [item.get("skipped") for item in got[1:]] == [
        "undecodable_image",  # as transforms.load_rgb_image counts a broken file
        "malformed_json",  # as the LLaVA reader counts a JSONL line that does not parse
        "bad_value",
        "missing_key",  # as the LLaVA reader counts a turn without 'value'
    ]
    strict = StreamedSamples(str(shards), processor.__class__(processor.tokenize,
                             processor.transform), caption_prompt="x", on_bad_sample="error",
                             shuffle=False, seed=0)  # fmt: skip
    with pytest.raises(ValueError, match=r"broken.*bad"):  # names the sample and the stream
        strict[1]
    with pytest.raises(BadSampleError, match=r"item 2.*not valid JSON"):
        strict[2]


def test_a_chunk_asking_to_unpickle_is_refused(tmp_path) -> None:
    from litdata import optimize

    optimize(fn=_pickled, inputs=[0, 1], output_dir=str(tmp_path / "p"), chunk_bytes="64KB",
             num_workers=1, verbose=False)  # fmt: skip
    dataset = StreamedSamples(str(tmp_path / "p"), SampleIds(), caption_prompt="x",
                              on_bad_sample="skip", shuffle=False, seed=0)  # fmt: skip
    with pytest.raises(ValueError, match="unpickling data runs code: refused"):
        dataset[0]


def _pickled(index: int) -> dict:
    return {"meta": "{}", "images": frozenset({index})}  # not str/bytes: LitData pickles it


def test_a_folder_that_is_not_a_shard_folder_is_named(tmp_path, processor) -> None:
    with pytest.raises(FileNotFoundError, match=r"no index.json.*lit-mllm-data shard"):
        build_streams([StreamSource(str(tmp_path))], processor, caption_prompt="x",
                      on_bad_sample="skip", train=True, seed=0)  # fmt: skip


# -- order, splits, mixtures ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def hundred_and_three(tmp_path_factory) -> Path:
    """103 items in 13 chunks: sizes that divide by no world size or batch."""
    out = tmp_path_factory.mktemp("s103") / "shards"
    return _write_items(out, [_caption_item(f"s{i:03d}") for i in range(103)], chunk_bytes="2KB")


def _read_epoch(folder: str, train: bool, workers: int) -> tuple[list[str], int]:
    dataset = build_streams([StreamSource(folder)], SampleIds(), caption_prompt="x",
                            on_bad_sample="error", train=train, seed=0)  # fmt: skip
    loader = StreamLoader(dataset, batch_size=4, num_workers=workers, collate_fn=ids_of)
    return [i for batch in loader for i in batch], left_out_for_equal_ranks(
        dataset, [StreamSource(folder)]
    )


def _rank(rank: int, world: int, port: int, folder: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        seen = {}
        for workers in (0, 2):
            for train in (False, True):
                seen[f"{workers}-{train}"] = _read_epoch(folder, train, workers)
        Path(f"{out}.{rank}").write_text(json.dumps(seen))
    finally:
        torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("world", [1, 2, 4])
def test_every_sample_once_per_epoch_over_ranks_and_workers(hundred_and_three, tmp_path, world):
    """Evaluation streams: every sample exactly once. Training streams: none twice; with several
    ranks LitData gives each the same number and leaves out (and we count) the rest."""
    out = str(tmp_path / "seen")
    if world == 1:
        alone = {f"{w}-{t}": list(_read_epoch(str(hundred_and_three), t, w))
                 for w in (0, 2) for t in (False, True)}  # fmt: skip
        per_rank = [alone]
    else:
        torch.multiprocessing.spawn(_rank, args=(world, _free_port(), str(hundred_and_three), out),
                                    nprocs=world)  # fmt: skip
        per_rank = [json.loads(Path(f"{out}.{r}").read_text()) for r in range(world)]
    everything = sorted(f"s{i:03d}" for i in range(103))
    for workers in (0, 2):
        for train in (False, True):
            key = f"{workers}-{train}"
            seen = [i for rank in per_rank for i in rank[key][0]]
            left_out = per_rank[0][key][1] if train else 0
            why = f"world {world}, workers {workers}, {'train' if train else 'eval'}"
            assert len(seen) == len(set(seen)), f"{why}: a sample was read twice"
            assert set(seen) <= set(everything) and len(seen) + left_out == 103, why
            if not train or world == 1:
                assert sorted(seen) == everything, why
            else:  # equal shares, fewer left out than one batch per rank
                assert len({len(rank[key][0]) for rank in per_rank}) == 1, why
                assert 0 <= left_out < 4 * world, why


def test_training_order_is_shuffled_per_epoch_and_seeded(hundred_and_three) -> None:
    first, _ = _read_epoch(str(hundred_and_three), True, 0)
    again, _ = _read_epoch(str(hundred_and_three), True, 0)
    in_order, _ = _read_epoch(str(hundred_and_three), False, 0)
    assert first == again and first != in_order and sorted(first) == in_order


def test_mixture_follows_its_weights(tmp_path) -> None:
    """20,000 samples from three streams weighted 5:3:2: a chi-square test of the counts."""
    weights = [5.0, 3.0, 2.0]
    streams = []
    for k, weight in enumerate(weights):
        folder = tmp_path / f"stream{k}"
        size = int(20_000 * weight / sum(weights) * 1.3)  # none runs out first
        _write_items(folder, [_caption_item(f"{k}-{i}") for i in range(size)], "256KB")
        streams.append(StreamSource(str(folder), weight=weight))
    dataset = build_streams(streams, SampleIds(), caption_prompt="x", on_bad_sample="error",
                            train=True, seed=0)  # fmt: skip
    loader = StreamLoader(dataset, batch_size=500, num_workers=0, collate_fn=ids_of)
    counts: Counter[str] = Counter()
    for batch in loader:
        counts.update(i.split("-")[0] for i in batch)
        if counts.total() >= 20_000:
            break
    total = counts.total()
    expected = [total * w / sum(weights) for w in weights]
    chi2 = sum((counts[str(k)] - e) ** 2 / e for k, e in enumerate(expected))
    assert chi2 < 13.82, f"chi-square {chi2:.2f} >= 13.82 (p < 0.001, 2 dof): {dict(counts)}"


def test_datamodule_streams_with_packing_and_refuses_val_limit(tmp_path, synthetic) -> None:
    shards = tmp_path / "train"
    shard_source("coco", str(synthetic / "captions_train.json"), str(synthetic / "images/train"),
                 shards, workers=1)  # fmt: skip
    module = MLLMModule(**MICRO_MODEL)
    datamodule = MLLMDataModule(
        **module.data_settings(),
        train=StreamSource(str(shards)),
        val=StreamSource(str(shards)),
        batch_size=6,
        num_workers=0,
        packing=True,
    )
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    assert batch["input_ids"].shape[0] == 1 and batch["batch_size"] == 6  # one packed row
    assert batch["pixel_values"].shape[0] == 6
    limited = MLLMDataModule(**module.data_settings(), val=StreamSource(str(shards)), val_limit=3)
    with pytest.raises(ValueError, match="trainer.limit_val_batches"):
        limited.setup("validate")


def test_sliced_images_stream_like_files(tmp_path, synthetic) -> None:
    """Dynamic resolution on streamed data: the same views and tokens as from the files."""
    from test_sliced_images import sliced_module

    from lit_mllm.data.datamodule import SplitSource

    shards = tmp_path / "train"
    captions, images = str(synthetic / "captions_val.json"), str(synthetic / "images/val")
    shard_source("coco", captions, images, shards, one_sample_per_caption=False, workers=1)
    module = sliced_module("resampler")
    batches = []
    for train in (StreamSource(str(shards)), SplitSource("coco", captions, images)):
        datamodule = MLLMDataModule(**module.data_settings(), train=train, batch_size=4,
                                    num_workers=0, one_sample_per_caption=False)  # fmt: skip
        datamodule.setup("fit")
        batch = next(iter(datamodule.train_dataloader()))
        order = sorted(range(4), key=lambda i: batch["sample_id"][i])
        batches.append((batch, order))
    (streamed, s_order), (from_files, f_order) = batches
    assert [streamed["sample_id"][i] for i in s_order] == [
        from_files["sample_id"][i] for i in f_order
    ]

    def view_sizes(batch: dict) -> list[tuple[int, ...]]:
        return sorted(tuple(group.shape) for group in batch["pixel_values"].groups)

    assert view_sizes(streamed) == view_sizes(from_files)
    assert sorted(map(len, streamed["input_ids"])) == sorted(map(len, from_files["input_ids"]))
    assert module.training_step(streamed, 0) is not None
