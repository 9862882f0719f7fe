"""Micro models for the export tests: every weight perturbed, inputs with an image and padding."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from micro import MICRO_DECODER_CONFIG

from lit_mllm.checkpoints.llava import to_llava
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


@torch.no_grad()
def llava_logits(llava, input_ids, mask, pixels) -> torch.Tensor:
    """Logits of a transformers LLaVA model on the same inputs, positions as ours."""
    return llava(
        input_ids=input_ids,
        pixel_values=pixels,
        attention_mask=mask,
        position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
    ).logits


def write_llava(module: MLLMModule, out: Path) -> Path:
    """The LLaVA export of a module's parts, as ``lit-mllm-export --format llava`` writes it."""
    return to_llava(
        module.model,
        out,
        tokenizer=module.tokenizer,
        num_image_tokens=module.num_image_tokens,
        image_data_config=module.image_data_config,
    )


def write_checkpoint(module: MLLMModule, path) -> None:
    trainer = L.Trainer(logger=False, enable_checkpointing=False, max_steps=0, accelerator="cpu")
    trainer.strategy.connect(module)
    trainer.save_checkpoint(path)
