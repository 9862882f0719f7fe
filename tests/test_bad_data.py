"""Bad data is counted, never lost: a corpus with known injected faults, trained on end to end.

The corpus comes from ``corrupt_corpus.py`` (a fixture beside this file); ``faults.json`` is
its ground truth. With ``on_bad_sample: skip`` every fault must be counted exactly once under
its reason and every good sample trained on; with ``error`` the first fault stops the run with an
error naming the file, the sample and the reason.
"""

from __future__ import annotations

import json
import re
import resource
import shutil
import struct
import subprocess
import sys
import warnings
import zlib
from collections import Counter
from pathlib import Path

import lightning as L
import pytest
import torch
from corrupt_corpus import CORPUS_NAME, FAULT_KINDS, write_corrupt_corpus
from micro import MICRO_MODEL

from lit_mllm.data.conversation import ConversationTokenizer
from lit_mllm.data.datamodule import MLLMDataModule, SplitSource
from lit_mllm.data.dataset import MLLMDataset, SampleProcessor
from lit_mllm.data.readers import BadSampleError, MissingImageError, load_llava
from lit_mllm.data.sampler import ResumableSampler
from lit_mllm.data.synthetic import generate_synthetic_dataset
from lit_mllm.data.tokenizer import load_tokenizer
from lit_mllm.data.transforms import BadImageError, build_image_transform, load_rgb_image
from lit_mllm.data.turns import ConversationError
from lit_mllm.module import MLLMModule

MICRO = MICRO_MODEL
MAX_LENGTH = 256
DATA_CONFIG = {
    "input_size": (3, 32, 32),
    "interpolation": "bicubic",
    "mean": (0.5, 0.5, 0.5),
    "std": (0.5, 0.5, 0.5),
    "crop_pct": 1.0,
}
LOAD_KINDS = [k for k, v in FAULT_KINDS.items() if v.stage == "load"]
TRAIN_KINDS = [k for k, v in FAULT_KINDS.items() if v.stage == "train"]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synthetic")
    generate_synthetic_dataset(out, 12, 2, 0, seed=0, image_size=32, workers=0)
    return out


@pytest.fixture(scope="module")
def corpus(synthetic, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("corrupt") / "corpus"
    truth = write_corrupt_corpus(synthetic, out, seed=3)
    return out, truth


@pytest.fixture(scope="module")
def conversation_tokenizer() -> ConversationTokenizer:
    return ConversationTokenizer(load_tokenizer("tiny"), num_image_tokens=4, max_length=MAX_LENGTH)


def _datamodule(corpus_dir: Path, on_bad_sample: str, module: MLLMModule) -> MLLMDataModule:
    return MLLMDataModule(
        **module.data_settings(),
        train=SplitSource("llava", str(corpus_dir / CORPUS_NAME), str(corpus_dir / "images")),
        batch_size=8,
        num_workers=0,
        max_length=MAX_LENGTH,
        on_bad_sample=on_bad_sample,
        seed=0,
    )


def _trainer(root: Path, callbacks: list) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        enable_checkpointing=any(isinstance(c, L.pytorch.callbacks.Checkpoint) for c in callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        default_root_dir=root,
        callbacks=callbacks,
    )


class CountTrained(L.Callback):
    """Counts the samples each training batch really carried."""

    def __init__(self) -> None:
        self.total = 0
        self.ids: list[str] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.total += batch["batch_size"]
        self.ids += batch.get("sample_id", [])


# -- the whole corpus, end to end -----------------------------------------------------------------
def test_ground_truth_covers_every_fault_kind(corpus) -> None:
    corpus_dir, truth = corpus
    assert set(truth["faults"]) == set(FAULT_KINDS)
    lines = (corpus_dir / CORPUS_NAME).read_text().splitlines()
    assert len(lines) == truth["num_records"] == truth["good"] + sum(truth["faults"].values())
    by_kind = Counter(r["kind"] for r in truth["records"] if r["stage"] != "good")
    assert by_kind == truth["faults"]
    expected = Counter()
    for kind, count in truth["faults"].items():
        expected[FAULT_KINDS[kind].reason] += count
    assert expected == Counter(truth["expected_skipped_at_load"]) + Counter(
        truth["expected_skipped_train"]
    )


def test_fit_with_skip_counts_each_fault_exactly_and_trains_every_good_sample(
    corpus, tmp_path
) -> None:
    corpus_dir, truth = corpus
    torch.manual_seed(0)
    module = MLLMModule(**MICRO)
    datamodule = _datamodule(corpus_dir, "skip", module)
    counter = CountTrained()
    trainer = _trainer(tmp_path, [counter])
    trainer.fit(module, datamodule)

    assert trainer.global_step > 0
    assert dict(datamodule.skipped_at_load["train"]) == truth["expected_skipped_at_load"]
    report = json.loads((tmp_path / "skipped_train.json").read_text())
    assert report["skipped_samples"] == truth["expected_skipped_train"]
    assert report["skipped_at_load"] == truth["expected_skipped_at_load"]
    assert counter.total == truth["good"]
    assert sorted(counter.ids) == truth["good_ids"]  # each good sample once, none of the bad


def test_fit_with_error_stops_at_the_first_fault_found_while_loading(corpus, tmp_path) -> None:
    corpus_dir, truth = corpus
    first = next(r for r in truth["records"] if r["stage"] == "load")
    module = MLLMModule(**MICRO)
    with pytest.raises((BadSampleError, MissingImageError)) as info:
        _trainer(tmp_path, []).fit(module, _datamodule(corpus_dir, "error", module))
    message = str(info.value)
    assert info.value.reason == first["reason"]
    assert str(corpus_dir / CORPUS_NAME) in message
    assert (first["id"] or f"line {first['line']}") in message


def test_fit_with_error_stops_at_the_first_fault_met_in_training(synthetic, tmp_path) -> None:
    corpus_dir = tmp_path / "corpus"
    truth = write_corrupt_corpus(synthetic, corpus_dir, seed=1, kinds=TRAIN_KINDS)
    module = MLLMModule(**MICRO)
    datamodule = _datamodule(corpus_dir, "error", module)
    with pytest.raises((ConversationError, BadImageError)) as info:
        _trainer(tmp_path, []).fit(module, datamodule)
    # the first fault in the training order (a reply truncated away is one too)
    store = datamodule.datasets["train"].samples
    order = ResumableSampler(len(store), seed=datamodule.seed).global_order(0)
    record = {r["id"]: r for r in truth["records"]}
    first = next(
        record[store[i].sample_id] for i in order if record[store[i].sample_id]["stage"] == "train"
    )
    message = str(info.value)
    assert info.value.reason == first["reason"]
    assert first["id"] in message and str(corpus_dir / CORPUS_NAME) in message


# -- one fault kind at a time ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def single_kind_corpora(synthetic, tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    root = tmp_path_factory.mktemp("single")
    return {
        kind: (root / kind, write_corrupt_corpus(synthetic, root / kind, seed=7, kinds=[kind]))
        for kind in FAULT_KINDS
    }


@pytest.mark.parametrize("kind", LOAD_KINDS)
def test_fault_found_while_loading(single_kind_corpora, kind) -> None:
    corpus_dir, truth = single_kind_corpora[kind]
    path, root = corpus_dir / CORPUS_NAME, corpus_dir / "images"
    reason, count = FAULT_KINDS[kind].reason, truth["faults"][kind]
    store = load_llava(path, root, on_bad_sample="skip")
    assert store.skipped == {reason: count}
    assert sorted(s.sample_id for s in store) == truth["good_ids"]

    first = next(r for r in truth["records"] if r["kind"] == kind)
    with pytest.raises(ValueError if reason != "missing_image" else FileNotFoundError) as info:
        load_llava(path, root, on_bad_sample="error")
    assert info.value.reason == reason
    assert str(path) in str(info.value)
    assert (first["id"] or f"line {first['line']}") in str(info.value)


@pytest.mark.parametrize("kind", TRAIN_KINDS)
def test_fault_found_when_building_the_sample(
    single_kind_corpora, conversation_tokenizer, kind
) -> None:
    corpus_dir, truth = single_kind_corpora[kind]
    reason, count = FAULT_KINDS[kind].reason, truth["faults"][kind]
    store = load_llava(corpus_dir / CORPUS_NAME, corpus_dir / "images", on_bad_sample="skip")
    assert store.skipped == {}  # nothing wrong with the record itself
    transform = build_image_transform(DATA_CONFIG)
    skipping = MLLMDataset(
        store, SampleProcessor(conversation_tokenizer, transform, on_bad_sample="skip")
    )
    items = [skipping[i] for i in range(len(store))]
    assert Counter(item["skipped"] for item in items if "skipped" in item) == {reason: count}
    assert sorted(i["sample_id"] for i in items if "skipped" not in i) == truth["good_ids"]

    strict = MLLMDataset(
        store, SampleProcessor(conversation_tokenizer, transform, on_bad_sample="error")
    )
    bad = [i for i in range(len(store)) if store[i].sample_id.startswith(f"{kind}-")]
    assert len(bad) == count
    with pytest.raises((ConversationError, BadImageError)) as info:
        strict[bad[0]]
    assert info.value.reason == reason
    assert store[bad[0]].sample_id in str(info.value)
    assert str(corpus_dir / CORPUS_NAME) in str(info.value)


@pytest.mark.parametrize("check_images", [True, False])
def test_image_paths_outside_the_root_are_always_refused(corpus, check_images) -> None:
    corpus_dir, truth = corpus
    escapes = sum(n for k, n in truth["faults"].items() if FAULT_KINDS[k].reason == "path_escape")
    store = load_llava(
        corpus_dir / CORPUS_NAME,
        corpus_dir / "images",
        on_bad_sample="skip",
        check_images=check_images,
    )
    assert store.skipped["path_escape"] == escapes
    outside = str((corpus_dir / "outside").resolve())
    for sample in store:
        for image in sample.image_paths:
            real = str(Path(image).resolve())
            assert real.startswith(str((corpus_dir / "images").resolve())), sample.sample_id
            assert not real.startswith(outside) and not real.startswith("/etc")


def test_unusual_but_valid_images_are_converted_to_rgb(corpus) -> None:
    corpus_dir, _ = corpus
    good = corpus_dir / "images" / "good"
    reference = load_rgb_image(str(good / "gray.png"))
    for name in ("gray.png", "gray16.png", "rgba.png", "palette_alpha.png", "cmyk.jpg"):
        image = load_rgb_image(str(good / name))
        assert image.mode == "RGB" and image.size == reference.size, name
    assert load_rgb_image(str(good / "link_to_gray.png")).tobytes() == reference.tobytes()


def test_the_corpus_is_seeded_and_never_written_over(synthetic, tmp_path) -> None:
    out = tmp_path / "one"
    summary = write_corrupt_corpus(synthetic, out, seed=3)
    truth = json.loads((out / "faults.json").read_text())
    assert truth["faults"] == write_corrupt_corpus(synthetic, tmp_path / "two", seed=3)["faults"]
    assert truth == json.loads(json.dumps(summary))
    assert (out / CORPUS_NAME).read_bytes() == (tmp_path / "two" / CORPUS_NAME).read_bytes()
    with pytest.raises(ValueError, match="is not empty"):
        write_corrupt_corpus(synthetic, out, seed=3)


def test_skip_counts_stay_per_stage_when_validating(corpus, synthetic, tmp_path) -> None:
    corpus_dir, truth = corpus
    module = MLLMModule(**MICRO, metrics=["BLEU"], generation={"max_new_tokens": 2})
    datamodule = _datamodule(corpus_dir, "skip", module)
    val = SplitSource("coco", str(synthetic / "captions_val.json"), str(synthetic / "images/val"))
    datamodule.sources["val"] = val
    trainer = _trainer(tmp_path, [])
    trainer.limit_val_batches = 1
    trainer.fit(module, datamodule)
    report = json.loads((tmp_path / "skipped_train.json").read_text())
    assert report["skipped_samples"] == truth["expected_skipped_train"]
    assert report["skipped_at_load"] == truth["expected_skipped_at_load"]
    # the val file is clean: its report must not carry the train file's load-time faults (#15.8)
    assert not (tmp_path / "skipped_val.json").exists()
    assert datamodule.skipped_at_load["val"] == {}
    assert dict(datamodule.skipped_at_load["train"]) == truth["expected_skipped_at_load"]


@pytest.fixture(scope="module")
def stopped_and_resumed(corpus, tmp_path_factory) -> tuple[Path, CountTrained, CountTrained]:
    """Fit 2 steps into the epoch (a checkpoint per step), then resume from last.ckpt."""
    from lit_mllm.checkpoints import AtomicModelCheckpoint

    corpus_dir, _ = corpus
    root = tmp_path_factory.mktemp("resume_bad")
    runs = []
    for max_steps, ckpt_path in ((2, None), (-1, root / "ckpt" / "last.ckpt")):
        torch.manual_seed(0)
        counter = CountTrained()
        checkpoint = AtomicModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=1)
        trainer = _trainer(root, [counter, checkpoint])
        trainer.fit_loop.epoch_loop.max_steps = max_steps
        module = MLLMModule(**MICRO)
        trainer.fit(module, _datamodule(corpus_dir, "skip", module), ckpt_path=ckpt_path)
        runs.append(counter)
    return root, runs[0], runs[1]


def test_resumed_epoch_trains_every_good_sample_exactly_once(corpus, stopped_and_resumed) -> None:
    _, truth = corpus
    _, first, second = stopped_and_resumed
    assert first.ids and second.ids
    assert sorted(first.ids + second.ids) == truth["good_ids"]


def test_resumed_epoch_still_counts_every_fault(corpus, stopped_and_resumed) -> None:
    _, truth = corpus
    root, _, _ = stopped_and_resumed
    report = json.loads((root / "skipped_train.json").read_text())
    assert report["skipped_samples"] == truth["expected_skipped_train"]


# -- decompression bombs (#15.3) ------------------------------------------------------------------
def _bomb_png(path: Path, width: int, height: int) -> Path:
    """A 1-bit palette PNG of ``width`` x ``height`` zero pixels, written without decoding anything:
    rows are fed to zlib in slices, so memory stays at one slice."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed 1-bit pixels
    packer = zlib.compressobj(9)
    rows_per_slice = max(1, (1 << 21) // len(row))
    idat = []
    for start in range(0, height, rows_per_slice):
        idat.append(packer.compress(row * min(rows_per_slice, height - start)))
    idat.append(packer.flush())
    header = struct.pack(">IIBBBBB", width, height, 1, 3, 0, 0, 0)  # 1 bit, palette
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"PLTE", b"\x00\x00\x00")
    path.write_bytes(png + chunk(b"IDAT", b"".join(idat)) + chunk(b"IEND", b""))
    return path


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_decompression_bomb_is_refused_from_its_header(tmp_path) -> None:
    # 144 MP: over the default limit (PIL's ~89 MP) but under the 2x at which PIL itself raises,
    # so only the header check stands between this file and a 144 MB + 432 MB (RGB) decode
    bomb = _bomb_png(tmp_path / "bomb.png", 12000, 12000)
    assert bomb.stat().st_size < 100_000
    before = _peak_rss_mib()
    with pytest.raises(BadImageError) as info:
        load_rgb_image(str(bomb))
    assert info.value.reason == "image_too_large"
    assert "12000x12000" in str(info.value) and "data.max_image_pixels" in str(info.value)
    assert _peak_rss_mib() - before < 100  # refused from the header: nothing was decoded


def test_image_over_a_configured_limit_is_refused_under_pils_own(tmp_path) -> None:
    image = _bomb_png(tmp_path / "wide.png", 3000, 1000)  # 3 MP: PIL alone would decode it
    with pytest.raises(BadImageError, match=r"3000x1000 = 3,000,000 px is over") as info:
        load_rgb_image(str(image), max_pixels=2_000_000)
    assert info.value.reason == "image_too_large"
    assert load_rgb_image(str(image), max_pixels=3_000_000).size == (3000, 1000)


def test_pils_own_bomb_error_counts_under_the_same_reason(tmp_path) -> None:
    """A limit set above PIL's cannot switch its check off: PIL refuses > 2x its limit itself."""
    bomb = _bomb_png(tmp_path / "bomb.png", 20000, 20000)  # 400 MP in under 100 kB
    assert bomb.stat().st_size < 100_000
    before = _peak_rss_mib()
    with pytest.raises(BadImageError, match="PIL refused it as a decompression bomb") as info:
        load_rgb_image(str(bomb), max_pixels=10**9)
    assert info.value.reason == "image_too_large"
    assert _peak_rss_mib() - before < 100


def test_pils_bomb_warning_raised_as_an_error_is_counted_too(tmp_path) -> None:
    """Under ``-W error`` PIL's warning is an exception that is no OSError: still a bad image."""
    from PIL import Image

    image = _bomb_png(tmp_path / "big.png", 12000, 12000)  # between PIL's limit and twice it
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with pytest.raises(BadImageError, match="PIL refused it") as info:
            load_rgb_image(str(image), max_pixels=200_000_000)  # allowed by our own limit
    assert info.value.reason == "image_too_large"


def test_importing_the_data_side_leaves_pils_limit_alone() -> None:
    code = (
        "from PIL import Image; before = Image.MAX_IMAGE_PIXELS; "
        "import lit_mllm.data.datamodule, lit_mllm.data.transforms, lit_mllm.cli; "
        "print(before, Image.MAX_IMAGE_PIXELS)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    before, after = out.stdout.split()
    assert before == after


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_bomb_in_a_dataset_is_counted_or_named(tmp_path, synthetic, conversation_tokenizer) -> None:
    root = tmp_path / "images"
    root.mkdir()
    shutil.copyfile(next((synthetic / "images" / "train").glob("*.png")), root / "good.png")
    _bomb_png(root / "bomb.png", 12000, 12000)
    reply = [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "Shapes."}]
    records = [
        {"id": "ok", "image": "good.png", "conversations": reply},
        {"id": "bomb-1", "image": "bomb.png", "conversations": reply},
    ]
    path = tmp_path / "llava.json"
    path.write_text(json.dumps(records))
    store = load_llava(path, root)
    transform = build_image_transform(DATA_CONFIG)
    skipping = MLLMDataset(
        store, SampleProcessor(conversation_tokenizer, transform, on_bad_sample="skip")
    )
    assert "skipped" not in skipping[0]
    assert skipping[1] == {"skipped": "image_too_large", "sample_id": "bomb-1"}
    strict = MLLMDataset(
        store, SampleProcessor(conversation_tokenizer, transform, on_bad_sample="error")
    )
    with pytest.raises(BadImageError) as info:
        strict[1]
    message = str(info.value)
    assert info.value.reason == "image_too_large"
    assert str(root / "bomb.png") in message and "bomb-1" in message and str(path) in message
    assert "12000x12000" in message
    # the limit is a DataModule option and reaches the dataset
    small = MLLMDataset(
        store,
        SampleProcessor(
            conversation_tokenizer, transform, on_bad_sample="skip", max_image_pixels=100
        ),
    )
    assert small[0] == {"skipped": "image_too_large", "sample_id": "ok"}


# -- a sample whose replies are all truncated away (#15.4) ----------------------------------------
def test_reply_truncated_away_is_an_error_or_counted(
    tmp_path, synthetic, conversation_tokenizer
) -> None:
    root = tmp_path / "images"
    root.mkdir()
    shutil.copyfile(next((synthetic / "images" / "train").glob("*.png")), root / "a.png")
    question = "<image>\nRead this: " + " ".join(["circle"] * (MAX_LENGTH + 50))
    records = [
        {"id": "ok", "image": "a.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "Shapes."}]},
        {"id": "long-7", "image": "a.png", "conversations": [
            {"from": "human", "value": question}, {"from": "gpt", "value": "Shapes."}]},
    ]  # fmt: skip
    path = tmp_path / "llava.json"
    path.write_text(json.dumps(records))
    store = load_llava(path, root)
    transform = build_image_transform(DATA_CONFIG)
    skipping = MLLMDataset(
        store, SampleProcessor(conversation_tokenizer, transform, on_bad_sample="skip")
    )
    assert "skipped" not in skipping[0]
    assert skipping[1] == {"skipped": "no_supervised_tokens", "sample_id": "long-7"}
    strict = MLLMDataset(
        store, SampleProcessor(conversation_tokenizer, transform, on_bad_sample="error")
    )
    assert "skipped" not in strict[0]
    with pytest.raises(ConversationError) as info:
        strict[1]
    message = str(info.value)
    assert info.value.reason == "no_supervised_tokens"
    assert str(path) in message and "sample long-7" in message
    full = re.search(
        r"the sample is (\d+) tokens and its first reply starts at token (\d+)", message
    )
    assert full and int(full.group(1)) > int(full.group(2)) >= MAX_LENGTH
    assert f"max_length {MAX_LENGTH}" in message and "data.max_length" in message
