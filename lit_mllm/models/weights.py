"""Encoder weight files: where they are (local path, packaged asset, HF cache) and strict loading.

A wrong or partial file must never leave random weights behind silently: every load is strict,
after timm's own key conversion for the architecture.
"""

from __future__ import annotations

import importlib
import os
from importlib import resources
from pathlib import Path

import timm
from torch import nn

from lit_mllm.hub import cached_file

__all__ = [
    "TINY_ENCODER",
    "load_timm_weights",
    "resolve_hub_checkpoint",
    "resolve_local_checkpoint",
]

TINY_ENCODER = "tiny"
# Weight files looked for inside a directory, in order of preference.
_DIR_CANDIDATES = (
    "model.safetensors",
    "open_clip_model.safetensors",
    "pytorch_model.bin",
    "open_clip_pytorch_model.bin",
)
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")


def _hub_filenames(hf_hub_filename: str | None) -> list[str]:
    """Files timm would fetch for a hub id: the safetensors alternative first, like timm."""
    if not hf_hub_filename:
        return ["model.safetensors", "pytorch_model.bin"]
    names = [hf_hub_filename]
    if hf_hub_filename == "open_clip_pytorch_model.bin":
        names.insert(0, "open_clip_model.safetensors")
    elif hf_hub_filename.endswith(".bin"):
        names.insert(0, hf_hub_filename[:-4] + ".safetensors")
    return names


def resolve_hub_checkpoint(model_name: str) -> Path:
    """The pretrained weight file of a timm model, from the local HF hub cache (never fetched)."""
    cfg = timm.models.get_pretrained_cfg(model_name)
    if cfg is None or not cfg.hf_hub_id:
        raise ValueError(
            f"timm model {model_name!r} has no Hugging Face hub weights registered; pass "
            "`checkpoint_path: /path/to/model.safetensors` (or pretrained: false)."
        )
    repo_id, _, revision = cfg.hf_hub_id.partition("@")
    try:
        return cached_file(
            repo_id, _hub_filenames(cfg.hf_hub_filename), "encoder weights", revision or None
        )
    except FileNotFoundError as error:
        raise FileNotFoundError(
            f"pretrained weights of timm model {model_name!r}: {error} Or set "
            "`model.encoder.checkpoint_path: /path/to/model.safetensors`."
        ) from None


def resolve_local_checkpoint(checkpoint_path: str | os.PathLike) -> Path:
    """A weight file, or the one weight file inside a directory (HF snapshot dirs included);
    ``tiny`` names the packaged tiny encoder (pretrained by ``lit-mllm-clip``)."""
    if str(checkpoint_path) == TINY_ENCODER:
        return tiny_encoder_file()
    path = Path(checkpoint_path).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        for name in _DIR_CANDIDATES:
            if (path / name).is_file():
                return path / name
        found = sorted(p for p in path.iterdir() if p.suffix in _WEIGHT_SUFFIXES and p.is_file())
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise ValueError(
                f"checkpoint_path {str(path)!r} holds several weight files "
                f"({[p.name for p in found]}); point checkpoint_path at one of them."
            )
        raise FileNotFoundError(
            f"checkpoint_path {str(path)!r} is a directory without a weight file "
            f"(looked for {list(_DIR_CANDIDATES)} or one *{'/*'.join(_WEIGHT_SUFFIXES)} file)."
        )
    raise FileNotFoundError(
        f"checkpoint_path {str(path)!r} does not exist; give a .safetensors/.bin/.pth state dict "
        "file or a directory containing one."
    )


def load_timm_weights(model: nn.Module, file: Path, model_name: str) -> None:
    """Load a state dict strictly, after timm's own key conversion for the architecture.

    timm's ``pretrained=True`` path loads non-strictly whenever ``num_classes`` changes, which
    would silently keep random weights for a wrong file; here any mismatch is an error.
    """
    if file.suffix not in _WEIGHT_SUFFIXES:
        raise ValueError(
            f"Unsupported checkpoint file {str(file)!r}: expected one of {list(_WEIGHT_SUFFIXES)}."
        )
    try:  # torch.load with weights_only=True inside timm for non-safetensors files
        state = timm.models.load_state_dict(str(file), weights_only=True)
    except Exception as err:
        raise ValueError(
            f"Could not read checkpoint {str(file)!r} for {model_name!r}: "
            f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"
        ) from None
    filter_fn = getattr(
        importlib.import_module(type(model).__module__), "checkpoint_filter_fn", None
    )
    if filter_fn is not None:  # e.g. OpenAI/OpenCLIP key layout -> timm, pos-embed resampling
        try:
            state = filter_fn(state, model)
        except Exception as err:
            raise ValueError(
                f"Checkpoint {str(file)!r} does not fit timm model {model_name!r} "
                f"({type(err).__name__}: {str(err)[:300]})."
            ) from None
    own = model.state_dict()
    # The classifier head is removed (num_classes=0): its weights are expected extras.
    heads = getattr(model, "pretrained_cfg", {}).get("classifier") or ()
    heads = (heads,) if isinstance(heads, str) else tuple(heads)
    state = {
        k: v for k, v in state.items() if k in own or not any(k.startswith(h + ".") for h in heads)
    }
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shape = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or shape:
        detail = "; ".join(
            f"{label} ({len(keys)}): {keys[:8]}{' ...' if len(keys) > 8 else ''}"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape", shape))
            if keys
        )
        raise ValueError(
            f"Checkpoint {str(file)!r} does not match timm model {model_name!r} with the given "
            f"model_kwargs: {detail}. Check model_name/model_kwargs or the file."
        )
    model.load_state_dict(state, strict=True)


def tiny_encoder_file() -> Path:
    """The packaged tiny encoder (``lit_mllm/assets/tiny_encoder``; NOTE.md there says how it
    was made)."""
    path = Path(str(resources.files("lit_mllm") / "assets" / "tiny_encoder" / "model.safetensors"))
    if not path.is_file():
        raise FileNotFoundError(
            f"the packaged tiny encoder is missing ({path}); reinstall lit-mllm, or train one with "
            "`lit-mllm-clip fit --config configs/clip/tiny_encoder.yaml` and point "
            "model.encoder.checkpoint_path at its model.safetensors"
        )
    return path
