"""`model.init_from`: tensors of another shape are an error unless `init_from_strict: false`,
which skips them with a WARNING naming each (a run must not silently start half from scratch)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from micro import MICRO_MODEL

from lit_mllm.module import MLLMModule


def _checkpoint(tmp_path: Path) -> Path:
    """Weights of a model with 9 resampler queries (the micro model has 4)."""
    torch.manual_seed(1)
    other = MLLMModule(**{**MICRO_MODEL, "connector": {"kind": "resampler", "num_queries": 9}})
    path = tmp_path / "other.ckpt"
    torch.save({"state_dict": other.state_dict()}, path)
    return path


def test_init_from_a_checkpoint_of_another_shape_is_an_error(tmp_path: Path) -> None:
    path = _checkpoint(tmp_path)
    with pytest.raises(ValueError, match=r"model.connector.query \(9, 64\) -> \(4, 64\)") as error:
        MLLMModule(**MICRO_MODEL, init_from=str(path))
    assert "init_from_strict: false" in str(error.value)


def test_init_from_not_strict_skips_them_with_a_warning(tmp_path: Path, caplog) -> None:
    path = _checkpoint(tmp_path)
    saved = torch.load(path, weights_only=True)["state_dict"]
    torch.manual_seed(0)
    fresh = MLLMModule(**MICRO_MODEL).state_dict()
    torch.manual_seed(0)
    with caplog.at_level(logging.WARNING, logger="lit_mllm.checkpoints.init_from"):
        module = MLLMModule(**MICRO_MODEL, init_from=str(path), init_from_strict=False)
    state = module.state_dict()
    skipped = [n for n in state if n in saved and saved[n].shape != state[n].shape]
    assert skipped == ["model.connector.query"]
    torch.testing.assert_close(state["model.connector.query"], fresh["model.connector.query"])
    loaded = [n for n in state if n in saved and n not in skipped]
    assert len(loaded) > 10
    for name in loaded:
        assert torch.equal(state[name], saved[name]), name
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "model.connector.query (9, 64) -> (4, 64)" in warnings[0]
