"""What the two caption formats (COCO, Karpathy) share: the prompt and one image -> samples."""

from __future__ import annotations

from typing import Any

from lit_mllm.data.records import StoreBuilder

DEFAULT_CAPTION_PROMPT = "Describe the image briefly."


def add_caption_image(
    builder: StoreBuilder,
    sample_prefix: str,
    image_id: int | str,
    rel_path: str,
    captions: list[tuple[Any, str]],
    one_sample_per_caption: bool,
) -> None:
    """One image -> one sample (first caption as reply) or one sample per caption.

    The captions are stored once per image as its references, whichever way it is sampled.
    """
    group = builder.add_references([c for _, c in captions])
    if not one_sample_per_caption:
        builder.add(f"{sample_prefix}:{image_id}", [rel_path], 0, image_id, group)
        return
    for k, (cap_id, _) in enumerate(captions):
        builder.add(f"{sample_prefix}:{image_id}:{cap_id}", [rel_path], k, image_id, group)
