"""The sliced-image rows: the resampler model reading each image as a thumbnail + slices.

Each sample of the stream carries an image size (``stream.draw_image_size``: 1 to
``sizes.max_views`` views); ``lit_mllm.data.slicing.plan_slices`` cuts it as the DataModule
would with ``data.image_slicing``, ``lit_mllm.data.turns.image_group`` writes its token layout
(MiniCPM-V: the thumbnail in ``<im_start>``/``<im_end>``, each slice in
``<slice_start>``/``<slice_end>``, a newline after each row of slices, ``num_queries`` patch
slots per view), and the batch's views go to the model as ``ImageViews`` grouped by size, the
way ``MLLMCollator`` groups them. Pixels are random tensors of each view's size, made on the
device at every step, like the square images of the other rows.

``resampler-sliced`` packs each micro-batch into one row; ``resampler-sliced-padded`` trains
the same model on right-padded rows (one per sample, ``attention_mask``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from benchmarks.train_throughput.lit import LitTrainee
from benchmarks.train_throughput.sizes import Sizes
from benchmarks.train_throughput.stream import Sample, batch_stats, render
from lit_mllm.data.collate import pack, pad
from lit_mllm.data.slicing import SlicePlan, plan_slices
from lit_mllm.data.turns import image_group
from lit_mllm.models.views import ImageViews


@dataclass(frozen=True)
class SlicedImage:
    """One image size's slice plan and the token ids of its image group."""

    plan: SlicePlan
    ids: torch.Tensor  # (G,) int64: the whole group, delimiters and newlines included

    @property
    def num_views(self) -> int:
        return len(self.plan.view_sizes)


def view_groups(images: Sequence[SlicedImage]) -> list[tuple[tuple[int, int], list[int]]]:
    """((height, width), text-order positions) of each view size, in order of first appearance:
    ``lit_mllm.models.views.group_views``' grouping, on sizes instead of tensors."""
    by_size: dict[tuple[int, int], list[int]] = {}
    position = 0
    for image in images:
        for width, height in image.plan.view_sizes:
            by_size.setdefault((height, width), []).append(position)
            position += 1
    return list(by_size.items())


class SlicedLitTrainee(LitTrainee):
    """The resampler row's model with ``image_slicing``: packed, or right-padded rows."""

    def __init__(
        self,
        sizes: Sizes,
        decoder: str,
        device: torch.device,
        padded: bool,
        mlp_kernel: str = "transformers",
        float8: str | None = None,
    ) -> None:
        super().__init__(
            sizes,
            decoder,
            "resampler",
            device,
            image_slicing=sizes.slicing,
            mlp_kernel=mlp_kernel,
            float8=float8,
        )
        self.padded = padded
        self.row = "resampler-sliced-padded" if padded else "resampler-sliced"
        self.tokens_per_view = int(self.module.tokens_per_view)
        self.slicing = sizes.slicing
        self._images: dict[tuple[int, int], SlicedImage] = {}
        self._grids: dict[tuple[int, int], int] = {}

    def sliced_image(self, size: tuple[int, int] | None) -> SlicedImage:
        """The plan and token ids of a (width, height) image, made once per size."""
        if size is None:
            size = (self.sizes.image_size, self.sizes.image_size)
        if size not in self._images:
            plan = plan_slices(size[0], size[1], self.slicing)
            text = image_group([self.tokens_per_view] * len(plan.view_sizes), plan.grid)
            ids = self.module.tokenizer(text, add_special_tokens=False)["input_ids"]
            self._images[size] = SlicedImage(plan, torch.tensor(ids, dtype=torch.long))
        return self._images[size]

    def patches(self, height: int, width: int) -> int:
        """Encoder patches of one view (its grid as the encoder computes it)."""
        if (height, width) not in self._grids:
            gh, gw = self.module.model.encoder.grid_for(height, width)
            self._grids[(height, width)] = int(gh) * int(gw)
        return self._grids[(height, width)]

    def collate(self, samples: Sequence[Sample]) -> dict[str, Any]:
        images = [self.sliced_image(s.image_size) for s in samples]
        sequences = [render(s, image.ids) for s, image in zip(samples, images, strict=True)]
        batch = (pad if self.padded else pack)(sequences, self.pad_token_id)
        batch.update(batch_stats(sequences))
        groups = view_groups(images)
        batch["view_groups"] = groups
        batch["view_patches"] = [(len(pos), self.patches(*size)) for size, pos in groups]
        batch["views_per_image"] = [image.num_views for image in images]
        batch["image_slots"] = self.tokens_per_view * sum(batch["views_per_image"])
        return batch

    def batch_pixels(self, batch: dict[str, Any]) -> ImageViews:
        """Random views of the batch's sizes on the device, grouped as the collator groups them."""
        groups = batch["view_groups"]
        pixels = [torch.randn(len(pos), 3, h, w, device=self.device) for (h, w), pos in groups]
        return ImageViews(pixels, [list(pos) for _, pos in groups])

    def generate(
        self, samples: Sequence[Sample], new_tokens: int, cache: str = "dynamic"
    ) -> torch.Tensor:
        raise NotImplementedError("captioning speed is measured on the unsliced rows only")
