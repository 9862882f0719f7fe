"""`lit-mllm predict` on LLaVA-format data: every row names its sample, none has a null image
id, and under DDP rows are de-duplicated by sample id (LLaVA records have no image id)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import yaml
from micro import MICRO_MODEL
from PIL import Image

from lit_mllm.data.datamodule import MLLMDataModule, SplitSource
from lit_mllm.module import MLLMModule

QUESTIONS = ["What is this?", "Describe it.", "Which colour?", "How many?", "Where is it?"]


def write_llava(folder: Path) -> tuple[Path, list[str]]:
    """Five LLaVA records about three images (two images are asked about twice)."""
    rng = np.random.default_rng(0)
    (folder / "images").mkdir(parents=True)
    for i in range(3):
        pixels = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / "images" / f"{i}.png")
    records = [
        {
            "id": f"conv-{k}",
            "image": f"{k % 3}.png",
            "conversations": [
                {"from": "human", "value": f"<image>\n{question}"},
                {"from": "gpt", "value": "a shape"},
            ],
        }
        for k, question in enumerate(QUESTIONS)
    ]
    path = folder / "llava.json"
    path.write_text(json.dumps(records))
    return path, [r["id"] for r in records]


def _check_rows(path: Path, sample_ids: list[str]) -> None:
    rows = json.loads(path.read_text())
    assert sorted(row["sample_id"] for row in rows) == sorted(sample_ids)
    for row in rows:
        assert "image_id" not in row, row  # the source has none: no null column
        assert isinstance(row["caption"], str)


def test_predict_on_llava_data_writes_sample_ids(tmp_path: Path) -> None:
    file, sample_ids = write_llava(tmp_path / "data")
    out = tmp_path / "predictions.json"
    module = MLLMModule(**MICRO_MODEL, predictions_path=str(out), generation={"max_new_tokens": 4})
    data = MLLMDataModule(
        **module.data_settings(),
        predict=SplitSource(kind="llava", file=str(file), image_root=str(file.parent / "images")),
        eval_batch_size=2,
        num_workers=0,
    )
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    trainer.predict(module, datamodule=data)
    _check_rows(out, sample_ids)


def test_two_process_predict_deduplicates_by_sample_id(tmp_path: Path) -> None:
    """Both ranks' rows are gathered and keyed by sample id: with the image id as the key
    (None for every LLaVA record) five predictions collapsed into one."""
    file, sample_ids = write_llava(tmp_path / "data")
    out = tmp_path / "predictions.json"
    config = {
        "trainer": {
            "accelerator": "cpu",
            "devices": 2,
            "strategy": "ddp",
            "logger": False,
            "enable_progress_bar": False,
            "default_root_dir": str(tmp_path),
        },
        "model": {**MICRO_MODEL, "predictions_path": str(out), "generation": {"max_new_tokens": 4}},
        "data": {
            "predict": {
                "kind": "llava",
                "file": str(file),
                "image_root": str(file.parent / "images"),
            },
            "eval_batch_size": 2,
            "num_workers": 0,
        },
    }
    path = tmp_path / "predict.yaml"
    path.write_text(yaml.safe_dump(config))
    command = [sys.executable, "-m", "lit_mllm.cli", "predict", "--config", str(path)]
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        _, stderr = process.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise AssertionError("2-process predict hung") from None
    assert process.returncode == 0, stderr[-3000:]
    _check_rows(out, sample_ids)
