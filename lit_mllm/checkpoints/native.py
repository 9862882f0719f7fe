"""The native export format: a folder that lit-mllm rebuilds a model from, and nothing else.

``config.json`` (format name and version, which weights are stored, tied-weight aliases, the
image-token count, the module's hyper-parameters and the decoder's transformers config),
``model.safetensors`` and the tokenizer files. Format logic only, over state dicts and settings:
the caller builds the module (``MLLMModule(**folder.hyper_parameters)``), so this file never
imports it and the module can use it.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from lit_mllm.checkpoints.frozen import kept_weights, trainable_names, unrebuildable_parts
from lit_mllm.checkpoints.safe_load import refuse_remote_code

__all__ = [
    "CONFIG_FILE",
    "DTYPES",
    "DType",
    "WEIGHTS_FILE",
    "NativeFolder",
    "load_native_weights",
    "read_native",
    "write_native",
]

FORMAT_NAME = "lit-mllm"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DType = Literal["float32", "bfloat16", "float16"]
# transformers writes these into a config; as DecoderConfig.config they would clash or mislead
_NOT_DECODER_SETTINGS = {
    "architectures",
    "transformers_version",
    "dtype",
    "torch_dtype",
    "_name_or_path",
}


@dataclass(frozen=True)
class NativeFolder:
    """A native folder read back: enough to build the module and load its weights."""

    path: Path
    hyper_parameters: dict[str, Any]  # the module's arguments, pointing at this folder
    state_dict: dict[str, Tensor]  # tied-weight aliases filled in
    complete: bool  # every weight stored, frozen ones included (else rebuilt from sources)


def _without_aliases(state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """safetensors refuses tensors sharing memory (tied embeddings): keep one, record the rest."""
    kept: dict[str, Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[int, int, tuple[int, ...]], str] = {}
    for name, tensor in state.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        kept[name] = tensor.detach().contiguous()
    return kept, aliases


def write_native(
    out_dir: str | Path,
    state_dict: Mapping[str, Tensor],
    *,
    trainable: Collection[str],
    hyper_parameters: Mapping[str, Any],
    decoder_config: Mapping[str, Any],
    tokenizer: Any,
    num_image_tokens: int,
    include_frozen: bool = True,
    dtype: DType | None = None,
) -> Path:
    """Write ``config.json``, ``model.safetensors`` and the tokenizer to ``out_dir``.

    ``trainable``: state-dict names of the trained weights; ``decoder_config``: the base
    decoder's transformers config as a dict; ``tokenizer``: anything with ``save_pretrained``.
    ``include_frozen=False`` leaves out the frozen encoder/decoder weights; loading then rebuilds
    them from the sources in the hyper-parameters (refused when those are random-init).
    """
    if not include_frozen and unrebuildable_parts(hyper_parameters):
        raise ValueError(
            "include_frozen=False needs frozen weights that can be rebuilt from their source, but "
            "this model's encoder or decoder is randomly initialised; export all weights"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = dict(state_dict) if include_frozen else kept_weights(state_dict, trainable)
    if dtype is not None:
        state = {k: v.to(DTYPES[dtype]) if v.is_floating_point() else v for k, v in state.items()}
    tensors, aliases = _without_aliases(state)
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    config = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "weights": "all" if include_frozen else "trainable",
        "aliases": aliases,
        "num_image_tokens": num_image_tokens,
        "hyper_parameters": dict(hyper_parameters),
        "decoder_config": dict(decoder_config),
    }
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2, default=list))
    tokenizer.save_pretrained(str(out))
    return out


def read_native(
    directory: str | Path,
    map_location: str | torch.device = "cpu",
    *,
    trust_remote_code: bool = False,
) -> NativeFolder:
    """Read a folder written by :func:`write_native`.

    The hyper-parameters come back ready to build the module from: the folder's own tokenizer,
    no ``init_from``, and when every weight is stored no source weights to read (a random-init
    decoder of the saved config). ``trust_remote_code``: allow a folder whose decoder setting
    runs remote code.
    """
    folder = Path(directory)
    config_file = folder / CONFIG_FILE
    if not config_file.is_file() or not (folder / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(
            f"{str(folder)!r} is not a lit-mllm export: expected {CONFIG_FILE} and "
            f"{WEIGHTS_FILE} in it (write one with `lit-mllm-export --format native`)"
        )
    config = json.loads(config_file.read_text())
    if config.get("format") != FORMAT_NAME:
        raise ValueError(f"{str(config_file)!r} is not a lit-mllm config (format != 'lit-mllm')")
    hparams = copy.deepcopy(config["hyper_parameters"])
    refuse_remote_code(
        hparams, str(config_file), allowed=trust_remote_code, how="pass trust_remote_code=True"
    )
    hparams["init_from"] = None
    hparams["tokenizer"] = str(folder)  # the saved tokenizer, image tokens included
    complete = config["weights"] == "all"
    if complete:  # self-contained: no source weights are read
        decoder = {
            k: v for k, v in config["decoder_config"].items() if k not in _NOT_DECODER_SETTINGS
        }
        hparams["encoder"].update(pretrained=False, checkpoint_path=None)
        hparams["decoder"].update(name_or_path=None, config=decoder)
    if "optim" in hparams and isinstance(hparams["optim"].get("betas"), list):
        hparams["optim"]["betas"] = tuple(hparams["optim"]["betas"])
    state = load_file(str(folder / WEIGHTS_FILE), device=str(map_location))
    for name, target in config.get("aliases", {}).items():
        state[name] = state[target]
    return NativeFolder(folder, hparams, state, complete)


def load_native_weights(model: nn.Module, folder: NativeFolder) -> None:
    """Load the folder's weights into the model built from its hyper-parameters, each cast to
    the model's dtype; refuse weights that do not fit (a stored weight the model lacks, or a
    missing one that is trained or, in a complete folder, any)."""
    own = model.state_dict()
    state = {k: v.to(own[k].dtype) if k in own else v for k, v in folder.state_dict.items()}
    result = model.load_state_dict(state, strict=False)
    trained = trainable_names(model)
    missing = [k for k in result.missing_keys if folder.complete or k in trained]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"{str(folder.path / WEIGHTS_FILE)!r} does not fit the model in {CONFIG_FILE}: "
            f"missing {missing[:3]}, unexpected {result.unexpected_keys[:3]}"
        )
