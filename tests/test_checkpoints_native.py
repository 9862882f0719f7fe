"""The native export format (lit_mllm.checkpoints.native): a module round-trips through it with
equal outputs; the format alone (no module) keeps tied weights, dtypes and its checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from export_models import inputs, micro_module, our_logits
from safetensors.torch import load_file
from torch import nn

from lit_mllm.checkpoints.native import (
    NativeFolder,
    load_native_weights,
    read_native,
    write_native,
)
from lit_mllm.export import load_pretrained, save_pretrained

# -- through the module (lit_mllm.export) -------------------------------------------------------


@pytest.mark.parametrize("train", ["full", "lora"])
def test_native_folder_round_trips_with_equal_outputs(tmp_path, train) -> None:
    module = micro_module("resampler", train=train)
    save_pretrained(module, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["weights"] == "all" and config["num_image_tokens"] == 4
    assert (tmp_path / "tokenizer.json").is_file()
    stored = load_file(tmp_path / "model.safetensors")
    assert any(k.startswith("model.encoder.") for k in stored)  # frozen weights included

    restored = load_pretrained(tmp_path)
    assert restored.num_image_tokens == module.num_image_tokens
    assert restored.model.image_token_ids == module.model.image_token_ids
    for name, value in module.state_dict().items():
        assert torch.equal(value, restored.state_dict()[name]), name
    args = inputs(module)
    assert torch.equal(our_logits(module, *args), our_logits(restored, *args))


def test_trainable_only_export_needs_rebuildable_frozen_weights(tmp_path) -> None:
    with pytest.raises(ValueError, match="randomly initialised"):
        save_pretrained(micro_module("resampler"), tmp_path, include_frozen=False)


def test_load_pretrained_names_a_folder_that_is_not_an_export(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        load_pretrained(tmp_path)


# -- the format alone -----------------------------------------------------------------------------
class Tokenizer:
    """Stands in for a tokenizer: the format only calls ``save_pretrained``."""

    def save_pretrained(self, folder: str) -> None:
        (Path(folder) / "tokenizer.json").write_text("{}")


class Tiny(nn.Module):
    """A frozen 'encoder', a trainable 'connector' and a decoder whose head is tied."""

    def __init__(self) -> None:
        super().__init__()
        self.model = nn.ModuleDict(
            {
                "encoder": nn.Linear(2, 3),
                "connector": nn.Linear(3, 3),
                "decoder": nn.ModuleDict({"embed": nn.Embedding(5, 3), "head": nn.Linear(3, 5)}),
            }
        )
        self.model["decoder"]["head"].weight = self.model["decoder"]["embed"].weight
        self.model["encoder"].requires_grad_(False)


HPARAMS = {
    "tokenizer": "tiny",
    "encoder": {"name": "vit", "pretrained": True, "checkpoint_path": None},
    "decoder": {"name_or_path": "some/decoder", "config": None},
    "optim": {"betas": [0.9, 0.95]},
}
DECODER_CONFIG = {"hidden_size": 3, "architectures": ["X"], "torch_dtype": "float32"}


def write(folder: Path, model: nn.Module, **kwargs) -> Path:
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    return write_native(
        folder,
        model.state_dict(),
        trainable=trainable,
        hyper_parameters=HPARAMS,
        decoder_config=DECODER_CONFIG,
        tokenizer=Tokenizer(),
        num_image_tokens=7,
        **kwargs,
    )


def test_tied_weights_and_settings_survive_the_format(tmp_path) -> None:
    torch.manual_seed(0)
    model = Tiny()
    write(tmp_path, model)
    config = json.loads((tmp_path / "config.json").read_text())
    assert (config["format"], config["format_version"], config["weights"]) == ("lit-mllm", 1, "all")
    assert config["aliases"] == {"model.decoder.head.weight": "model.decoder.embed.weight"}
    assert config["num_image_tokens"] == 7 and config["decoder_config"] == DECODER_CONFIG
    assert (tmp_path / "tokenizer.json").is_file()

    folder = read_native(tmp_path)
    state = folder.state_dict
    assert folder.complete and state.keys() == model.state_dict().keys()
    assert state["model.decoder.head.weight"] is state["model.decoder.embed.weight"]
    hparams = folder.hyper_parameters
    assert hparams["tokenizer"] == str(tmp_path) and hparams["init_from"] is None
    assert hparams["encoder"]["pretrained"] is False and hparams["decoder"]["name_or_path"] is None
    assert hparams["decoder"]["config"] == {"hidden_size": 3}  # no transformers bookkeeping
    assert hparams["optim"]["betas"] == (0.9, 0.95)
    assert HPARAMS["encoder"]["pretrained"] is True  # the caller's settings are not changed

    fresh = Tiny()
    load_native_weights(fresh, folder)
    for name, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], value), name


def test_a_cast_export_loads_in_the_models_dtype(tmp_path) -> None:
    torch.manual_seed(0)
    model = Tiny()
    write(tmp_path, model, dtype="bfloat16")
    folder = read_native(tmp_path)
    assert all(v.dtype == torch.bfloat16 for v in folder.state_dict.values())
    fresh = Tiny()
    load_native_weights(fresh, folder)
    for name, value in model.state_dict().items():
        assert fresh.state_dict()[name].dtype == torch.float32, name
        assert torch.equal(fresh.state_dict()[name], value.bfloat16().float()), name


def test_a_trainable_only_folder_keeps_sources_and_only_needs_trained_weights(tmp_path) -> None:
    model = Tiny()
    write(tmp_path, model, include_frozen=False)
    folder = read_native(tmp_path)
    assert not folder.complete
    # the tied head weight is the embedding: one trained parameter, stored once
    assert set(folder.state_dict) == {
        "model.connector.weight",
        "model.connector.bias",
        "model.decoder.embed.weight",
        "model.decoder.head.bias",
    }
    assert folder.hyper_parameters["decoder"]["name_or_path"] == "some/decoder"
    load_native_weights(Tiny(), folder)  # the frozen encoder comes from its source

    lacking = {k: v for k, v in folder.state_dict.items() if k != "model.connector.bias"}
    with pytest.raises(ValueError, match=r"missing \['model.connector.bias'\]"):
        load_native_weights(Tiny(), NativeFolder(tmp_path, {}, lacking, complete=False))
    extra = {**folder.state_dict, "model.other.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"unexpected \['model.other.weight'\]"):
        load_native_weights(Tiny(), NativeFolder(tmp_path, {}, extra, complete=False))


def test_a_folder_of_another_format_is_refused(tmp_path) -> None:
    write(tmp_path, Tiny())
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "format": "other"}))
    with pytest.raises(ValueError, match="is not a lit-mllm config"):
        read_native(tmp_path)
