"""One training/eval sample: decoded image tensors + token ids with labels."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from lit_mllm.data.conversation import ConversationTokenizer
from lit_mllm.data.options import OnBadSample
from lit_mllm.data.records import Sample, SampleStore
from lit_mllm.data.slicing import SlicedImageTransform, SlicePlan
from lit_mllm.data.transforms import DEFAULT_MAX_IMAGE_PIXELS, BadImageError, load_rgb_image
from lit_mllm.data.turns import ConversationError, image_group


class SampleProcessor:
    """One :class:`Sample` -> a training item: decoded images + token ids with labels.

    Shared by the map-style :class:`MLLMDataset` and the streamed datasets
    (:mod:`lit_mllm.data.streaming`), so both count and report bad samples the same way.

    A sample that cannot be used comes back as ``{"skipped": reason}`` under
    ``on_bad_sample="skip"``; the collator counts those per batch so that counts survive
    DataLoader worker processes. Under ``"error"`` every fault raises, naming the file and the
    sample, including a sample whose replies were all truncated away (``no_supervised_tokens``):
    silently training on less data than configured is a fault too.
    Images over ``max_image_pixels`` are refused from their header, before decoding.

    With a ``slicer`` (``data.image_slicing``) each image becomes a thumbnail and slices
    (``pixel_views``), and its text block is written from the same plan: a view takes
    ``tokens_per_view`` slots (a resampler), or one per ``patch_size`` x ``patch_size`` cell of
    the view when that is None (an MLP projector), so text and features agree by construction.
    """

    def __init__(
        self,
        tokenize: ConversationTokenizer,
        transform: Callable[[Any], torch.Tensor],
        *,
        with_prompts: bool = False,
        on_bad_sample: OnBadSample = "error",
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        slicer: SlicedImageTransform | None = None,
        tokens_per_view: int | None = None,
    ) -> None:
        self.slicer = slicer
        self.tokens_per_view = tokens_per_view
        self.tokenize = tokenize
        self.transform = transform
        self.with_prompts = with_prompts
        self.on_bad_sample = on_bad_sample
        self.max_image_pixels = max_image_pixels

    def _image(self, sample: Sample, k: int) -> Image.Image:
        """Image ``k`` of the sample: from its file, or from the bytes a shard carried."""
        data = sample.image_bytes[k] if sample.image_bytes else None
        return load_rgb_image(sample.image_paths[k], max_pixels=self.max_image_pixels, data=data)

    def __call__(self, sample: Sample, source: str) -> dict[str, Any]:
        """``source`` names where the sample came from in error messages."""
        blocks = views = None
        count = len(sample.image_paths)
        try:
            if self.slicer is None:
                tokenized = self.tokenize(
                    sample.conversation, num_images=count, sample_id=sample.sample_id
                )
                images = [self.transform(self._image(sample, k)) for k in range(count)]
            else:
                sliced = [self.slicer(self._image(sample, k)) for k in range(count)]
                blocks = [image_group(self.view_tokens(plan), plan.grid) for plan, _ in sliced]
                views = [image_views for _, image_views in sliced]
                tokenized = self.tokenize(
                    sample.conversation, sample_id=sample.sample_id, image_blocks=blocks
                )
                images = []
        except ConversationError as error:
            if self.on_bad_sample == "skip":
                return {"skipped": error.reason, "sample_id": sample.sample_id}
            hint = ""
            if error.reason == "no_supervised_tokens":
                hint = (
                    ". Raise data.max_length, or set data.on_bad_sample: skip to drop such "
                    "samples (they are counted)"
                )
            raise ConversationError(f"{source}: {error}{hint}", error.reason) from error
        except BadImageError as error:
            if self.on_bad_sample == "skip":
                return {"skipped": error.reason, "sample_id": sample.sample_id}
            raise BadImageError(
                error.path,
                error.reason,
                f"{error.detail} (sample {sample.sample_id} of {source})",
            ) from error
        images = images[: tokenized.num_images]  # truncation may have cut whole image blocks
        item: dict[str, Any] = {
            "input_ids": tokenized.input_ids,
            "labels": tokenized.labels,
            "pixel_values": torch.stack(images) if images else None,
            "sample_id": sample.sample_id,
            "image_id": sample.image_id,
            "references": list(sample.references),
        }
        if views is not None and blocks is not None:
            kept = tokenized.num_images
            item["pixel_views"] = [view for image in views[:kept] for view in image]
            blocks = blocks[:kept]
        if self.with_prompts:
            item["prompt_ids"] = self.tokenize.generation_prompt(
                sample.conversation,
                num_images=len(images),
                sample_id=sample.sample_id,
                image_blocks=blocks,
            )
        return item

    def view_tokens(self, plan: SlicePlan) -> list[int]:
        """``<im_patch>`` slots of each view of a plan, thumbnail first."""
        if self.tokens_per_view is not None:
            return [self.tokens_per_view] * len(plan.view_sizes)
        unit = self.slicer.slicing.patch_size  # type: ignore[union-attr]
        return [(width // unit) * (height // unit) for width, height in plan.view_sizes]


class MLLMDataset(Dataset):
    """A ``SampleStore`` read lazily: images decoded and conversations tokenised per index."""

    def __init__(self, samples: SampleStore, processor: SampleProcessor) -> None:
        self.samples, self.processor = samples, processor

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.processor(self.samples[index], self.samples.source)
