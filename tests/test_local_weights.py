"""Weights from local files (the offline path of real recipes): timm encoder and HF decoder folders.

The test writes the files itself: a timm state dict as safetensors and a `save_pretrained`
decoder folder, both taken from a reference module, then builds a second module from those
paths and requires identical weights and outputs.
"""

from __future__ import annotations

import pytest
import torch
from micro import MICRO_DECODER_CONFIG
from safetensors.torch import load_file, save_file

from lit_mllm.export import load_pretrained, save_pretrained
from lit_mllm.module import MLLMModule

VIT = {"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 2}
ENCODER = {"name": "vit_base_patch16_clip_224", "model_kwargs": VIT, "feature_layer": -2}
DECODER_CONFIG = MICRO_DECODER_CONFIG


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """A reference module and its encoder/decoder written as local weight files."""
    root = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    reference = MLLMModule(
        tokenizer="tiny",
        encoder=ENCODER,
        connector={"kind": "resampler", "num_queries": 4},
        decoder={"config": DECODER_CONFIG, "train": "frozen"},
    ).eval()
    with torch.no_grad():  # no init-time constant (zero bias, unit norm) may hide a load bug
        for param in reference.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    encoder_dir = root / "vit"
    encoder_dir.mkdir()
    save_file(
        {k: v.contiguous() for k, v in reference.model.encoder.model.state_dict().items()},
        str(encoder_dir / "model.safetensors"),
    )
    reference.model.decoder.save_pretrained(root / "decoder")
    return reference, encoder_dir, root / "decoder"


def from_files(encoder_path, decoder_path, **decoder) -> MLLMModule:
    torch.manual_seed(123)  # different random init: anything not loaded would differ
    return MLLMModule(
        tokenizer="tiny",
        encoder={**ENCODER, "checkpoint_path": str(encoder_path)},
        connector={"kind": "resampler", "num_queries": 4},
        decoder={"name_or_path": str(decoder_path), "config": None, **decoder},
    ).eval()


@torch.no_grad()
def logits(module: MLLMModule) -> torch.Tensor:
    ids = module.model.image_token_ids
    row = [ids.start] + [ids.patch] * module.num_image_tokens + [ids.end, 11, 12, 13]
    torch.manual_seed(2)
    pixels = torch.randn(1, 3, 32, 32)
    embeds = module.model.embed(torch.tensor([row]), pixels)
    return module.model.decoder(inputs_embeds=embeds).logits


@pytest.mark.parametrize("encoder_as", ["file", "dir"])
def test_local_encoder_and_decoder_give_identical_weights_and_outputs(sources, encoder_as) -> None:
    reference, encoder_dir, decoder_dir = sources
    encoder_path = encoder_dir / "model.safetensors" if encoder_as == "file" else encoder_dir
    module = from_files(encoder_path, decoder_dir, train="frozen")
    module.model.connector.load_state_dict(reference.model.connector.state_dict())
    own = module.state_dict()
    for name, value in reference.state_dict().items():
        assert torch.equal(value, own[name]), name
    assert torch.equal(logits(module), logits(reference))


def test_a_loaded_decoder_keeps_hub_kernels_off(sources) -> None:
    """transformers >= 5.25 kernelizes a loaded model by default (layers swapped for kernels
    fetched from the hub on CUDA): the project's decoder keeps its own layers, offline too."""
    _, encoder_dir, decoder_dir = sources
    module = from_files(encoder_dir, decoder_dir, train="frozen")
    assert module.model.decoder.use_kernels is False


def test_trainable_only_export_reloads_frozen_parts_from_local_sources(sources, tmp_path) -> None:
    _, encoder_dir, decoder_dir = sources
    module = from_files(encoder_dir, decoder_dir, train="lora")
    with torch.no_grad():
        for name, param in module.named_parameters():
            if "lora_B" in name:  # zero at init: make the adapters matter
                param.add_(torch.randn_like(param) * 0.05)
    save_pretrained(module, tmp_path, include_frozen=False)
    stored = load_file(tmp_path / "model.safetensors")
    trained = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trained <= set(stored)
    assert not any(k.startswith("model.encoder.") for k in stored)
    assert not any(k.startswith("model.decoder.") and k not in trained for k in stored)
    restored = load_pretrained(tmp_path)
    assert torch.equal(logits(restored), logits(module))


def test_missing_encoder_file_names_the_path(sources, tmp_path) -> None:
    _, _, decoder_dir = sources
    missing = tmp_path / "no_such_vit.safetensors"
    with pytest.raises(FileNotFoundError, match="no_such_vit.safetensors"):
        from_files(missing, decoder_dir)


def test_encoder_dir_without_weights_names_the_path(sources, tmp_path) -> None:
    _, _, decoder_dir = sources
    (tmp_path / "empty_vit").mkdir()
    with pytest.raises(FileNotFoundError, match="empty_vit"):
        from_files(tmp_path / "empty_vit", decoder_dir)


def test_missing_decoder_folder_names_the_path(sources, tmp_path) -> None:
    _, encoder_dir, _ = sources
    with pytest.raises(FileNotFoundError, match="no_such_decoder"):
        from_files(encoder_dir, tmp_path / "no_such_decoder")


def test_missing_tokenizer_folder_names_the_path(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="no_such_tokenizer"):
        MLLMModule(preset="micro", tokenizer=str(tmp_path / "no_such_tokenizer"))


def test_wrong_encoder_file_is_refused_not_silently_random(sources, tmp_path) -> None:
    _, encoder_dir, decoder_dir = sources
    state = load_file(encoder_dir / "model.safetensors")
    del state["blocks.1.mlp.fc2.weight"]
    save_file(state, str(tmp_path / "partial.safetensors"))
    with pytest.raises(ValueError, match="missing"):
        from_files(tmp_path / "partial.safetensors", decoder_dir)
