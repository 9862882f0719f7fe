"""Which weights a checkpoint keeps (lit_mllm.checkpoints.frozen): trained ones always, frozen
ones only when they cannot be rebuilt from a source, or as ``save_frozen`` says."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lit_mllm.checkpoints.frozen import (
    FROZEN_PREFIXES,
    kept_weights,
    parts_to_keep,
    require_trainable,
    trainable_names,
    unrebuildable_parts,
)

RANDOM = {"encoder": {"pretrained": False, "checkpoint_path": None}, "decoder": {}}
SOURCES = {
    "encoder": {"pretrained": False, "checkpoint_path": "vit.safetensors"},
    "decoder": {"name_or_path": "Qwen/Qwen2.5-0.5B"},
}
STATE = {
    name: torch.zeros(1)
    for name in (
        "model.encoder.w",
        "model.encoder.running_mean",
        "model.connector.w",
        "model.decoder.lora_A",
        "model.decoder.w",
    )
}
TRAINED = {"model.connector.w", "model.decoder.lora_A"}


def test_only_parts_without_a_source_must_be_stored() -> None:
    assert unrebuildable_parts(RANDOM) == FROZEN_PREFIXES
    assert unrebuildable_parts(SOURCES) == ()
    pretrained_encoder = {**RANDOM, "encoder": {"pretrained": True}}
    assert unrebuildable_parts(pretrained_encoder) == ("model.decoder.",)


@pytest.mark.parametrize(
    ("save_frozen", "hparams", "expected"),
    [
        ("auto", RANDOM, FROZEN_PREFIXES),
        ("auto", SOURCES, ()),
        ("always", SOURCES, FROZEN_PREFIXES),
        ("never", RANDOM, ()),
    ],
)
def test_save_frozen_picks_the_parts(save_frozen, hparams, expected) -> None:
    assert parts_to_keep(save_frozen, hparams) == expected


def test_kept_weights_drop_frozen_entries_outside_the_kept_parts() -> None:
    assert list(kept_weights(STATE, TRAINED)) == ["model.connector.w", "model.decoder.lora_A"]
    assert list(kept_weights(STATE, TRAINED, ("model.encoder.",))) == [
        "model.encoder.w",
        "model.encoder.running_mean",  # buffers of a kept part stay too
        "model.connector.w",
        "model.decoder.lora_A",
    ]
    assert kept_weights(STATE, TRAINED, FROZEN_PREFIXES) == STATE


def test_trainable_names_are_state_dict_names() -> None:
    inner = nn.Module()
    inner.frozen = nn.Linear(1, 1).requires_grad_(False)
    inner.trained = nn.Linear(1, 1)
    outer = nn.Module()
    outer._orig_mod = inner  # what torch.compile wraps a module in
    assert trainable_names(outer) == {"trained.weight", "trained.bias"}


def test_a_checkpoint_lacking_trained_weights_is_refused() -> None:
    require_trainable(STATE, STATE, TRAINED)
    require_trainable({"model.connector.w", "model.decoder.lora_A"}, STATE, TRAINED)
    with pytest.raises(ValueError, match=r"lacks 1 trainable weights, e.g. \['model.decoder"):
        require_trainable({"model.connector.w"}, STATE, TRAINED)
