"""bf16 on a CPU that emulates it: the CLIs train in float32 instead, and say so."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from lit_mllm import precision
from lit_mllm.precision import cpu_matmul_gflops, fall_back_from_slow_bf16

TINY_ENCODER_CONFIG = str(Path(__file__).parents[1] / "configs/clip/tiny_encoder.yaml")


@pytest.fixture
def bf16_speed(monkeypatch):
    """Pretend this CPU's bf16 matmul is fast (True) or emulated (False)."""

    def set_speed(fast: bool) -> None:
        monkeypatch.setattr(precision, "cpu_bf16_is_fast", lambda: fast)

    return set_speed


def test_matmul_speeds_are_measured_without_touching_the_global_rng() -> None:
    cpu_matmul_gflops.cache_clear()
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        assert cpu_matmul_gflops(dtype) > 0.0
    assert precision.cpu_bf16_is_fast() in (True, False)
    assert torch.equal(torch.rand(3), expected)  # a seeded run draws the same numbers


@pytest.mark.parametrize("requested", ["bf16-mixed", "bf16-true"])
def test_emulated_bf16_on_the_cpu_falls_back_to_float32(bf16_speed, requested, caplog) -> None:
    bf16_speed(False)
    trainer = {"accelerator": "cpu", "precision": requested}
    with caplog.at_level(logging.WARNING, logger="lit_mllm.precision"):
        assert fall_back_from_slow_bf16(trainer)
    assert trainer["precision"] == "32-true"
    assert f"trainer.precision {requested}: this CPU multiplies bf16" in caplog.text
    assert "--cpu_bf16_fallback false" in caplog.text


@pytest.mark.parametrize(
    ("trainer", "fast", "enabled"),
    [
        ({"accelerator": "cpu", "precision": "bf16-mixed"}, True, True),  # native bf16
        ({"accelerator": "cpu", "precision": "bf16-mixed"}, False, False),  # asked to keep it
        ({"accelerator": "gpu", "precision": "bf16-mixed"}, False, True),  # not on the CPU
        ({"accelerator": "cpu", "precision": "32-true"}, False, True),  # not bf16
    ],
)
def test_other_runs_keep_their_precision(bf16_speed, trainer, fast, enabled) -> None:
    bf16_speed(fast)
    before = dict(trainer)
    assert not fall_back_from_slow_bf16(trainer, enabled=enabled)
    assert trainer == before


def _trainer_precision(argv: list[str]) -> str:
    from lit_mllm.cli import MLLMCLI
    from lit_mllm.data.datamodule import MLLMDataModule
    from lit_mllm.module import MLLMModule

    args = ["--model.preset", "micro", "--trainer.logger", "false", *argv]
    return MLLMCLI(MLLMModule, MLLMDataModule, run=False, args=args).trainer.precision


def test_lit_mllm_trains_in_float32_where_bf16_is_emulated(bf16_speed) -> None:
    bf16_speed(False)
    cpu_bf16 = ["--trainer.accelerator", "cpu", "--trainer.precision", "bf16-mixed"]
    assert _trainer_precision(cpu_bf16) == "32-true"
    assert _trainer_precision([*cpu_bf16, "--cpu_bf16_fallback", "false"]) == "bf16-mixed"
    bf16_speed(True)
    assert _trainer_precision(cpu_bf16) == "bf16-mixed"


def test_clip_cli_trains_in_float32_where_bf16_is_emulated(bf16_speed) -> None:
    from lit_mllm.clip.cli import ClipCLI
    from lit_mllm.clip.data import CaptionPairDataModule
    from lit_mllm.clip.module import ContrastivePretraining

    bf16_speed(False)
    args = ["--config", TINY_ENCODER_CONFIG, "--trainer.accelerator", "cpu"]
    args += ["--trainer.logger", "false"]
    cli = ClipCLI(ContrastivePretraining, CaptionPairDataModule, run=False, args=args)
    assert cli.trainer.precision == "32-true"  # the config asks for bf16-mixed
