"""2-process DDP (gloo, CPU) trains like 1 process with the doubled batch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from micro import MICRO_MODEL

from lit_mllm.data.synthetic import generate_synthetic_dataset

STEPS = 4


def micro_config(data_dir: Path, root: Path) -> dict:
    return {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "max_steps": STEPS,
            "limit_val_batches": 0,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "logger": False,
            "default_root_dir": str(root),
            "callbacks": [
                {
                    "class_path": "lit_mllm.checkpointing.AtomicModelCheckpoint",
                    "init_args": {
                        "dirpath": str(root / "ckpt"),
                        "every_n_train_steps": STEPS,
                        "save_top_k": 0,
                        "save_last": True,
                    },
                }
            ],
        },
        "model": {
            **MICRO_MODEL,
            "optim": {"lr": 3e-3, "warmup_steps": 1},
        },
        "data": {
            "synthetic": {
                # the set the test writes first: same settings, so prepare_data keeps it
                "dir": str(data_dir),
                **{"num_train": 64, "num_val": 8, "num_test": 0, "seed": 1, "image_size": 32},
            },
            "num_workers": 0,
            "one_sample_per_caption": False,
        },
    }


def run_fit(config: dict, path: Path, *extra: str) -> dict[str, torch.Tensor]:
    path.write_text(yaml.safe_dump(config))
    command = [sys.executable, "-m", "lit_mllm.cli", "fit", "--config", str(path), *extra]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = torch.load(
        Path(config["trainer"]["default_root_dir"]) / "ckpt" / "last.ckpt", weights_only=True
    )
    return checkpoint["state_dict"]


@pytest.mark.slow
def test_two_process_ddp_matches_one_process_with_double_batch(tmp_path: Path) -> None:
    data = tmp_path / "synthetic"
    generate_synthetic_dataset(data, 64, 8, 0, seed=1, image_size=32, workers=1)
    one = micro_config(data, tmp_path / "one")
    one["data"]["batch_size"] = 8
    two = micro_config(data, tmp_path / "two")
    two["data"]["batch_size"] = 4
    single = run_fit(one, tmp_path / "one.yaml", "--trainer.devices", "1")
    ddp = run_fit(two, tmp_path / "two.yaml", "--trainer.devices", "2", "--trainer.strategy", "ddp")
    import lightning as L

    from lit_mllm.module import MLLMModule

    L.seed_everything(0)
    initial = MLLMModule(**one["model"]).state_dict()
    assert single.keys() == ddp.keys()
    names = [n for n in single if n.startswith("model.") and n in initial]
    names = [n for n in names if not torch.equal(single[n], initial[n])]  # trained tensors
    update = torch.cat([(single[n] - initial[n]).flatten() for n in names]).norm()
    apart = torch.cat([(single[n] - ddp[n]).flatten() for n in names]).norm()
    # same samples per step; the loss is the mean over all supervised tokens of the global
    # batch in both (MLLMModule weights each rank by its token share): equal up to float sums
    print(f"relative distance of DDP vs single-process weights: {float(apart / update):.4f}")
    assert 0 < float(apart / update) < 0.01, float(apart / update)
