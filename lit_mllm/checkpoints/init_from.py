"""``model.init_from``: start a run from another run's weights (e.g. stage 2 from stage 1).

Only tensors of the same name and shape are taken. One of the same name but another shape (a
checkpoint of another width, another number of queries) is an error unless not ``strict``,
since the run would otherwise silently start half from scratch.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

from torch import Tensor, nn

from lit_mllm.checkpoints.safe_load import load_checkpoint_file

__all__ = ["load_init_weights", "matching_weights", "read_init_weights"]

log = logging.getLogger(__name__)


def read_init_weights(path: str | Path) -> dict[str, Tensor]:
    """The state dict of a training checkpoint (or a bare saved state dict), checksums first."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"init_from: checkpoint {str(path)!r} does not exist")
    try:
        checkpoint = load_checkpoint_file(path, require_state_dict=False)
    except Exception as error:
        raise ValueError(
            f"init_from: {str(path)!r} is not a readable checkpoint: {error}"
        ) from None
    return checkpoint.get("state_dict", checkpoint)


def matching_weights(
    state: Mapping[str, Tensor], own: Mapping[str, Tensor], *, source: str, strict: bool = True
) -> tuple[dict[str, Tensor], list[str]]:
    """The entries of ``state`` that fit ``own`` (the model's state dict), and the skipped ones
    of another shape as ``"name (checkpoint shape) -> (model shape)"`` (empty when ``strict``:
    then they are an error). ``source`` names the checkpoint in errors."""
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    mismatched = [
        f"{k} {tuple(v.shape)} -> {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and own[k].shape != v.shape
    ]
    if mismatched and strict:
        raise ValueError(
            f"init_from: {len(mismatched)} tensors of {source!r} have another shape in this "
            f"model (checkpoint -> model): {mismatched}. Use a checkpoint of the same "
            "configuration, or set `model.init_from_strict: false` to start those from "
            "their fresh initialisation."
        )
    if not usable:
        raise ValueError(f"init_from: {source!r} shares no weights with this model")
    return usable, mismatched


def load_init_weights(model: nn.Module, path: str | Path, strict: bool = True) -> None:
    """Load the matching weights of checkpoint ``path`` into ``model``; with ``strict`` off,
    weights of another shape keep their fresh initialisation and are named in a WARNING."""
    state = read_init_weights(path)
    usable, skipped = matching_weights(state, model.state_dict(), source=str(path), strict=strict)
    if skipped:
        log.warning(
            "init_from %s: skipped %d tensors of another shape (checkpoint -> model), "
            "they keep their fresh initialisation: %s",
            path,
            len(skipped),
            skipped,
        )
    model.load_state_dict(usable, strict=False)
    log.info("init_from %s: loaded %d of %d tensors", path, len(usable), len(state))
