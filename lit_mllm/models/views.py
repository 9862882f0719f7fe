"""The views of a batch's sliced images, grouped by size so the encoder runs without padding.

With ``data.image_slicing`` an image becomes several views (a thumbnail and its slices) of
different sizes. The collator stacks the views of one size into one tensor and records where
each of them stands in the text; the model encodes each group at its own patch grid and writes
the features back in text order. A NamedTuple, so Lightning moves its tensors to the device and
pinning and worker processes handle it like any tuple.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["ImageViews", "group_views"]


class ImageViews(NamedTuple):
    groups: list[Tensor]  # (n_g, 3, h_g, w_g): the views of one size
    positions: list[list[int]]  # for each group: the text-order index of each of its views

    @property
    def num_views(self) -> int:
        return sum(len(p) for p in self.positions)

    def in_text_order(self, outputs: Sequence[Tensor]) -> list[Tensor]:
        """Per-group outputs (n_g, ...) -> one tensor per view, in text order."""
        views: list[Tensor | None] = [None] * self.num_views
        for output, positions in zip(outputs, self.positions, strict=True):
            for row, position in enumerate(positions):
                views[position] = output[row]
        return views  # type: ignore[return-value]


def group_views(views: Sequence[Tensor]) -> ImageViews:
    """Views (3, h, w) in text order -> groups of equal size (in order of first appearance)."""
    by_size: dict[tuple[int, int], list[int]] = {}
    for index, view in enumerate(views):
        by_size.setdefault((int(view.shape[-2]), int(view.shape[-1])), []).append(index)
    positions = list(by_size.values())
    groups = [torch.stack([views[i] for i in indices]) for indices in positions]
    return ImageViews(groups, positions)
