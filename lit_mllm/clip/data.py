"""Image-caption pairs for CLIP-style pretraining, from the same sources as the multimodal model.

One sample per image; each time an image is drawn in training, one of its reference captions is
picked at random (five wordings of the same facts), so the encoder learns the facts, not a
wording. Validation always uses the first reference, so its retrieval score is repeatable.
"""

from __future__ import annotations

import json
import logging
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from lit_mllm.data.datamodule import SyntheticData, synthetic_source
from lit_mllm.data.readers import load_source
from lit_mllm.data.records import SampleStore
from lit_mllm.data.synthetic import ensure_written
from lit_mllm.data.tokenizer import load_tokenizer
from lit_mllm.data.transforms import build_image_transform, load_rgb_image

log = logging.getLogger(__name__)


def cell_fact_labels(scene: dict[str, Any]) -> torch.Tensor:
    """(cells, 3) class indices [kind, colour, size] of each grid cell; 0 = no shape there."""
    from lit_mllm.data.synthetic import COLOURS, GRID, KINDS, SIZES

    labels = torch.zeros(GRID * GRID, 3, dtype=torch.long)
    for shape in scene["shapes"]:
        labels[shape["row"] * GRID + shape["col"]] = torch.tensor(
            [
                KINDS.index(shape["kind"]) + 1,
                list(COLOURS).index(shape["colour"]) + 1,
                SIZES.index(shape["size"]) + 1,
            ]
        )
    return labels


def read_scenes(annotation_file: str) -> dict[Any, dict[str, Any]]:
    """Image id -> the drawn scene, which the synthetic COCO files carry beside each image."""
    images = json.loads(Path(annotation_file).read_text())["images"]
    missing = [im["id"] for im in images if "scene" not in im]
    if missing:
        raise ValueError(
            f"{annotation_file}: images {missing[:3]} have no 'scene'; per-cell fact labels need "
            "the synthetic set (set model.fact_loss_weight: 0 for other caption data)"
        )
    return {im["id"]: im["scene"] for im in images}


class CaptionPairs(Dataset):
    """(pixels, caption ids, image index[, per-cell fact labels]) per image of a caption store."""

    def __init__(
        self,
        samples: SampleStore,
        transform: Any,
        tokenizer: Any,
        train: bool,
        scenes: dict[Any, dict[str, Any]] | None = None,
    ) -> None:
        self.samples = samples
        self.transform = transform
        self.tokenizer = tokenizer
        self.train = train
        self.scenes = scenes

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.samples[index]
        captions = sample.references
        if not captions:
            raise ValueError(f"{self.samples.source}: sample {sample.sample_id} has no caption")
        pick = int(torch.randint(len(captions), ())) if self.train else 0
        ids = self.tokenizer(captions[pick], add_special_tokens=False)["input_ids"]
        pixels = self.transform(load_rgb_image(sample.image_paths[0]))
        item = {"pixel_values": pixels, "input_ids": torch.tensor(ids), "index": index}
        if self.scenes is not None:
            item["cell_labels"] = cell_fact_labels(self.scenes[sample.image_id])
        return item


def collate_pairs(items: list[dict[str, Any]], pad_token_id: int) -> dict[str, torch.Tensor]:
    width = max(len(item["input_ids"]) for item in items)
    ids = torch.full((len(items), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, item in enumerate(items):
        ids[row, : len(item["input_ids"])] = item["input_ids"]
        mask[row, : len(item["input_ids"])] = 1
    batch = {
        "pixel_values": torch.stack([item["pixel_values"] for item in items]),
        "input_ids": ids,
        "attention_mask": mask,
        "index": torch.tensor([item["index"] for item in items]),
    }
    if "cell_labels" in items[0]:
        batch["cell_labels"] = torch.stack([item["cell_labels"] for item in items])
    return batch


class CaptionPairDataModule(L.LightningDataModule):
    """The synthetic set (written once, like the multimodal DataModule does) as caption pairs.

    ``image_data_config`` is the encoder's timm data config; the CLI links it from the model.
    ``cell_labels``: also yield each grid cell's [kind, colour, size] (from the drawn scenes) for
    the model's fact heads; the CLI links it from ``model.fact_loss_weight > 0``.
    """

    def __init__(
        self,
        synthetic: SyntheticData | None = None,
        image_data_config: dict[str, Any] | None = None,
        tokenizer: str = "tiny",
        cell_labels: bool = False,
        batch_size: int = 256,
        eval_batch_size: int | None = None,
        num_workers: int = 2,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {batch_size}")
        self.synthetic = synthetic or SyntheticData()
        self.image_data_config = image_data_config
        self.tokenizer_name = tokenizer
        self.cell_labels = cell_labels
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.datasets: dict[str, CaptionPairs] = {}

    def prepare_data(self) -> None:
        ensure_written(self.synthetic)

    def setup(self, stage: str | None = None) -> None:
        if self.image_data_config is None:
            raise ValueError(
                "CaptionPairDataModule needs `image_data_config` (the encoder's timm data config); "
                "the lit-mllm-clip CLI links it from the model"
            )
        self.tokenizer = load_tokenizer(self.tokenizer_name)
        for split in ("train", "val"):
            source = synthetic_source(self.synthetic, split)
            store = load_source("coco", source.file, source.image_root)
            transform = build_image_transform(self.image_data_config, crop_pct=1.0)
            scenes = read_scenes(source.file) if self.cell_labels else None
            self.datasets[split] = CaptionPairs(
                store, transform, self.tokenizer, split == "train", scenes
            )

    def _loader(self, split: str, batch_size: int) -> DataLoader:
        train = split == "train"
        return DataLoader(
            self.datasets[split],
            batch_size=batch_size,
            shuffle=train,
            drop_last=train,  # contrastive batches: every batch the same size
            generator=torch.Generator().manual_seed(self.seed) if train else None,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=partial(collate_pairs, pad_token_id=self.tokenizer.pad_token_id or 0),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", self.eval_batch_size)
