"""`lit-mllm-export`: LLaVA folders give the same logits in transformers; native folders round-trip."""

from __future__ import annotations

import json

import lightning as L
import numpy as np
import pytest
import torch
from micro import MICRO_DECODER_CONFIG
from PIL import Image
from safetensors.torch import load_file

from lit_mllm.export import load_checkpoint, load_pretrained, main, save_pretrained, to_llava
from lit_mllm.module import MLLMModule

MICRO_DECODER = MICRO_DECODER_CONFIG
CLIP_VIT = {"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 3, "num_heads": 2}


def micro_module(connector: str, train: str = "full", act: str | None = None) -> MLLMModule:
    """A micro model whose every weight is perturbed, so no zero bias or unit norm hides a bug."""
    torch.manual_seed(0)
    vit = dict(CLIP_VIT, **({"act_layer": act} if act else {}))
    module = MLLMModule(
        tokenizer="tiny",
        encoder={"name": "vit_base_patch16_clip_224", "model_kwargs": vit, "feature_layer": -2},
        connector={"kind": connector, "num_queries": 4},
        decoder={"config": MICRO_DECODER, "train": train},
    )
    with torch.no_grad():
        for param in module.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return module.eval()


def inputs(module: MLLMModule) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two rows, the second left-padded, each with one image block."""
    ids = module.model.image_token_ids
    row = [ids.start] + [ids.patch] * module.num_image_tokens + [ids.end, 10, 20, 30, 40]
    pad = module.tokenizer.pad_token_id
    input_ids = torch.tensor([row, [pad, pad] + row[:-2]])
    mask = torch.ones_like(input_ids)
    mask[1, :2] = 0
    torch.manual_seed(1)
    return input_ids, mask, torch.randn(2, 3, 32, 32)


@torch.no_grad()
def our_logits(module: MLLMModule, input_ids, mask, pixels) -> torch.Tensor:
    embeds = module.model.embed(input_ids, pixels)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    return module.model.decoder(
        inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids
    ).logits


def write_checkpoint(module: MLLMModule, path) -> None:
    trainer = L.Trainer(logger=False, enable_checkpointing=False, max_steps=0, accelerator="cpu")
    trainer.strategy.connect(module)
    trainer.save_checkpoint(path)


@pytest.mark.parametrize(
    ("act", "train"), [(None, "full"), ("quick_gelu", "lora")], ids=["gelu", "quickgelu-lora"]
)
def test_llava_export_gives_the_same_logits_in_transformers(tmp_path, act, train) -> None:
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    module = micro_module("mlp", train=train, act=act)
    to_llava(module, tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    llava = LlavaForConditionalGeneration.from_pretrained(tmp_path).eval()
    config = llava.config
    assert config.vision_feature_layer == -2 and config.vision_feature_select_strategy == "default"
    assert config.image_token_index == module.model.image_token_ids.patch
    assert config.vision_config.hidden_act == (act or "gelu")

    input_ids, mask, pixels = inputs(module)
    with torch.no_grad():
        theirs = llava(
            input_ids=input_ids,
            pixel_values=pixels,
            attention_mask=mask,
            position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
        ).logits
    ours = our_logits(module, input_ids, mask, pixels)
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)

    # the processor expands one <im_patch> into the image's token count and sizes the pixels
    processor = AutoProcessor.from_pretrained(tmp_path)
    image = Image.fromarray(np.full((48, 40, 3), 127, dtype=np.uint8))
    batch = processor(text="<im_start><im_patch><im_end> a cat", images=image, return_tensors="pt")
    assert list(batch["pixel_values"].shape[-2:]) == [32, 32]
    patch = module.model.image_token_ids.patch
    assert int((batch["input_ids"][0] == patch).sum()) == module.num_image_tokens == 16


def test_llava_export_refuses_what_llava_cannot_express(tmp_path) -> None:
    with pytest.raises(ValueError, match="MLP connector"):
        to_llava(micro_module("resampler"), tmp_path)
    module = micro_module("mlp")
    module.model.encoder.feature_layer = -1
    with pytest.raises(ValueError, match="feature_layer"):
        to_llava(module, tmp_path)


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


def test_cli_exports_a_lightning_checkpoint_in_both_formats(tmp_path, capsys) -> None:
    from transformers import LlavaForConditionalGeneration

    module = micro_module("mlp", train="lora")
    write_checkpoint(module, tmp_path / "run.ckpt")
    reloaded = load_checkpoint(tmp_path / "run.ckpt")
    for name, value in module.state_dict().items():
        assert torch.equal(value, reloaded.state_dict()[name]), name

    ckpt = ["--ckpt", str(tmp_path / "run.ckpt")]
    assert main([*ckpt, "--out", str(tmp_path / "native")]) == 0
    assert main([*ckpt, "--out", str(tmp_path / "hf"), "--format", "llava"]) == 0
    assert "wrote llava export" in capsys.readouterr().out
    args = inputs(module)
    expected = our_logits(module, *args)
    assert torch.equal(our_logits(load_pretrained(tmp_path / "native"), *args), expected)
    llava = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    input_ids, mask, pixels = args
    with torch.no_grad():
        logits = llava(
            input_ids=input_ids,
            pixel_values=pixels,
            attention_mask=mask,
            position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
        ).logits
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)


def test_cli_names_a_missing_checkpoint(tmp_path, capsys) -> None:
    assert main(["--ckpt", str(tmp_path / "nope.ckpt"), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err == f"lit-mllm-export: error: checkpoint {str(tmp_path / 'nope.ckpt')!r} not found\n"
