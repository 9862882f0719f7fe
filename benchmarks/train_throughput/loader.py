"""Data-loader speed: MLLMDataModule over the synthetic set written as JPEG files."""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks.train_throughput.sizes import Sizes


@dataclass
class LoaderResult:
    """Timed batches of the data loader with one number of workers."""

    workers: int
    batch_size: int
    image_size: int
    batches: int
    status: str = "ok"
    seconds: float = float("nan")
    samples: int = 0

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.seconds if self.status == "ok" else float("nan")


def image_data_config(sizes: Sizes) -> dict[str, Any]:
    """The encoder's timm preprocessing config, from a weightless (meta) copy of it."""
    from lit_mllm.models.vision import VisionEncoder

    with torch.device("meta"):
        encoder = VisionEncoder(sizes.encoder_name, model_kwargs=dict(sizes.encoder_kwargs))
    return encoder.data_config


def loader_benchmark(args: argparse.Namespace, sizes: Sizes) -> list[LoaderResult]:
    """MLLMDataModule on the synthetic set written as JPEG: decode + transform + tokenise."""
    from lit_mllm.data.datamodule import MLLMDataModule, SyntheticData
    from lit_mllm.data.synthetic import generate_synthetic_dataset

    bs, batches = args.loader_batch_size, args.loader_batches
    num_train = bs * (batches + 1)
    root = Path(args.loader_dir or tempfile.mkdtemp(prefix="lit_mllm_loader_"))
    manifest = root / "synthetic_manifest.json"
    wanted = {"train": num_train, "val": 4}
    fresh = manifest.exists() and json.loads(manifest.read_text()).get("counts") == wanted
    fresh = fresh and json.loads(manifest.read_text()).get("image_format") == "jpg"
    if not fresh:
        generate_synthetic_dataset(
            root, num_train, 4, 0, seed=0, image_size=args.loader_image_size, image_format="jpg"
        )
    data_config = image_data_config(sizes)
    results = []
    for workers in args.loader_workers:
        result = LoaderResult(workers, bs, args.loader_image_size, batches)
        try:
            dm = MLLMDataModule(
                synthetic=SyntheticData(
                    dir=str(root),
                    num_train=num_train,
                    num_val=4,
                    num_test=0,
                    image_size=args.loader_image_size,
                    task="instruct",
                ),
                tokenizer="tiny",
                num_image_tokens=sizes.patches,
                image_data_config=data_config,
                batch_size=bs,
                num_workers=workers,
                packing=True,
                max_length=8192,
            )
            dm.setup("fit")
            iterator = iter(dm.train_dataloader())
            next(iterator)  # worker start-up excluded
            start = time.perf_counter()
            for _ in range(batches):
                result.samples += int(next(iterator)["batch_size"])
            result.seconds = time.perf_counter() - start
            del iterator
        except Exception as error:
            result.status = f"error: {type(error).__name__}: {error}".splitlines()[0][:160]
        results.append(result)
    return results
