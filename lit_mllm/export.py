"""`lit-mllm-export`: a training checkpoint -> a folder other tools (or lit-mllm) load directly.

Two formats:

* ``native`` (any connector): ``config.json`` (the module's hyper-parameters and the decoder's
  config), ``model.safetensors`` (every weight, frozen ones included unless asked otherwise) and
  the tokenizer files. :func:`load_pretrained` rebuilds the module from the folder alone.
* ``llava`` (MLP connector over a CLIP-style timm ViT): a transformers
  ``LlavaForConditionalGeneration`` folder with a ``LlavaProcessor``, usable without lit-mllm.
  The timm ViT becomes a ``CLIPVisionModel``; LoRA adapters are merged into the decoder.

Training checkpoints only hold trainable weights, so the frozen parts are rebuilt from the
sources named in the checkpoint's hyper-parameters (they must be available where this runs).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from lit_mllm.checkpoints.safe_load import read_checkpoint, refuse_remote_code
from lit_mllm.errors import add_debug_flag, run_reporting_errors
from lit_mllm.module import MLLMModule
from lit_mllm.tokens import IM_PATCH

__all__ = ["load_checkpoint", "save_pretrained", "load_pretrained", "to_llava", "main"]

FORMAT_NAME = "lit-mllm"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FROZEN_PREFIXES = ("model.encoder.", "model.decoder.")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# -- reading training checkpoints ----------------------------------------------------------------
def load_checkpoint(path: str | Path, *, trust_remote_code: bool = False) -> MLLMModule:
    """Rebuild the module a training checkpoint was written for and load its weights.

    ``path``: a ``.ckpt`` file or a sharded (FSDP) checkpoint folder, read by
    :func:`lit_mllm.checkpoints.safe_load.read_checkpoint` (checksums first, nothing unpickled
    unsafely). ``trust_remote_code``: allow a checkpoint whose decoder setting runs remote code.
    """
    checkpoint = read_checkpoint(path)
    if "hyper_parameters" not in checkpoint or "state_dict" not in checkpoint:
        raise ValueError(
            f"{str(path)!r} is not a lit-mllm training checkpoint (needs 'hyper_parameters' "
            "and 'state_dict')"
        )
    hparams = dict(checkpoint["hyper_parameters"])
    refuse_remote_code(
        hparams,
        f"checkpoint {str(path)!r}",
        allowed=trust_remote_code,
        how="pass --trust-remote-code (trust_remote_code=True)",
    )
    hparams["init_from"] = None  # the checkpoint itself holds the trained weights
    module = MLLMModule(**hparams)
    module.on_load_checkpoint(checkpoint)  # raises when trainable weights are missing
    result = module.load_state_dict(checkpoint["state_dict"], strict=False)
    if result.unexpected_keys:
        raise ValueError(
            f"checkpoint {str(path)!r} holds weights this model lacks, e.g. "
            f"{result.unexpected_keys[:3]}: its hyper-parameters do not match its weights"
        )
    return module.eval()


# -- native format ---------------------------------------------------------------------------------
def _frozen_rebuildable(module: MLLMModule) -> bool:
    enc, dec = module.encoder_cfg, module.decoder_cfg
    return bool(enc.pretrained or enc.checkpoint_path) and bool(dec.name_or_path)


def _without_aliases(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, str]]:
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


def save_pretrained(
    module: MLLMModule,
    out_dir: str | Path,
    *,
    include_frozen: bool = True,
    dtype: Literal["float32", "bfloat16", "float16"] | None = None,
) -> Path:
    """Write ``config.json``, ``model.safetensors`` and the tokenizer to ``out_dir``.

    ``include_frozen=False`` leaves out the frozen encoder/decoder weights; loading then rebuilds
    them from the sources in the config (refused when those are random-init).
    """
    if not include_frozen and not _frozen_rebuildable(module):
        raise ValueError(
            "include_frozen=False needs frozen weights that can be rebuilt from their source, but "
            "this model's encoder or decoder is randomly initialised; export all weights"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    trainable = {name for name, p in module.named_parameters() if p.requires_grad}
    state = {
        name: tensor
        for name, tensor in module.state_dict().items()
        if include_frozen or name in trainable or not name.startswith(FROZEN_PREFIXES)
    }
    if dtype is not None:
        state = {k: v.to(_DTYPES[dtype]) if v.is_floating_point() else v for k, v in state.items()}
    tensors, aliases = _without_aliases(state)
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    decoder = module.model.decoder
    base = decoder.get_base_model() if hasattr(decoder, "get_base_model") else decoder
    config = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "weights": "all" if include_frozen else "trainable",
        "aliases": aliases,
        "num_image_tokens": module.num_image_tokens,
        "hyper_parameters": dict(module.hparams),
        "decoder_config": base.config.to_dict(),
    }
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2, default=list))
    module.tokenizer.save_pretrained(str(out))
    return out


def load_pretrained(
    directory: str | Path,
    map_location: str | torch.device = "cpu",
    *,
    trust_remote_code: bool = False,
) -> MLLMModule:
    """Rebuild an :class:`MLLMModule` from a folder written by :func:`save_pretrained`.

    ``trust_remote_code``: allow a folder whose decoder setting runs remote code.
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
    if config["weights"] == "all":  # self-contained: no source weights are read
        hparams["encoder"].update(pretrained=False, checkpoint_path=None)
        hparams["decoder"].update(name_or_path=None, config=_decoder_settings(config))
    if "optim" in hparams and isinstance(hparams["optim"].get("betas"), list):
        hparams["optim"]["betas"] = tuple(hparams["optim"]["betas"])
    module = MLLMModule(**hparams)
    state = load_file(str(folder / WEIGHTS_FILE), device=str(map_location))
    own = module.state_dict()
    for name, target in config.get("aliases", {}).items():
        state[name] = state[target]
    state = {k: v.to(own[k].dtype) if k in own else v for k, v in state.items()}
    result = module.load_state_dict(state, strict=False)
    missing = [
        k for k in result.missing_keys if config["weights"] == "all" or k in _trained(module)
    ]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"{str(folder / WEIGHTS_FILE)!r} does not fit the model in {CONFIG_FILE}: "
            f"missing {missing[:3]}, unexpected {result.unexpected_keys[:3]}"
        )
    return module.to(map_location).eval()


def _trained(module: MLLMModule) -> set[str]:
    return {name for name, p in module.named_parameters() if p.requires_grad}


def _decoder_settings(config: dict[str, Any]) -> dict[str, Any]:
    """The saved decoder config as ``DecoderConfig.config`` (random init, then weights load)."""
    skip = {"architectures", "transformers_version", "dtype", "torch_dtype", "_name_or_path"}
    return {k: v for k, v in config["decoder_config"].items() if k not in skip}


# -- LLaVA format ------------------------------------------------------------------------------
def _clip_activation(act: nn.Module) -> str:
    from timm.layers.activations import QuickGELU

    if isinstance(act, QuickGELU):
        return "quick_gelu"
    if isinstance(act, nn.GELU):
        return "gelu" if act.approximate == "none" else "gelu_pytorch_tanh"
    raise ValueError(f"the ViT's MLP activation {type(act).__name__} has no CLIP equivalent")


def _clip_vision(vit: nn.Module) -> tuple[Any, dict[str, Tensor]]:
    """A CLIPVisionConfig and state dict equal to a CLIP-style timm VisionTransformer."""
    from timm.models.vision_transformer import VisionTransformer
    from transformers import CLIPVisionConfig

    def refuse(why: str) -> ValueError:
        return ValueError(
            f"LLaVA export needs a CLIP-style timm ViT (class token, pre-norm, LayerNorm, GELU or "
            f"QuickGELU MLP, no layer scale/registers/qk-norm); this encoder {why}. "
            "Use --format native instead."
        )

    if not isinstance(vit, VisionTransformer):
        raise refuse(f"is a {type(vit).__name__}")
    if vit.cls_token is None or vit.num_prefix_tokens != 1 or vit.no_embed_class:
        raise refuse("does not have exactly one class token with its own position embedding")
    if not isinstance(vit.norm_pre, nn.LayerNorm):
        raise refuse("has no pre-norm (timm pre_norm=True)")
    if vit.patch_embed.proj.bias is not None:
        raise refuse("has a patch-embedding bias")
    block = vit.blocks[0]
    for part in ("ls1", "ls2", "attn.q_norm", "attn.k_norm", "attn.norm"):
        sub = block.get_submodule(part) if _has(block, part) else nn.Identity()
        if not isinstance(sub, nn.Identity):
            raise refuse(f"has {part}")
    if not isinstance(block.norm1, nn.LayerNorm) or not hasattr(block.mlp, "fc1"):
        raise refuse("uses another block type")
    dim = vit.embed_dim
    image_size = vit.patch_embed.img_size
    if image_size[0] != image_size[1]:
        raise refuse(f"takes non-square images {tuple(image_size)}")
    vision_config = CLIPVisionConfig(
        hidden_size=dim,
        intermediate_size=block.mlp.fc1.out_features,
        num_hidden_layers=len(vit.blocks),
        num_attention_heads=block.attn.num_heads,
        image_size=int(image_size[0]),
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
        pairs = {
            "attn.proj": "self_attn.out_proj",
            "norm1": "layer_norm1",
            "norm2": "layer_norm2",
            "mlp.fc1": "mlp.fc1",
            "mlp.fc2": "mlp.fc2",
        }
        for ours, theirs in pairs.items():
            for kind in ("weight", "bias"):
                state[f"{h}{theirs}.{kind}"] = src[f"{b}{ours}.{kind}"]
    return vision_config, state


def _has(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
    except AttributeError:
        return False
    return True


def _hf_feature_layer(feature_layer: int) -> int:
    """Our block index -> index into HF ``hidden_states`` (whose entry 0 is the embeddings)."""
    if feature_layer == -1:
        raise ValueError(
            "LLaVA reads a block's output before any final norm, but feature_layer=-1 takes the "
            "final normed output; train with feature_layer -2 (LLaVA's choice) or export native"
        )
    return feature_layer if feature_layer < 0 else feature_layer + 1


def to_llava(module: MLLMModule, out_dir: str | Path, *, dtype: str | None = None) -> Path:
    """Write a transformers ``LlavaForConditionalGeneration`` folder (+ processor) to ``out_dir``."""
    from transformers import (
        CLIPImageProcessor,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    if module.connector_cfg.kind != "mlp":
        raise ValueError(
            f"LLaVA export needs the MLP connector, this model uses {module.connector_cfg.kind!r} "
            "(no LLaVA equivalent); use --format native"
        )
    encoder = module.model.encoder
    vision_config, vision_state = _clip_vision(encoder.model)
    layer = _hf_feature_layer(encoder.feature_layer)
    decoder = module.model.decoder
    if hasattr(decoder, "merge_and_unload"):  # LoRA: fold the adapters into a copy
        decoder = copy.deepcopy(decoder).merge_and_unload()
    text_config = decoder.config
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=module.model.image_token_ids.patch,
        image_seq_length=module.num_image_tokens,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=layer,
        multimodal_projector_bias=True,
        tie_word_embeddings=bool(getattr(text_config, "tie_word_embeddings", False)),
    )
    llava = LlavaForConditionalGeneration(config).float()
    tower = llava.model.vision_tower
    getattr(tower, "vision_model", tower).load_state_dict(vision_state, strict=True)
    projector = module.model.connector
    llava.model.multi_modal_projector.load_state_dict(
        {
            "linear_1.weight": projector.fc1.weight,
            "linear_1.bias": projector.fc1.bias,
            "linear_2.weight": projector.fc2.weight,
            "linear_2.bias": projector.fc2.bias,
        },
        strict=True,
    )
    llava.model.language_model.load_state_dict(decoder.get_decoder().state_dict(), strict=True)
    llava.lm_head.load_state_dict(decoder.get_output_embeddings().state_dict(), strict=True)
    if config.tie_word_embeddings:
        llava.tie_weights()
    if dtype is not None:
        llava.to(_DTYPES[dtype])
    out = Path(out_dir)
    llava.save_pretrained(str(out))

    data = module.image_data_config
    size = int(vision_config.image_size)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_mean=list(data["mean"]),
        image_std=list(data["std"]),
        resample=3,  # bicubic, as timm's CLIP configs
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=module.tokenizer,
        patch_size=vision_config.patch_size,
        vision_feature_select_strategy="default",
        image_token=IM_PATCH,
        num_additional_image_tokens=1,
        chat_template=module.tokenizer.chat_template,
    )
    processor.save_pretrained(str(out))
    return out


# -- command line --------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="lit-mllm-export",
        description="Export a lit-mllm training checkpoint to a native or transformers LLaVA folder.",
    )
    parser.add_argument("--ckpt", required=True, help="Lightning .ckpt file or sharded folder")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--format", choices=("native", "llava"), default="native")
    parser.add_argument(
        "--trainable-only",
        action="store_true",
        help="native: leave frozen pretrained weights out (rebuilt from their sources on load)",
    )
    parser.add_argument("--dtype", choices=tuple(_DTYPES), default=None, help="cast weights")
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow a checkpoint whose decoder setting runs the decoder's own Python code",
    )
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    if args.format == "llava" and args.trainable_only:
        parser.error("--trainable-only applies to --format native only")

    def export() -> None:
        module = load_checkpoint(args.ckpt, trust_remote_code=args.trust_remote_code)
        if args.format == "llava":
            out = to_llava(module, args.out, dtype=args.dtype)
        else:
            out = save_pretrained(
                module, args.out, include_frozen=not args.trainable_only, dtype=args.dtype
            )
        print(f"wrote {args.format} export to {out}")

    return run_reporting_errors("lit-mllm-export", export, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
