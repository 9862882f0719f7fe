"""Captions from a batch: the decoding setup, the end tokens, the text, and prediction files.

Validation, test and predict all caption the same way: the batch's left-padded generation
prompts, the images encoded once, greedy or beam decoding with a ``GenerationConfig`` built
only from ``model.generation`` and the end tokens below.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from transformers import GenerationConfig, PreTrainedTokenizerBase

from lit_mllm.config import DecodingConfig
from lit_mllm.data.conversation import ConversationTokenizer
from lit_mllm.models.mllm import MultimodalLM, has_images

log = logging.getLogger(__name__)

__all__ = [
    "caption_batch",
    "end_token_ids",
    "generation_config",
    "prediction_rows",
    "template_end_token_ids",
    "unique_predictions",
    "write_predictions",
]


def template_end_token_ids(
    tokenizer: PreTrainedTokenizerBase, chat_template_kwargs: dict[str, Any] | None = None
) -> list[int]:
    """The special token(s) the chat template writes after an assistant reply (``<|im_end|>``,
    ``<|eot_id|>`` ...), read from a rendered two-turn probe conversation: training supervises
    them, so they are what the model emits when it has finished."""
    probe = [
        {"from": "human", "value": "Hello."},
        {"from": "gpt", "value": "Hi."},
        {"from": "human", "value": "Bye."},
        {"from": "gpt", "value": "Goodbye."},
    ]
    try:
        conv = ConversationTokenizer(
            tokenizer, num_image_tokens=1, chat_template_kwargs=chat_template_kwargs
        )
        with torch.device("cpu"):  # also when the model is built under torch.device("meta")
            tokenized = conv(probe, num_images=0, sample_id="end-token probe")
    except ValueError as error:  # not a fast tokenizer, a template that rejects the probe
        log.warning("could not read the chat template's end-of-turn token: %s", error)
        return []
    special = set(tokenizer.all_special_ids)
    ends: list[int] = []
    for _, end in tokenized.reply_spans:
        last = int(tokenized.input_ids[end - 1])
        if last in special and last not in ends:
            ends.append(last)
    return ends


def end_token_ids(
    tokenizer: PreTrainedTokenizerBase,
    decoder_eos: int | list[int] | None,
    chat_template_kwargs: dict[str, Any] | None = None,
) -> list[int]:
    """Every id that ends a caption: the tokenizer's eos, the chat template's end-of-turn
    token(s) and the pretrained decoder's own eos list (e.g. Llama-3's ``<|eot_id|>`` beside
    ``<|end_of_text|>``, Qwen's ``<|im_end|>`` beside ``<|endoftext|>``)."""
    decoder_ids = [decoder_eos] if isinstance(decoder_eos, int) else list(decoder_eos or [])
    ids: list[int] = []
    template = template_end_token_ids(tokenizer, chat_template_kwargs)
    for token in [tokenizer.eos_token_id, *template, *decoder_ids]:
        if token is not None and int(token) not in ids:
            ids.append(int(token))
    return ids


def generation_config(
    decoding: DecodingConfig, end_ids: Sequence[int], pad_token_id: int | None
) -> GenerationConfig:
    """The complete transformers decoding setup: nothing comes from the decoder's own file."""
    return GenerationConfig(
        max_new_tokens=decoding.max_new_tokens,
        num_beams=decoding.num_beams,
        do_sample=False,
        eos_token_id=list(end_ids),
        pad_token_id=pad_token_id,
        cache_implementation=None if decoding.cache == "dynamic" else "static",
    )


def caption_batch(
    model: MultimodalLM,
    tokenizer: PreTrainedTokenizerBase,
    batch: dict[str, Any],
    config: GenerationConfig,
    limit: int | None = None,
    image_features: Tensor | None = None,
    cuda_graph: bool = False,
) -> list[str]:
    """Captions for the batch's generation prompts (the first ``limit`` rows).

    ``image_features``: the batch's images already encoded (``model.image_features``);
    ``cuda_graph``: decode with the CUDA-graph loop (``model.generation.cache: cuda_graph``)."""
    rows = slice(0, limit)
    pixel_values = batch.get("pixel_values")
    if limit is not None and limit < len(batch["prompt_ids"]):
        # the kept rows' images fill the first <im_patch> slots, in text order
        kept_slots = int((batch["prompt_ids"][rows] == model.image_token_ids.patch).sum())
        if image_features is not None:
            image_features = image_features[:kept_slots]
        elif isinstance(pixel_values, Tensor):  # one block per image: encode the kept ones only
            pixel_values = pixel_values[: kept_slots // model.num_image_tokens]
        elif has_images(pixel_values):  # sliced: the views of all rows are grouped by size
            image_features = model.image_features(pixel_values)[:kept_slots]
    generated = model.generate(
        pixel_values,
        batch["prompt_ids"][rows],
        batch["prompt_attention_mask"][rows],
        generation_config=config,
        image_features=image_features,
        cuda_graph=cuda_graph,
    )
    texts = tokenizer.batch_decode(generated, skip_special_tokens=True)
    return [text.strip() for text in texts]


def prediction_rows(batch: dict[str, Any], captions: Sequence[str]) -> list[dict[str, Any]]:
    """One row per sample: its ``sample_id``, the source's ``image_id`` where it has one
    (COCO / Karpathy; LLaVA records have none) and the caption."""
    rows = []
    for sample_id, image_id, caption in zip(
        batch["sample_id"], batch["image_id"], captions, strict=True
    ):
        row: dict[str, Any] = {"sample_id": sample_id}
        if image_id is not None:
            row["image_id"] = image_id
        row["caption"] = caption
        rows.append(row)
    return rows


def unique_predictions(parts: Iterable[Iterable[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Rows of all ranks, one per sample: a padded distributed sampler repeats samples, and
    several samples may share an image, so the sample id is the key."""
    return list({row["sample_id"]: row for part in parts for row in part}.values())


def write_predictions(path: str | Path, rows: list[dict[str, Any]]) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, ensure_ascii=False, indent=1))
    log.info("wrote %d captions to %s", len(rows), out)
    return out
