"""MLLMDataModule end to end on a small synthetic set: loaders, packing, bad images."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from lit_mllm.data.collate import padding_waste
from lit_mllm.data.datamodule import MLLMDataModule, SplitSource, SyntheticData
from lit_mllm.data.streaming.source import StreamSource
from lit_mllm.data.synthetic import generate_synthetic_dataset
from lit_mllm.data.tokenizer import load_tokenizer
from lit_mllm.models.vision import VisionEncoder
from lit_mllm.tokens import IGNORE_INDEX, IM_PATCH

IMAGE_CONFIG = VisionEncoder(
    model_kwargs={"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 1, "num_heads": 2}
).data_config


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synthetic")
    generate_synthetic_dataset(out, 96, 16, 0, seed=3, image_size=32, workers=1)
    return out


def make_datamodule(synthetic_dir: Path, **kwargs) -> MLLMDataModule:
    settings = {
        "synthetic": SyntheticData(dir=str(synthetic_dir), num_train=96, num_val=16, num_test=0),
        "tokenizer": "tiny",
        "num_image_tokens": 4,
        "image_data_config": IMAGE_CONFIG,
        "batch_size": 16,
        "num_workers": 0,
    }
    settings.update(kwargs)
    return MLLMDataModule(**settings)


def test_train_batches_have_images_masks_and_positions(synthetic_dir: Path) -> None:
    dm = make_datamodule(synthetic_dir)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["pixel_values"].shape == (16, 3, 32, 32)
    patch = load_tokenizer("tiny").convert_tokens_to_ids(IM_PATCH)
    assert torch.equal((batch["input_ids"] == patch).sum(1), torch.full((16,), 4))
    assert ((batch["labels"] != IGNORE_INDEX) & (batch["attention_mask"] == 0)).sum() == 0
    assert (batch["labels"] != IGNORE_INDEX).sum(1).min() > 0
    # one sample per caption in training: 96 images x 5 captions
    assert len(dm.datasets["train"]) == 96 * 5


def test_validation_keeps_all_references_and_prompts(synthetic_dir: Path) -> None:
    dm = make_datamodule(synthetic_dir)
    dm.setup("validate")
    batch = next(iter(dm.val_dataloader()))
    assert len(dm.datasets["val"]) == 16
    assert all(len(refs) == 5 for refs in batch["references"])
    assert batch["prompt_ids"].shape[0] == batch["pixel_values"].shape[0]
    # prompts are left-padded: the last column is real for every row
    assert batch["prompt_attention_mask"][:, -1].all()


def test_packing_removes_padding_on_the_instruction_set(synthetic_dir: Path) -> None:
    padded_dm = make_datamodule(
        synthetic_dir, synthetic=SyntheticData(dir=str(synthetic_dir), task="instruct")
    )
    packed_dm = make_datamodule(
        synthetic_dir,
        synthetic=SyntheticData(dir=str(synthetic_dir), task="instruct"),
        packing=True,
    )
    padded_dm.setup("fit")
    packed_dm.setup("fit")
    padded = list(padded_dm.train_dataloader())
    packed = list(packed_dm.train_dataloader())
    assert padding_waste(packed) < 3.0
    assert padding_waste(padded) > padding_waste(packed)
    assert sum(b["num_tokens"] for b in padded) == sum(b["num_tokens"] for b in packed)
    row = packed[0]
    assert row["input_ids"].shape[0] == 1 and row["attention_mask"] is None
    restarts = int((row["position_ids"][0] == 0).sum())
    assert restarts == row["batch_size"]


def test_length_grouping_cuts_padding_and_keeps_every_sample(synthetic_dir: Path) -> None:
    plain_dm = make_datamodule(synthetic_dir)
    grouped_dm = make_datamodule(synthetic_dir, length_grouping=6)
    plain_dm.setup("fit")
    grouped_dm.setup("fit")
    plain, grouped = list(plain_dm.train_dataloader()), list(grouped_dm.train_dataloader())
    assert padding_waste(grouped) < 0.6 * padding_waste(plain)
    ids = sorted(s for b in grouped for s in b["sample_id"])
    assert ids == sorted(s for b in plain for s in b["sample_id"]) and len(ids) == 96 * 5
    assert grouped_dm.train_sampler.state_dict()["group_batches"] == 6
    with pytest.raises(ValueError, match="data.length_grouping sorts a map-style training set"):
        MLLMDataModule(train=StreamSource("shards/train"), length_grouping=8)


def test_bad_images_are_skipped_and_counted(synthetic_dir: Path, tmp_path: Path) -> None:
    import json
    import shutil

    root = tmp_path / "images"
    shutil.copytree(synthetic_dir / "images" / "train", root)
    coco = json.loads((synthetic_dir / "captions_train.json").read_text())
    names = [image["file_name"] for image in coco["images"]]
    (root / names[0]).write_bytes(b"")  # zero bytes
    (root / names[1]).write_bytes((root / names[1]).read_bytes()[:40])  # truncated
    (root / names[2]).write_text("not an image")
    annotations = tmp_path / "captions.json"
    annotations.write_text(json.dumps(coco))
    source = SplitSource("coco", str(annotations), str(root))
    dm = make_datamodule(synthetic_dir, synthetic=None, train=source, on_bad_sample="skip")
    dm.setup("fit")
    skipped: dict[str, int] = {}
    seen = 0
    for batch in dm.train_dataloader():
        seen += batch["batch_size"]
        for reason, count in batch["skipped"].items():
            skipped[reason] = skipped.get(reason, 0) + count
    assert skipped == {"undecodable_image": 3 * 5}
    assert seen == (96 - 3) * 5

    strict = make_datamodule(synthetic_dir, synthetic=None, train=source, on_bad_sample="error")
    strict.setup("fit")
    with pytest.raises(ValueError, match=names[0].split(".")[0]):
        for _ in strict.train_dataloader():
            pass


def test_missing_model_settings_give_a_clear_error(synthetic_dir: Path) -> None:
    """The model's settings are never read from an attached module behind the user's back."""
    dm = MLLMDataModule(synthetic=SyntheticData(dir=str(synthetic_dir)), num_workers=0)
    with pytest.raises(ValueError, match=r"data\.image_data_config.*data_settings"):
        dm.setup("fit")
    with_module = MLLMDataModule(
        synthetic=SyntheticData(dir=str(synthetic_dir)), image_data_config=IMAGE_CONFIG
    )
    with pytest.raises(ValueError, match=r"data\.tokenizer"):
        with_module.setup("fit")


def test_prepare_data_rewrites_a_set_made_with_other_settings(tmp_path: Path) -> None:
    """Changing `data.synthetic` (here max_shapes) must not silently reuse the old files."""
    import json

    def prepare(**settings) -> dict:
        synthetic = SyntheticData(dir=str(tmp_path), num_train=6, num_val=1, num_test=0, **settings)
        make_datamodule(tmp_path, synthetic=synthetic).prepare_data()
        return json.loads((tmp_path / "synthetic_manifest.json").read_text())

    first = prepare(max_shapes=1)
    stamp = (tmp_path / "synthetic_manifest.json").stat().st_mtime_ns
    assert prepare(max_shapes=1) == first  # same settings: kept as is
    assert (tmp_path / "synthetic_manifest.json").stat().st_mtime_ns == stamp
    second = prepare(max_shapes=2, jitter=False)
    assert (second["max_shapes"], second["jitter"]) == (2, False)


# -- max_length too small for any sample (#15.4) --------------------------------------------------
@pytest.mark.parametrize("task", ["caption", "instruct"])
def test_max_length_below_one_sample_fails_in_setup_naming_both_numbers(
    synthetic_dir: Path, task: str
) -> None:
    synthetic = SyntheticData(dir=str(synthetic_dir), num_train=96, num_val=16, task=task)

    def train_only(max_length: int) -> MLLMDataModule:
        dm = make_datamodule(synthetic_dir, synthetic=synthetic, max_length=max_length)
        dm.sources["val"] = None  # the instruct task validates on captions, which need more
        return dm

    with pytest.raises(ValueError, match=r"data\.max_length 8 is too small") as info:
        train_only(8).setup("fit")
    message = str(info.value)
    need = int(re.search(r"needs at least (\d+) tokens", message).group(1))
    assert need > 4 + 2  # 4 image tokens + start/end + prompt/template + 1 reply token
    assert "6 for the image block" in message and f"data.max_length >= {need}" in message
    assert ("LLaVA sample" if task == "instruct" else "caption sample") in message
    # the minimum is exact: that length keeps one reply token, one token less fails setup
    tight = train_only(need)
    tight.setup("fit")
    train = tight.datasets["train"]
    if task == "caption":  # one shared prompt: every sample keeps exactly its first reply token
        for index in range(0, len(train), 97):
            item = train[index]
            assert len(item["input_ids"]) == need
            assert int((item["labels"] != IGNORE_INDEX).sum()) == 1
    with pytest.raises(ValueError, match=f"data.max_length {need - 1} is too small"):
        train_only(need - 1).setup("fit")


# -- numeric options are checked by name (#15.14) -------------------------------------------------
@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"batch_size": 0}, "data.batch_size must be an integer >= 1, got 0"),
        ({"batch_size": -8}, "data.batch_size must be an integer >= 1, got -8"),
        ({"batch_size": 2.5}, "data.batch_size must be an integer >= 1, got 2.5"),
        ({"batch_size": True}, "data.batch_size must be an integer >= 1, got True"),
        ({"eval_batch_size": 0}, "data.eval_batch_size must be an integer >= 1 (or null), got 0"),
        ({"max_length": 0}, "data.max_length must be an integer >= 2, got 0"),
        ({"num_workers": -1}, "data.num_workers must be an integer >= 0, got -1"),
        ({"val_limit": 0}, "data.val_limit must be an integer >= 1 (or null), got 0"),
        ({"num_image_tokens": 0}, "data.num_image_tokens must be an integer >= 1 (or null), got 0"),
        ({"max_image_pixels": 0}, "data.max_image_pixels must be an integer >= 1, got 0"),
        ({"crop_pct": 0.0}, "data.crop_pct must be > 0 (or null), got 0.0"),
        ({"crop_mode": "crop"}, "data.crop_mode must be one of ('center', 'squash', 'border')"),
        ({"on_bad_sample": "ignore"}, "data.on_bad_sample must be 'error' or 'skip', got 'ignore'"),
        ({"length_grouping": -1}, "data.length_grouping must be an integer >= 0, got -1"),
        (
            {"synthetic": SyntheticData(num_train=-1)},
            "data.synthetic.num_train must be an integer >= 0, got -1",
        ),
        (
            {"synthetic": SyntheticData(num_train=0, num_val=0)},
            "data.synthetic needs num_train or num_val >= 1",
        ),
        (
            {"synthetic": SyntheticData(image_size=8)},
            "data.synthetic.image_size must be an integer >= 24, got 8",
        ),
        (
            {"synthetic": SyntheticData(max_shapes=4)},
            "data.synthetic.max_shapes must be an integer in 1..3, got 4",
        ),
    ],
)
def test_bad_numeric_options_are_refused_by_name(options: dict, message: str) -> None:
    with pytest.raises(ValueError) as info:
        MLLMDataModule(**options)
    assert message in str(info.value)


def test_good_edge_values_are_accepted() -> None:
    dm = MLLMDataModule(batch_size=1, num_workers=0, val_limit=1, eval_batch_size=None)
    assert (dm.batch_size, dm.eval_batch_size, dm.num_workers) == (1, 1, 0)


def test_cli_batch_size_zero_fails_naming_the_option(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from lit_mllm.cli import main

    config = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
    args = ["fit", "--config", str(config), "--data.batch_size", "0"]
    args += ["--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path / "run")]
    args += ["--data.synthetic.dir", str(tmp_path / "data"), "--data.synthetic.num_train", "8"]
    args += ["--data.synthetic.num_val", "2", "--data.num_workers", "0"]
    assert main(args) != 0
    err = capsys.readouterr().err
    assert re.search(r"data\.batch_size must be an integer >= 1, got 0", err)
    assert "Traceback" not in err
    assert not (tmp_path / "data").exists()  # refused before any data was written
