"""The README's commands: every console script answers, and fit -> validate -> test -> predict ->
lit-mllm-score runs end to end through LightningCLI on a micro configuration."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
import torch
import yaml
from test_ddp import micro_config

from lit_mllm.errors import DEBUG_ENV

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    blocks = [block.replace("\\\n", " ") for block in blocks]  # a "\" continues the line
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
            words = command.split()
            if words[1] == "-m":  # a module of this repository (benchmarks are packages)
                assert (ROOT / words[2].replace(".", "/")).is_dir() or (
                    ROOT / (words[2].replace(".", "/") + ".py")
                ).is_file(), command
            else:
                assert (ROOT / words[1]).is_file(), command
        elif program == "tensorboard":  # a dependency's console script, installed with us
            assert shutil.which("tensorboard"), "tensorboard is a dependency but not on PATH"
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
    # dynamic cache, then the CUDA-graph decoding loop (eager on a CPU) through Lightning's
    # predict loop: the same captions
    written = {}
    for cache in ("dynamic", "cuda_graph"):
        out_file = tmp_path / f"results_{cache}.json"
        cli(
            "predict",
            "--config",
            str(path),
            "--ckpt_path",
            str(ckpt),
            "--model.predictions_path",
            str(out_file),
            "--model.generation.cache",
            cache,
            cwd=tmp_path,
        )
        written[cache] = json.loads(out_file.read_text())
    predictions = written["dynamic"]
    assert len(predictions) == 8 and all(isinstance(p["caption"], str) for p in predictions)
    assert written["cuda_graph"] == predictions
    results = tmp_path / "results_dynamic.json"
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


# -- errors: one line, no traceback (unless --debug) -----------------------------------------------
def run_cli(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lit_mllm.cli", *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=cwd,
        env={**os.environ, **(env or {})},
    )


def test_a_bad_setting_is_one_line_and_debug_shows_the_traceback(tmp_path: Path) -> None:
    bad = ("validate", "--model.preset", "micro", "--model.encoder.name", "no_such_vit")
    plain = run_cli(*bad, cwd=tmp_path)
    assert plain.returncode == 1
    assert "Traceback" not in plain.stderr
    assert plain.stderr.strip().splitlines()[-1] == (
        "lit-mllm: error: Unknown timm model 'no_such_vit' (see timm.list_models())."
    )
    for debug in (
        run_cli(*bad, "--debug", cwd=tmp_path),
        run_cli(*bad, cwd=tmp_path, env={DEBUG_ENV: "1"}),
    ):
        assert debug.returncode == 1
        assert "Traceback" in debug.stderr and "lit_mllm/models/vision.py" in debug.stderr


def test_lightnings_own_configuration_refusals_are_one_line_too(tmp_path: Path) -> None:
    """Trainer flags that contradict the recipe (its checkpoint callbacks with checkpointing
    off) are refused by Lightning, deep inside it: still one line, exit code 2."""
    run = run_cli(
        "fit", "--config", str(ROOT / "configs" / "tiny.yaml"),
        "--trainer.enable_checkpointing", "false", cwd=tmp_path,
    )  # fmt: skip
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines()[-1] == (
        "lit-mllm: error: Lightning refused the configuration: Trainer was configured with "
        "`enable_checkpointing=False` but found `ModelCheckpoint` in callbacks list."
    )


def test_export_data_and_score_share_the_debug_switch(tmp_path: Path, capsys, monkeypatch) -> None:
    from lit_mllm.data.cli import main as data_main
    from lit_mllm.export import main as export_main
    from lit_mllm.metrics.cli import main as score_main

    synth = ["synth", "--out", str(tmp_path / "d"), "--train", "1", "--val", "0", "--seed", "0"]
    assert data_main([*synth, "--max-shapes", "9"]) == 2
    assert capsys.readouterr().err.startswith("lit-mllm-data synth: error: max_shapes must be")
    with pytest.raises(ValueError, match="max_shapes"):
        data_main([*synth, "--max-shapes", "9", "--debug"])
    export = ["--ckpt", str(tmp_path / "nope.ckpt"), "--out", str(tmp_path / "out")]
    with pytest.raises(FileNotFoundError):
        export_main([*export, "--debug"])
    missing = ["--annotations", str(tmp_path / "a.json"), "--results", str(tmp_path / "r.json")]
    assert score_main(missing) == 2
    monkeypatch.setenv(DEBUG_ENV, "1")
    with pytest.raises(ValueError, match="annotation file not found"):
        score_main(missing)


# -- --ckpt_path is checked before Lightning reads it ----------------------------------------------
@pytest.fixture(scope="module")
def micro_ckpt(tmp_path_factory) -> Path:
    """A genuine micro checkpoint (resampler, 4 queries) and an older intact copy beside it."""
    from test_checkpoints_safe_load import micro_module, write_checkpoint

    folder = tmp_path_factory.mktemp("ckpt")
    write_checkpoint(micro_module(), folder / "last.ckpt")
    shutil.copyfile(folder / "last.ckpt", folder / "epoch=0-step=1.ckpt")
    os.utime(folder / "epoch=0-step=1.ckpt", (1, 1))
    return folder / "last.ckpt"


class Stop(Exception):
    """Raised where LightningCLI would build the model: the checks before it passed."""


@pytest.fixture
def stop_before_instantiation(monkeypatch) -> dict:
    from lit_mllm.cli import MLLMCLI

    seen: dict = {}

    def stop(cli) -> None:
        seen["config"] = cli.config[cli.config.subcommand]
        raise Stop

    monkeypatch.setattr(MLLMCLI, "before_instantiate_classes", stop)
    return seen


def _bad_checkpoint(kind: str, good: Path, folder: Path) -> str:
    from test_checkpoints_safe_load import flip_tensor_bytes

    bad = folder / "last.ckpt"
    if kind == "truncated":
        bad.write_bytes(good.read_bytes()[: good.stat().st_size * 2 // 3])
    elif kind == "empty":
        bad.write_bytes(b"")
    elif kind == "garbage":
        bad.write_bytes(b"\x0b not a checkpoint \x00" * 50)
    elif kind == "flipped":
        shutil.copyfile(good, bad)
        flip_tensor_bytes(bad)
    elif kind == "folder":
        bad.mkdir()
    elif kind == "url":
        return "http://127.0.0.1:9/last.ckpt"
    return str(bad)


@pytest.mark.parametrize(
    ("kind", "says"),
    [
        ("truncated", "is corrupt or truncated"),
        ("empty", "is empty (0 bytes)"),
        ("garbage", "is not a PyTorch checkpoint"),
        ("flipped", "fails its CRC32 checksum"),
        ("folder", "is a folder but not a checkpoint (a checkpoint is a .ckpt file"),
        ("url", "download it first"),
    ],
)
def test_a_bad_ckpt_path_is_one_clear_message(
    micro_ckpt, tmp_path, capsys, stop_before_instantiation, kind, says
) -> None:
    from lit_mllm.cli import main as cli_main

    path = _bad_checkpoint(kind, micro_ckpt, tmp_path)
    if kind in ("truncated", "flipped"):
        shutil.copyfile(micro_ckpt, tmp_path / "epoch=0-step=1.ckpt")
        os.utime(tmp_path / "epoch=0-step=1.ckpt", (1, 1))
    assert cli_main(["fit", "--ckpt_path", path]) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("lit-mllm: error:")]
    assert len(lines) == 1 and "Traceback" not in err
    assert f"checkpoint {path!r}" in lines[0] or f"{path!r} is a folder" in lines[0]
    assert says in lines[0]
    if kind in ("truncated", "flipped"):  # and the last good one
        assert str(tmp_path / "epoch=0-step=1.ckpt") in lines[0]


def test_a_crafted_sharded_folder_is_refused_before_lightning_reads_it(
    micro_ckpt, tmp_path, capsys, stop_before_instantiation
) -> None:
    """Lightning's FSDPStrategy would unpickle its .metadata with plain pickle."""
    import pickle

    from test_checkpoints_safe_load import RunsCode, micro_module, write_sharded

    from lit_mllm.cli import main as cli_main

    folder = tmp_path / "last.ckpt"
    write_sharded(micro_ckpt, folder, micro_module())
    marker = tmp_path / "ran"
    (folder / ".metadata").write_bytes(pickle.dumps(RunsCode(marker)))
    assert cli_main(["fit", "--ckpt_path", str(folder)]) == 1
    err = capsys.readouterr().err
    assert "is not DCP checkpoint metadata that can be read safely" in err
    assert not marker.exists()


def test_model_settings_that_differ_from_the_checkpoint_are_refused(
    micro_ckpt, capsys, stop_before_instantiation
) -> None:
    from lit_mllm.cli import main as cli_main

    args = ["--model.connector.kind", "mlp", "--model.decoder.train", "lora"]
    assert cli_main(["validate", "--ckpt_path", str(micro_ckpt), *args]) == 2
    err = capsys.readouterr().err
    assert "model.connector.kind: 'mlp' (checkpoint: 'resampler')" in err
    assert "model.decoder.train: 'lora' (checkpoint: 'full')" in err
    assert "num_queries" not in err  # not given: its default does not count


def test_run_settings_may_differ_from_the_checkpoint(
    micro_ckpt, tmp_path, stop_before_instantiation
) -> None:
    from micro import MICRO_MODEL

    from lit_mllm.cli import main as cli_main

    run_settings = [
        "--model.optim.lr", "0.5", "--model.generation.max_new_tokens", "3",
        "--model.metrics", "[CIDEr]", "--trainer.max_steps", "7", "--data.batch_size", "3",
    ]  # fmt: skip
    config = tmp_path / "model.yaml"
    config.write_text(yaml.safe_dump({"model": MICRO_MODEL}))  # the checkpoint's own settings
    for given in (
        [],  # nothing about the model: the checkpoint's settings apply
        ["--model.connector.kind", "resampler"],  # equal to the checkpoint's
        ["--config", str(config)],
    ):
        with pytest.raises(Stop):
            cli_main(["validate", *given, "--ckpt_path", str(micro_ckpt), *run_settings])
        seen = stop_before_instantiation["config"]
        assert seen.model.optim.lr == 0.5 and seen.model.generation.max_new_tokens == 3
        assert seen.model.connector.num_queries == 4  # from the checkpoint
        assert seen.weights_only is True


def test_a_checkpoint_turning_on_remote_code_is_refused_unless_given(
    tmp_path, capsys, stop_before_instantiation
) -> None:
    """LightningCLI would apply the checkpoint's decoder.trust_remote_code: true silently."""
    from micro import MICRO_MODEL
    from test_checkpoints_safe_load import write_checkpoint

    from lit_mllm.cli import main as cli_main
    from lit_mllm.module import MLLMModule

    decoder = {**MICRO_MODEL["decoder"], "trust_remote_code": True}
    ckpt = tmp_path / "last.ckpt"
    write_checkpoint(MLLMModule(**{**MICRO_MODEL, "decoder": decoder}), ckpt)
    assert cli_main(["validate", "--ckpt_path", str(ckpt)]) == 1
    assert "pass --model.decoder.trust_remote_code true" in capsys.readouterr().err
    with pytest.raises(Stop):
        cli_main(
            ["validate", "--ckpt_path", str(ckpt), "--model.decoder.trust_remote_code", "true"]
        )


@pytest.mark.parametrize("accelerator", ["cpu", "auto"])
def test_fp16_on_a_cpu_is_refused_not_swapped_for_bf16(accelerator: str, capsys) -> None:
    """Lightning would train in bf16-mixed and only warn; the run is refused before it starts."""
    from lit_mllm.cli import main

    if accelerator == "auto" and torch.cuda.is_available():
        pytest.skip("auto picks the GPU here")
    args = ["fit", "--model.preset", "micro", "--trainer.precision", "16-mixed"]
    assert main([*args, "--trainer.accelerator", accelerator]) == 2  # a usage error
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("lit-mllm: error: trainer.precision 16-mixed (fp16 autocast")
    assert "--trainer.precision bf16-mixed" in error
