"""MLLMDataModule end to end on a small synthetic set: loaders, packing, bad images."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lit_mllm.data.collate import padding_waste
from lit_mllm.data.datamodule import MLLMDataModule, SplitSource, SyntheticData
from lit_mllm.data.special_tokens import IGNORE_INDEX, IM_PATCH
from lit_mllm.data.synthetic import generate_synthetic_dataset
from lit_mllm.data.tokenizer import load_tokenizer
from lit_mllm.models.vision import VisionEncoder

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
    dm = MLLMDataModule(synthetic=SyntheticData(dir=str(synthetic_dir)), num_workers=0)
    with pytest.raises(ValueError, match="image_data_config"):
        dm.setup("fit")


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
