"""Model assembly: settings + tokenizer -> encoder, connector and decoder, frozen or trainable.

The one place where a setting becomes a module: ``model.encoder`` -> :class:`VisionEncoder`,
``model.connector`` -> resampler or MLP sized from the encoder's patch grid and the decoder's
width, ``model.decoder`` -> a transformers causal LM with its embeddings grown for the image
tokens, then frozen, wrapped with LoRA, or left to train in full.
"""

from __future__ import annotations

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lit_mllm.config import DecoderConfig, ModelSettings
from lit_mllm.data.slicing import ImageSlicing
from lit_mllm.models.connector import build_connector, num_image_tokens
from lit_mllm.models.decoder import build_decoder, resize_embeddings_for
from lit_mllm.models.float8 import convert_to_float8
from lit_mllm.models.fused_mlp import MLP_KERNELS, PROJECTIONS, fuse_swiglu_mlps
from lit_mllm.models.mllm import MultimodalLM
from lit_mllm.models.vision import VisionEncoder
from lit_mllm.tokens import add_image_tokens

__all__ = ["build_model", "check_vocabulary"]


def build_model(
    settings: ModelSettings,
    tokenizer: PreTrainedTokenizerBase,
    image_slicing: ImageSlicing | None = None,
) -> MultimodalLM:
    """The multimodal model for ``settings``; ``tokenizer`` must be the one named there.
    ``image_slicing``: the model reads sliced images (their slice tokens join the vocabulary)."""
    image_token_ids = add_image_tokens(tokenizer, slices=image_slicing is not None)
    enc = settings.encoder
    vision = VisionEncoder(
        enc.name,
        pretrained=enc.pretrained,
        checkpoint_path=enc.checkpoint_path,
        model_kwargs=enc.model_kwargs,
        feature_layer=enc.feature_layer,
        dtype=enc.dtype,
        sincos_pos_embed=enc.sincos_pos_embed,
    )
    dec = settings.decoder
    decoder = build_decoder(
        dec.name_or_path,
        config=dec.config,
        vocab_size=len(tokenizer),
        attn_implementation=dec.attn_implementation,
        trust_remote_code=dec.trust_remote_code,
    )
    check_vocabulary(decoder, tokenizer, dec.name_or_path, settings.tokenizer)
    resize_embeddings_for(decoder, len(tokenizer))
    if fused_mlp_asked(dec):
        fuse_swiglu_mlps(decoder)
    if float8_asked(dec):
        convert_to_float8(decoder, dec.float8)
    grid = vision.default_grid
    conn = settings.connector
    if conn.merge < 1 or (conn.kind == "mlp" and (grid[0] % conn.merge or grid[1] % conn.merge)):
        raise ValueError(
            f"model.connector.merge {conn.merge} must be >= 1 and divide the encoder's patch grid "
            f"{grid}"
        )
    if image_slicing is not None:
        check_slicing_fits(image_slicing, vision, conn.kind, conn.merge)
    connector = build_connector(
        conn.kind,
        kv_dim=vision.embed_dim,
        embed_dim=decoder.config.get_text_config().hidden_size,
        kv_grid=grid,
        num_queries=conn.num_queries,
        key_pos_grid=conn.key_pos_grid,
        num_heads=conn.num_heads,
        merge=conn.merge,
    )
    model = MultimodalLM(
        vision,
        connector,
        decoder,
        image_token_ids,
        num_image_tokens(conn.kind, grid, conn.num_queries, conn.merge),
    )
    model.decoder = apply_training_mode(model.decoder, dec)
    return model


def check_slicing_fits(
    slicing: ImageSlicing, vision: VisionEncoder, connector_kind: str, merge: int
) -> None:
    """Views are cut in multiples of ``image_slicing.patch_size``: whole encoder patches (no
    padding inside the encoder), and for the MLP exactly one token per such cell, which is what
    the DataModule counts."""
    patch = vision.patch_size
    if patch is None:
        raise ValueError(
            f"data.image_slicing needs an encoder with a patch embedding; {vision.model_name!r} "
            "has none"
        )
    unit = slicing.patch_size
    if connector_kind == "mlp" and unit != patch * merge:
        raise ValueError(
            f"data.image_slicing.patch_size {unit} must equal the encoder patch {patch} x "
            f"model.connector.merge {merge} = {patch * merge} with the MLP connector (one token "
            "per such cell)"
        )
    if unit % patch:
        raise ValueError(
            f"data.image_slicing.patch_size {unit} must be a multiple of the encoder patch {patch}"
        )


def check_vocabulary(
    decoder: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    decoder_name: str | None,
    tokenizer_name: str,
) -> None:
    """A decoder with fewer embedding rows than the tokenizer's base vocabulary belongs to
    another model family: the embeddings would be grown silently and most token ids would
    mean something else. (More rows than the tokenizer is normal: padded vocabularies.)"""
    rows = decoder.get_input_embeddings().weight.shape[0]
    base = tokenizer.vocab_size
    if rows < base:
        name = decoder_name or "built from model.decoder.config"
        raise ValueError(
            f"decoder {name!r} has {rows} token embeddings but tokenizer {tokenizer_name!r} "
            f"has a base vocabulary of {base}: they come from different models. Set "
            "model.tokenizer to the decoder's own tokenizer (usually the same name or folder "
            "as model.decoder.name_or_path)."
        )


def fused_mlp_asked(settings: DecoderConfig) -> bool:
    """``mlp_kernel: quack``, checked against the training mode: LoRA adapters on the MLP's
    projections would be bypassed by the fused GEMMs, which read the base weights."""
    if settings.mlp_kernel not in MLP_KERNELS:
        raise ValueError(
            f"model.decoder.mlp_kernel {settings.mlp_kernel!r} is not one of {list(MLP_KERNELS)}"
        )
    if settings.mlp_kernel != "quack":
        return False
    adapted = set(settings.lora_target_modules) & set(PROJECTIONS)
    if settings.train == "lora" and adapted:
        raise ValueError(
            "model.decoder.mlp_kernel quack reads the MLP's base weights, so LoRA adapters on "
            f"{sorted(adapted)} would be skipped: drop them from lora_target_modules or use "
            "mlp_kernel: transformers"
        )
    return True


def float8_asked(settings: DecoderConfig) -> bool:
    """``float8`` set, checked against the training mode: PEFT's LoRA layers wrap plain linear
    layers, and float8 with adapters is not something lit-mllm has tested."""
    if settings.float8 is None:
        return False
    if settings.train == "lora":
        raise ValueError(
            f"model.decoder.float8 {settings.float8!r} trains the decoder's own weights in "
            "float8; it is not combined with train: lora. Use train: full, or float8: null"
        )
    return True


def apply_training_mode(decoder: PreTrainedModel, settings: DecoderConfig) -> PreTrainedModel:
    """``frozen`` / ``lora`` (a PEFT wrapper around the decoder) / ``full``, and activation
    checkpointing when asked."""
    if settings.train == "frozen":
        decoder.requires_grad_(False)
    elif settings.train == "lora":
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=settings.lora_r,
            lora_alpha=settings.lora_alpha,
            lora_dropout=settings.lora_dropout,
            target_modules=list(settings.lora_target_modules),
            task_type="CAUSAL_LM",
        )
        decoder = get_peft_model(decoder, lora)
    if settings.gradient_checkpointing:
        decoder.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False}
        )
        if settings.train != "full":
            decoder.enable_input_require_grads()
    return decoder
