"""Build the causal LM decoder from a local path / hub cache, or from a config (tiny default)."""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from lit_mllm.hub import local_or_cached_folder
from lit_mllm.models import attention  # noqa: F401  (registers attn_implementation lit_varlen)

# what a decoder folder needs; remote code only matters with trust_remote_code
DECODER_PATTERNS = ("*.json", "*.safetensors", "*.bin", "*.model", "*.tiktoken", "*.txt", "*.py")


def build_decoder(
    name_or_path: str | None,
    *,
    config: dict[str, Any] | None = None,
    vocab_size: int,
    attn_implementation: str | None = None,
    dtype: torch.dtype | None = None,
    trust_remote_code: bool = False,
) -> PreTrainedModel:
    """``name_or_path`` wins; otherwise ``config`` (must hold ``model_type``) gives random init.

    Offline: a name that is not a local folder is looked up in the HF cache only, and a miss
    raises FileNotFoundError saying where it looked and how to get the weights. Hub kernels stay
    off (``use_kernels=False``; transformers >= 5.25 turns them on by default): they would be
    fetched from the hub for CUDA layers, and the model's kernels are this project's choice
    (``attn_implementation``, compiled blocks), the same with every transformers version.
    """
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if name_or_path:
        folder = local_or_cached_folder(name_or_path, "decoder", DECODER_PATTERNS)
        try:
            return AutoModelForCausalLM.from_pretrained(
                str(folder), dtype=dtype, local_files_only=True, use_kernels=False, **kwargs
            )
        except OSError as error:  # a folder without weights or config
            raise FileNotFoundError(
                f"decoder {name_or_path!r}: {folder} does not hold a complete model "
                f"(config.json + weights): {str(error).splitlines()[0]}. Point "
                "model.decoder.name_or_path at a folder written by `save_pretrained`, or "
                f"fetch it again with `hf download {name_or_path}`."
            ) from None
    if not config or "model_type" not in config:
        raise ValueError("decoder: give either a model name/path or a config with `model_type`")
    settings = {k: v for k, v in config.items() if k != "model_type"}
    settings.setdefault("vocab_size", vocab_size)
    model_config = AutoConfig.for_model(config["model_type"], **settings)
    model = AutoModelForCausalLM.from_config(model_config, **kwargs)
    return model.to(dtype) if dtype is not None else model


def resize_embeddings_for(decoder: PreTrainedModel, vocab_size: int) -> None:
    """Grow the embeddings once for added tokens; new rows start at the mean embedding."""
    old = decoder.get_input_embeddings().weight.shape[0]
    if vocab_size <= old:
        return
    decoder.resize_token_embeddings(vocab_size, mean_resizing=False)
    with torch.no_grad():
        for embedding in {decoder.get_input_embeddings(), decoder.get_output_embeddings()}:
            if embedding is None:
                continue
            weight = embedding.weight
            weight[old:] = weight[:old].mean(dim=0, keepdim=True)
