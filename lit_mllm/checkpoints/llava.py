"""The LLaVA export format: a transformers ``LlavaForConditionalGeneration`` folder and its
``LlavaProcessor``, usable without lit-mllm.

Only what LLaVA can express: the MLP connector over a CLIP-style timm ViT, which becomes a
``CLIPVisionModel`` (weights renamed, the fused qkv split). LoRA adapters are merged into a copy
of the decoder. Works on the model's parts, not the LightningModule.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lit_mllm.checkpoints.native import DTYPES, DType
from lit_mllm.tokens import IM_PATCH

__all__ = ["clip_vision", "to_llava"]

# timm block part -> CLIPEncoderLayer part (weight and bias each)
_BLOCK_PARTS = {
    "attn.proj": "self_attn.out_proj",
    "norm1": "layer_norm1",
    "norm2": "layer_norm2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}


def _clip_activation(act: nn.Module) -> str:
    from timm.layers.activations import QuickGELU

    if isinstance(act, QuickGELU):
        return "quick_gelu"
    if isinstance(act, nn.GELU):
        return "gelu" if act.approximate == "none" else "gelu_pytorch_tanh"
    raise ValueError(f"the ViT's MLP activation {type(act).__name__} has no CLIP equivalent")


def _has(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
    except AttributeError:
        return False
    return True


def _refuse(why: str) -> ValueError:
    return ValueError(
        f"LLaVA export needs a CLIP-style timm ViT (class token, pre-norm, LayerNorm, GELU or "
        f"QuickGELU MLP, no layer scale/registers/qk-norm); this encoder {why}. "
        "Use --format native instead."
    )


def _check_clip_style(vit: nn.Module) -> None:
    from timm.models.vision_transformer import VisionTransformer

    if not isinstance(vit, VisionTransformer):
        raise _refuse(f"is a {type(vit).__name__}")
    if vit.cls_token is None or vit.num_prefix_tokens != 1 or vit.no_embed_class:
        raise _refuse("does not have exactly one class token with its own position embedding")
    if not isinstance(vit.norm_pre, nn.LayerNorm):
        raise _refuse("has no pre-norm (timm pre_norm=True)")
    if vit.patch_embed.proj.bias is not None:
        raise _refuse("has a patch-embedding bias")
    block = vit.blocks[0]
    for part in ("ls1", "ls2", "attn.q_norm", "attn.k_norm", "attn.norm"):
        sub = block.get_submodule(part) if _has(block, part) else nn.Identity()
        if not isinstance(sub, nn.Identity):
            raise _refuse(f"has {part}")
    if not isinstance(block.norm1, nn.LayerNorm) or not hasattr(block.mlp, "fc1"):
        raise _refuse("uses another block type")
    image_size = vit.patch_embed.img_size
    if image_size[0] != image_size[1]:
        raise _refuse(f"takes non-square images {tuple(image_size)}")


def clip_vision(vit: nn.Module) -> tuple[Any, dict[str, Tensor]]:
    """A ``CLIPVisionConfig`` and a state dict of its ``vision_model`` equal to a CLIP-style
    timm ``VisionTransformer``; anything else is refused naming what differs."""
    from transformers import CLIPVisionConfig

    _check_clip_style(vit)
    block = vit.blocks[0]
    dim = vit.embed_dim
    vision_config = CLIPVisionConfig(
        hidden_size=dim,
        intermediate_size=block.mlp.fc1.out_features,
        num_hidden_layers=len(vit.blocks),
        num_attention_heads=block.attn.num_heads,
        image_size=int(vit.patch_embed.img_size[0]),
        patch_size=int(vit.patch_embed.patch_size[0]),
        num_channels=vit.patch_embed.proj.in_channels,
        hidden_act=_clip_activation(block.mlp.act),
        layer_norm_eps=block.norm1.eps,
    )
    src = {k: v.detach().float() for k, v in vit.state_dict().items()}
    state = {
        "embeddings.class_embedding": src["cls_token"].reshape(dim),
        "embeddings.patch_embedding.weight": src["patch_embed.proj.weight"],
        "embeddings.position_embedding.weight": src["pos_embed"].reshape(-1, dim),
        "pre_layrnorm.weight": src["norm_pre.weight"],
        "pre_layrnorm.bias": src["norm_pre.bias"],
        "post_layernorm.weight": src["norm.weight"],
        "post_layernorm.bias": src["norm.bias"],
    }
    for i in range(len(vit.blocks)):
        b, h = f"blocks.{i}.", f"encoder.layers.{i}."
        qkv_w = src[b + "attn.qkv.weight"].chunk(3)
        qkv_b = src.get(b + "attn.qkv.bias", torch.zeros(3 * dim)).chunk(3)
        for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
            state[f"{h}self_attn.{name}.weight"] = qkv_w[j]
            state[f"{h}self_attn.{name}.bias"] = qkv_b[j]
        for ours, theirs in _BLOCK_PARTS.items():
            for kind in ("weight", "bias"):
                state[f"{h}{theirs}.{kind}"] = src[f"{b}{ours}.{kind}"]
    return vision_config, state


def _hf_feature_layer(feature_layer: int) -> int:
    """Our block index -> index into HF ``hidden_states`` (whose entry 0 is the embeddings)."""
    if feature_layer == -1:
        raise ValueError(
            "LLaVA reads a block's output before any final norm, but feature_layer=-1 takes the "
            "final normed output; train with feature_layer -2 (LLaVA's choice) or export native"
        )
    return feature_layer if feature_layer < 0 else feature_layer + 1


def _projector_state(connector: nn.Module) -> dict[str, Tensor]:
    """LLaVA's projector is Linear - GELU - Linear: the MLP connector, nothing else."""
    fc1, act, fc2 = (getattr(connector, name, None) for name in ("fc1", "act", "fc2"))
    if not (
        isinstance(fc1, nn.Linear)
        and isinstance(fc2, nn.Linear)
        and type(act) is nn.GELU
        and act.approximate == "none"
    ):
        raise ValueError(
            f"LLaVA export needs the MLP connector, this model uses {type(connector).__name__} "
            "(no LLaVA equivalent); use --format native"
        )
    if getattr(connector, "merge", 1) != 1:
        raise ValueError(
            f"LLaVA export needs one token per patch; this MLP merges {connector.merge}x"
            f"{connector.merge} patches (connector.merge), which LLaVA's projector cannot; use "
            "--format native"
        )
    return {
        "linear_1.weight": fc1.weight,
        "linear_1.bias": fc1.bias,
        "linear_2.weight": fc2.weight,
        "linear_2.bias": fc2.bias,
    }


def to_llava(
    model: nn.Module,
    out_dir: str | Path,
    *,
    tokenizer: Any,
    num_image_tokens: int,
    image_data_config: Mapping[str, Any],
    dtype: DType | None = None,
) -> Path:
    """Write a transformers ``LlavaForConditionalGeneration`` folder (+ processor) to ``out_dir``.

    ``model``: the multimodal model (``.encoder`` with the timm ``.model`` and
    ``.feature_layer``, ``.connector``, ``.decoder``, ``.image_token_ids``);
    ``image_data_config``: the encoder's timm data config (``mean``, ``std``).
    """
    from transformers import (
        CLIPImageProcessor,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    if model.image_token_ids.slice_start is not None:
        raise ValueError(
            "LLaVA export: this model reads sliced images (data.image_slicing: a thumbnail + "
            "slices with <slice_start>/<slice_end> tokens), a layout LlavaForConditionalGeneration "
            "does not have; use --format native, which stores the slicing settings"
        )
    projector_state = _projector_state(model.connector)
    vision_config, vision_state = clip_vision(model.encoder.model)
    layer = _hf_feature_layer(model.encoder.feature_layer)
    decoder = model.decoder
    if hasattr(decoder, "merge_and_unload"):  # LoRA: fold the adapters into a copy
        decoder = copy.deepcopy(decoder).merge_and_unload()
    text_config = decoder.config
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=model.image_token_ids.patch,
        image_seq_length=num_image_tokens,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=layer,
        multimodal_projector_bias=True,
        tie_word_embeddings=bool(getattr(text_config, "tie_word_embeddings", False)),
    )
    llava = LlavaForConditionalGeneration(config).float()
    tower = llava.model.vision_tower
    getattr(tower, "vision_model", tower).load_state_dict(vision_state, strict=True)
    llava.model.multi_modal_projector.load_state_dict(projector_state, strict=True)
    llava.model.language_model.load_state_dict(decoder.get_decoder().state_dict(), strict=True)
    llava.lm_head.load_state_dict(decoder.get_output_embeddings().state_dict(), strict=True)
    if config.tie_word_embeddings:
        llava.tie_weights()
    if dtype is not None:
        llava.to(DTYPES[dtype])
    out = Path(out_dir)
    llava.save_pretrained(str(out))

    size = int(vision_config.image_size)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_mean=list(image_data_config["mean"]),
        image_std=list(image_data_config["std"]),
        resample=3,  # bicubic, as timm's CLIP configs
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=vision_config.patch_size,
        vision_feature_select_strategy="default",
        image_token=IM_PATCH,
        num_additional_image_tokens=1,
        chat_template=tokenizer.chat_template,
    )
    processor.save_pretrained(str(out))
    return out
