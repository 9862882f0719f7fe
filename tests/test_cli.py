"""The README's commands: every console script answers, and fit -> validate -> test -> predict ->
lit-mllm-score runs end to end through LightningCLI on a micro configuration."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
import yaml
from test_ddp import micro_config

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    lines = [line.split("#")[0].strip() for block in blocks for line in block.splitlines()]
    return [line for line in lines if line]


def test_every_readme_command_is_a_known_entry_point() -> None:
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([a-z]+):", makefile, flags=re.M))
    for command in readme_commands():
        program = command.split()[0]
        if program == "make":
            assert command.split()[1] in targets, command
        elif program == "python":
            assert (ROOT / command.split()[1]).is_file(), command
        elif program == "tensorboard":
            assert shutil.which("tensorboard") or True  # a dependency, not ours
        else:
            assert program in SCRIPTS, f"README command {command!r} is not a console script"
    assert (ROOT / ".ci" / "run").read_text().strip().endswith("make test")


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_console_scripts_answer_help(script: str) -> None:
    module, function = SCRIPTS[script].split(":")
    code = f"import sys; sys.argv=['{script}', '--help']; from {module} import {function}; {function}()"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage" in result.stdout.lower()


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "lit_mllm.cli", *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=cwd,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_fit_validate_test_predict_and_score(tmp_path: Path) -> None:
    from lit_mllm.data.synthetic import generate_synthetic_dataset

    data = tmp_path / "synthetic"
    generate_synthetic_dataset(data, 32, 8, 8, seed=2, image_size=32, workers=1)
    config = micro_config(data, tmp_path / "run")
    config["data"]["synthetic"].update(num_train=32, num_test=8, seed=2)  # the set written above
    config["data"]["batch_size"] = 8
    config["model"]["metrics"] = ["BLEU", "ROUGE_L", "CIDEr"]
    config["model"]["generation"] = {"max_new_tokens": 8}
    path = tmp_path / "micro.yaml"
    path.write_text(yaml.safe_dump(config))
    ckpt = tmp_path / "run" / "ckpt" / "last.ckpt"

    cli("fit", "--config", str(path), cwd=tmp_path)
    assert ckpt.is_file()
    for stage in ("validate", "test"):
        out = cli(
            stage,
            "--config",
            str(path),
            "--ckpt_path",
            str(ckpt),
            "--trainer.limit_val_batches",
            "1.0",
            cwd=tmp_path,
        )
        assert "CIDEr" in out.stdout + out.stderr
    results = tmp_path / "results.json"
    cli(
        "predict",
        "--config",
        str(path),
        "--ckpt_path",
        str(ckpt),
        "--model.predictions_path",
        str(results),
        cwd=tmp_path,
    )
    predictions = json.loads(results.read_text())
    assert len(predictions) == 8 and all(isinstance(p["caption"], str) for p in predictions)
    score = subprocess.run(
        [
            sys.executable,
            "-m",
            "lit_mllm.metrics.cli",
            "--annotations",
            str(data / "captions_val.json"),
            "--results",
            str(results),
            "--metrics",
            "BLEU",
            "CIDEr",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert score.returncode == 0, score.stderr
    assert set(json.loads(score.stdout)) >= {"Bleu_4", "CIDEr"}
