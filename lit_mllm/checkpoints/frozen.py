"""Which weights a checkpoint or export keeps: trainable ones, and frozen ones only when needed.

A frozen encoder or decoder loaded from a source (timm weights, a transformers folder or hub id)
is rebuilt from that source when the model is built again, so storing it would only copy
gigabytes; a randomly initialised one cannot be rebuilt and must be stored. Pure functions over
state-dict names and the module's hyper-parameters (``encoder``, ``decoder`` as dicts), so the
LightningModule and the export formats share one rule.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any, Literal

from torch import Tensor, nn

__all__ = [
    "FROZEN_PREFIXES",
    "kept_weights",
    "parts_to_keep",
    "require_trainable",
    "trainable_names",
    "unrebuildable_parts",
]

ENCODER_PREFIX = "model.encoder."
DECODER_PREFIX = "model.decoder."
FROZEN_PREFIXES = (ENCODER_PREFIX, DECODER_PREFIX)
_WRAPPERS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def trainable_names(model: nn.Module) -> set[str]:
    """State-dict names of the trainable parameters; FSDP, activation-checkpointing and
    ``torch.compile`` wrappers stripped, since state dicts do not carry them."""
    names = set()
    for name, param in model.named_parameters():
        if param.requires_grad:
            for wrapper in _WRAPPERS:
                name = name.replace(wrapper, "")
            names.add(name)
    return names


def unrebuildable_parts(hyper_parameters: Mapping[str, Any]) -> tuple[str, ...]:
    """Prefixes of the frozen parts that have no source to rebuild them from (random init)."""
    encoder = hyper_parameters.get("encoder") or {}
    decoder = hyper_parameters.get("decoder") or {}
    parts = []
    if not (encoder.get("pretrained") or encoder.get("checkpoint_path")):
        parts.append(ENCODER_PREFIX)
    if not decoder.get("name_or_path"):
        parts.append(DECODER_PREFIX)
    return tuple(parts)


def parts_to_keep(
    save_frozen: Literal["auto", "always", "never"], hyper_parameters: Mapping[str, Any]
) -> tuple[str, ...]:
    """Prefixes of the frozen parts a training checkpoint stores (``model.save_frozen``)."""
    if save_frozen == "always":
        return FROZEN_PREFIXES
    if save_frozen == "never":
        return ()
    return unrebuildable_parts(hyper_parameters)


def kept_weights(
    state: Mapping[str, Tensor], trainable: Collection[str], keep: tuple[str, ...] = ()
) -> dict[str, Tensor]:
    """``state`` without the frozen encoder/decoder entries (buffers included) outside ``keep``;
    every other entry (trainable, connector) stays, in its order."""
    return {
        name: value
        for name, value in state.items()
        if name in trainable
        or not name.startswith(FROZEN_PREFIXES)
        or (keep and name.startswith(keep))
    }


def require_trainable(saved: Collection[str], own: Collection[str], trainable: set[str]) -> None:
    """Refuse a checkpoint that lacks trainable weights of this model: they would silently keep
    their fresh initialisation."""
    missing = sorted(trainable & (set(own) - set(saved)))
    if missing:
        raise ValueError(
            f"checkpoint lacks {len(missing)} trainable weights, e.g. {missing[:3]}: it was "
            "written for a different model configuration"
        )
