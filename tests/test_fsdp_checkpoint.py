"""A real FSDP sharded checkpoint (one GPU): written with a checksum manifest, resumed and exported
through the safe readers; a crafted copy is refused before Lightning unpickles anything."""

from __future__ import annotations

import os
import pickle
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from micro import needs_caption_metrics
from test_checkpoints_safe_load import RunsCode
from test_ddp import micro_config

from lit_mllm.checkpoints.integrity import MANIFEST
from lit_mllm.data.synthetic import generate_synthetic_dataset

ROOT = Path(__file__).resolve().parents[1]
FSDP = ROOT / "configs" / "trainer" / "fsdp.yaml"

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.slow,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="FSDP needs CUDA"),
]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def fit(config: Path, *extra: str, cwd: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "lit_mllm.cli", "fit", "--config", str(config)]
    command += ["--config", str(FSDP), "--trainer.devices", "1", *extra]
    # a process group of an earlier test in this process may still hold its port
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    return subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=cwd, env=env)


@needs_caption_metrics
def test_sharded_checkpoint_resumes_exports_and_refuses_a_crafted_copy(tmp_path: Path) -> None:
    from lit_mllm.checkpoints.safe_load import check_checkpoint_path
    from lit_mllm.export import load_checkpoint

    data = tmp_path / "synthetic"
    generate_synthetic_dataset(data, 64, 8, 0, seed=1, image_size=32, workers=1)
    config = micro_config(data, tmp_path / "run")
    path = tmp_path / "micro.yaml"
    path.write_text(yaml.safe_dump(config))

    first = fit(path, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    folder = tmp_path / "run" / "ckpt" / "last.ckpt"
    assert folder.is_dir() and (folder / "meta.pt").is_file() and (folder / MANIFEST).is_file()
    assert check_checkpoint_path(folder)["global_step"] == 4

    resumed = fit(path, "--trainer.max_steps", "8", "--ckpt_path", str(folder), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert check_checkpoint_path(folder)["global_step"] == 8  # the next periodic save
    module = load_checkpoint(folder)
    assert module.num_image_tokens == 4

    crafted = tmp_path / "crafted.ckpt"
    shutil.copytree(folder, crafted)
    marker = tmp_path / "ran"
    (crafted / ".metadata").write_bytes(pickle.dumps(RunsCode(marker)))
    (crafted / MANIFEST).unlink()  # whoever crafts it drops the checksums too
    refused = fit(path, "--trainer.max_steps", "12", "--ckpt_path", str(crafted), cwd=tmp_path)
    assert refused.returncode == 1
    assert "is not DCP checkpoint metadata that can be read safely" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert not marker.exists()
