"""``init_from`` weights (lit_mllm.checkpoints.init_from): read with checksums, taken by name and
shape; another shape is an error unless not strict (tests/test_init_from.py: through the module)."""

from __future__ import annotations

import pytest
import torch

from lit_mllm.checkpoints.init_from import matching_weights, read_init_weights

OWN = {"a": torch.zeros(2, 3), "b": torch.zeros(4)}


def test_weights_of_another_shape_are_an_error_or_skipped() -> None:
    state = {"a": torch.ones(2, 3), "b": torch.ones(5), "c": torch.ones(1)}
    with pytest.raises(ValueError, match=r"1 tensors of 'x.ckpt'.*\['b \(5,\) -> \(4,\)'\]"):
        matching_weights(state, OWN, source="x.ckpt")
    usable, skipped = matching_weights(state, OWN, source="x.ckpt", strict=False)
    assert list(usable) == ["a"] and torch.equal(usable["a"], state["a"])
    assert skipped == ["b (5,) -> (4,)"]


def test_a_checkpoint_sharing_no_weights_is_an_error() -> None:
    with pytest.raises(ValueError, match="'x.ckpt' shares no weights"):
        matching_weights({"c": torch.ones(1)}, OWN, source="x.ckpt")


def test_read_takes_a_training_checkpoint_or_a_bare_state_dict(tmp_path) -> None:
    torch.save({"state_dict": OWN, "global_step": 3}, tmp_path / "run.ckpt")
    torch.save(OWN, tmp_path / "bare.pt")
    for name in ("run.ckpt", "bare.pt"):
        state = read_init_weights(tmp_path / name)
        assert state.keys() == OWN.keys() and all(torch.equal(state[k], OWN[k]) for k in OWN)
    with pytest.raises(FileNotFoundError, match="init_from: checkpoint .*nope.ckpt"):
        read_init_weights(tmp_path / "nope.ckpt")
    (tmp_path / "text.ckpt").write_text("model: tiny\n")
    with pytest.raises(ValueError, match="init_from: .*text.ckpt' is not a readable checkpoint"):
        read_init_weights(tmp_path / "text.ckpt")
