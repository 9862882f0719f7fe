"""Configuration errors surface before the first training step, not at the first validation
thousands of steps in (the recipes set num_sanity_val_steps: 0)."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest

pytest.importorskip("pycocoevalcap")  # caption metrics; not on every GPU image
import torch
from lightning.pytorch.strategies import SingleDeviceStrategy
from micro import MICRO_DECODER_CONFIG, MICRO_MODEL
from test_model import make_batch
from transformers import AutoConfig, AutoModelForCausalLM

from lit_mllm.metrics import java
from lit_mllm.module import MLLMModule


class _CountSteps(L.Callback):
    def __init__(self) -> None:
        self.steps = 0

    def on_train_batch_start(self, *args) -> None:
        self.steps += 1


def _fit(module: MLLMModule, counter: _CountSteps, **trainer_kwargs) -> None:
    """Two training steps with validation at the end of the epoch (no sanity check)."""
    batches = [make_batch(module, with_prompts=True) for _ in range(2)]
    loader = torch.utils.data.DataLoader(batches, batch_size=None)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=2,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[counter],
        **trainer_kwargs,
    )
    trainer.fit(module, train_dataloaders=loader, val_dataloaders=loader)


def test_unknown_metric_names_fail_when_the_module_is_built() -> None:
    with pytest.raises(
        ValueError, match=r"model.metrics: unknown caption metric\(s\) \['CIDER-D'\]"
    ):
        MLLMModule(**MICRO_MODEL, metrics=["BLEU", "CIDER-D"])


def test_missing_java_fails_before_the_first_training_step(monkeypatch) -> None:
    def no_java() -> java.JavaRuntime:
        raise java.JavaNotFoundError(java.INSTALL_HINT)

    monkeypatch.setattr(java, "find_java", no_java)
    module = MLLMModule(**MICRO_MODEL, metrics=["BLEU", "METEOR"])
    counter = _CountSteps()
    with pytest.raises(java.JavaNotFoundError, match="need Java for validation"):
        _fit(module, counter)
    assert counter.steps == 0
    # without validation, training does not need Java
    _fit(MLLMModule(**MICRO_MODEL, metrics=["BLEU"]), counter, limit_val_batches=0)
    assert counter.steps == 2


def _setup(module: MLLMModule, stage: str) -> None:
    module.trainer = SimpleNamespace(strategy=SingleDeviceStrategy(), limit_val_batches=1.0)
    module.setup(stage)


def test_spice_asked_for_without_its_jars_fails_at_setup(monkeypatch) -> None:
    jar = Path("/nowhere/stanford-corenlp-3.6.0.jar")
    monkeypatch.setattr(java, "missing_spice_jars", lambda: [jar])
    module = MLLMModule(**MICRO_MODEL, metrics=["CIDEr", "SPICE"])
    for stage in ("fit", "validate", "test"):
        with pytest.raises(FileNotFoundError, match="asks for SPICE.*remove SPICE"):
            _setup(module, stage)


def test_default_metrics_drop_spice_without_its_jars_with_one_warning(monkeypatch, caplog) -> None:
    jar = Path("/nowhere/stanford-corenlp-3.6.0.jar")
    monkeypatch.setattr(java, "missing_spice_jars", lambda: [jar])
    module = MLLMModule(**MICRO_MODEL)  # metrics: the default list, SPICE included
    with caplog.at_level(logging.WARNING, logger="lit_mllm.module"):
        _setup(module, "fit")
    assert module.caption_metric().scorer.metrics == ("BLEU", "METEOR", "ROUGE_L", "CIDEr")
    warnings = [r.getMessage() for r in caplog.records if "SPICE" in r.getMessage()]
    assert len(warnings) == 1 and "stanford-corenlp-3.6.0.jar" in warnings[0]


def _save_decoder(folder: Path, vocab_size: int) -> Path:
    settings = {k: v for k, v in MICRO_DECODER_CONFIG.items() if k != "model_type"}
    config = AutoConfig.for_model("qwen2", **settings, vocab_size=vocab_size)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


def test_decoder_of_another_model_family_fails_when_the_module_is_built(tmp_path: Path) -> None:
    """The tiny tokenizer has 1024 base tokens: a 512-row decoder cannot be its model (its
    embeddings would silently grow); a larger decoder is normal (padded vocabularies)."""
    small = _save_decoder(tmp_path / "small", 512)
    decoder = {"name_or_path": str(small), "config": None}
    with pytest.raises(ValueError, match="512 token embeddings.*base vocabulary of 1024"):
        MLLMModule(**{**MICRO_MODEL, "decoder": decoder})
    large = _save_decoder(tmp_path / "large", 1100)
    module = MLLMModule(**{**MICRO_MODEL, "decoder": {"name_or_path": str(large), "config": None}})
    assert module.model.decoder.get_input_embeddings().weight.shape[0] == 1100
