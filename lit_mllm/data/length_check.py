"""Fail before training when ``data.max_length`` cannot hold one sample's prompt + 1 reply
token: otherwise every sample is dropped as ``no_supervised_tokens`` and the run "works"."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lit_mllm.data.conversation import ConversationTokenizer
from lit_mllm.data.records import SampleStore, caption_conversation
from lit_mllm.data.turns import image_block
from lit_mllm.tokens import IMAGE_PLACEHOLDER

if TYPE_CHECKING:
    from lit_mllm.data.datamodule import SplitSource


def check_max_length(
    max_length: int,
    split: str,
    source: SplitSource,
    samples: SampleStore,
    tokenize: ConversationTokenizer,
    caption_prompt: str,
    tokens_per_image: int | None = None,
) -> None:
    """Raise naming the split's file and the length needed.

    Caption sources share one prompt, so their minimum is exact. For LLaVA data the probe is
    the shortest sample shaped like the first record: an empty question with as many images as
    it has, up to one. ``tokens_per_image``: the smallest image block (one view when images are
    sliced; default the tokenizer's image tokens).
    """
    if source.kind == "llava":
        num_images = min(1, len(samples[0].image_paths))
        question = IMAGE_PLACEHOLDER if num_images else ""
        probe: Any = (
            {"role": "user", "content": question},
            {"role": "assistant", "content": "x"},
        )
        what = f"a LLaVA sample with {num_images} image(s) and an empty question"
    else:
        num_images = 1
        probe = caption_conversation(caption_prompt, "x")
        what = f"a caption sample (prompt {caption_prompt!r})"
    per_image = tokens_per_image or tokenize.num_image_tokens
    need = tokenize.min_length(probe, image_blocks=[image_block(per_image)] * num_images)
    if max_length < need:
        blocks = num_images * (per_image + 2)
        raise ValueError(
            f"data.max_length {max_length} is too small for the {split} data "
            f"({source.file}): {what} needs at least {need} tokens ({blocks} for the image "
            f"block{'s' if num_images != 1 else ''} incl. start/end, {need - blocks - 1} for "
            "the prompt and chat template, 1 for the reply), so every sample would be dropped "
            f"as no_supervised_tokens. Set data.max_length >= {need} (or use fewer image "
            "tokens / a shorter prompt)"
        )
