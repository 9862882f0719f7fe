"""Special tokens and the ignore index: the one neutral place that data and models both import.

The image placeholder and block tokens, the label value that means "not supervised", and the
function that adds the image tokens to a tokenizer (so model and data agree on their ids).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

IMAGE_PLACEHOLDER = "<image>"
IM_START = "<im_start>"
IM_PATCH = "<im_patch>"
IM_END = "<im_end>"
IMAGE_SPECIAL_TOKENS = (IM_START, IM_PATCH, IM_END)
# the slices of a sliced image (data.image_slicing), MiniCPM-V 2.5's layout; added only to the
# tokenizers of sliced runs, so an unsliced model keeps its vocabulary (and its checkpoints)
SLICE_START = "<slice_start>"
SLICE_END = "<slice_end>"
SLICE_SPECIAL_TOKENS = (SLICE_START, SLICE_END)
IGNORE_INDEX = -100


@dataclass(frozen=True)
class ImageTokenIds:
    start: int
    patch: int
    end: int
    slice_start: int | None = None  # only with slicing
    slice_end: int | None = None

    @property
    def group_ends(self) -> tuple[int, ...]:
        """Ids that close a part of an image group (the thumbnail or a slice)."""
        return (self.end,) if self.slice_end is None else (self.end, self.slice_end)


def add_image_tokens(tokenizer: PreTrainedTokenizerBase, *, slices: bool = False) -> ImageTokenIds:
    """Register the image tokens as special tokens (idempotent) and return their ids.

    Special tokens are never split or merged by BPE, so each is exactly one id. ``slices`` adds
    the slice tokens after the image tokens (so model and data give them the same ids).
    A pad token is set to eos when the tokenizer has none (GPT-2, Mistral).
    """
    wanted = IMAGE_SPECIAL_TOKENS + (SLICE_SPECIAL_TOKENS if slices else ())
    missing = [t for t in wanted if t not in tokenizer.added_tokens_encoder]
    if missing:
        extra = {"replace_extra_special_tokens": False} if _has_replace_flag(tokenizer) else {}
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, **extra)
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise ValueError(
                f"tokenizer {tokenizer.name_or_path!r} has neither a pad nor an eos token"
            )
        tokenizer.pad_token = tokenizer.eos_token
    return ImageTokenIds(*(tokenizer.convert_tokens_to_ids(t) for t in wanted))


def _has_replace_flag(tokenizer: PreTrainedTokenizerBase) -> bool:
    return (
        "replace_extra_special_tokens" in inspect.signature(tokenizer.add_special_tokens).parameters
    )
