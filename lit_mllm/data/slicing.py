"""Adaptive image slicing (MiniCPM-V 2.x / LLaVA-UHD): a pure size policy plus the view transform.

A fixed-resolution encoder sees a large or elongated image badly when it is squashed into one
square. Slicing keeps one low-resolution *thumbnail* (the global view) and adds a grid of
*slices*, each close to the encoder's native area and aspect, whose grid shape follows the
image's aspect ratio. The policy (:func:`plan_slices`) works on sizes only, so it can be
unit-tested, used to count image tokens before any pixel is decoded, and shared by data and
model code; :func:`slice_views` and :class:`SlicedImageTransform` apply a plan to pixels.

The policy, in MiniCPM-V 2.x's terms (``area = scale_resolution**2``):

* ``multiple = min(ceil(W*H / area), max_slices)``; with ``multiple <= 1`` (or ``never_split``)
  the image is one view, resized (up or down) to about ``area`` pixels with its aspect kept.
* otherwise the grid is the ``(cols, rows)``, over every factorisation of ``n`` in
  ``multiple-1, multiple, multiple+1`` (only ``1 < n <= max_slices``), whose aspect is closest to
  the image's in log space: minimal ``|log(W/H) - log(cols/rows)|``.
* the thumbnail is the image resized down to about ``area`` (aspect kept); each slice is one
  cell of the image, its size rounded up to a multiple of the grid, resized to about ``area``.
* every side of every view is rounded to the nearest multiple of ``patch_size`` (at least one
  patch), so each view is a whole number of encoder patches.

Two deliberate differences from MiniCPM-V's code, neither affecting the common case:

* ties between grids are real ties here: the error is compared exactly (as the rational
  ``max(q, 1/q)`` with ``q = W*rows / (H*cols)``, monotone in the log error), and the first
  candidate found wins (``n`` ascending, then ``cols`` ascending). MiniCPM-V compares float
  logs, whose rounding noise breaks such ties: a square image of 6-7x the area gets ``3x2``
  there and ``2x3`` here (``|log(2/3)|`` is one ulp above ``|log(3/2)|`` in floats), and a
  4:1 image of 9+ areas, where ``4x2`` and ``8x1`` are both a factor 2 off, gets ``8x1`` there
  and ``4x2`` here (about 1 in 10,000 random sizes differ in grid).
* before the cell is taken, ``W`` and ``H`` are rounded *up* to multiples of ``cols`` and
  ``rows`` (MiniCPM-V rounds to the nearest), so the cells always cover the whole image; a
  slice side then differs by one patch for about 2.5% of random sizes.

Rounding to patches is Python's ``round`` (halves to even), as in MiniCPM-V: 123/6 = 20.5 -> 20.

WORKED EXAMPLES (``describe(plan_slices(W, H, slicing))``; ``tests/test_slicing.py`` asserts
every line below). Defaults, ``ImageSlicing()`` (scale_resolution 448, patch_size 14,
max_slices 9)::

    448x448 -> one view 448x448
    100x50 -> one view 630x322
    1344x448 -> thumbnail 770x252 + 3x1 slices of 448x448
    896x1344 -> thumbnail 364x546 + 2x3 slices of 448x448
    1792x896 -> thumbnail 630x322 + 4x2 slices of 448x448
    300x1800 -> thumbnail 182x1092 + 1x4 slices of 364x546
    1100x1100 -> thumbnail 448x448 + 2x3 slices of 546x364
    4480x4480 -> thumbnail 448x448 + 3x3 slices of 448x448

How some of them come about:

* 100x50: ratio 5000/200704 < 1, one view, upscaled: r = 2, h = int(448/sqrt(2)) = 316,
  w = int(316*2) = 632; to multiples of 14: round(22.57) = 23 -> 322, round(45.14) = 45 -> 630.
* 1344x448: ratio 602112/200704 = 3, n in (2, 3, 4); 3x1 matches log(3) exactly. Thumbnail:
  r = 3, h = int(448/1.732) = 258 -> 18*14 = 252, w = int(258*3) = 774 -> 55*14 = 770.
  Cell 448x448 -> slices 448x448 (4 views: thumbnail, then slices left to right).
* 300x1800 (1:6, 2.69x the area): n in (2, 3, 4), the tallest grid on offer, 1x4, is closest.
* 4480x4480 (100x the area): capped at 9 slices, n in (8, 9), 3x3.

Tiny-model scale, ``ImageSlicing(scale_resolution=72, patch_size=6)``::

    216x72 -> thumbnail 120x42 + 3x1 slices of 72x72
    144x144 -> thumbnail 72x72 + 2x2 slices of 72x72

(216x72 thumbnail: r = 3, h = int(72/sqrt(3)) = 41 -> 7*6 = 42, w = int(41*3) = 123 -> 20*6 = 120.)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np
import torch
from PIL import Image

__all__ = [
    "ImageSlicing",
    "SlicePlan",
    "SlicedImageTransform",
    "describe",
    "plan_slices",
    "slice_views",
]

_RESAMPLE = {
    "nearest": Image.NEAREST,
    "bilinear": Image.BILINEAR,
    "bicubic": Image.BICUBIC,
    "lanczos": Image.LANCZOS,
    "box": Image.BOX,
    "hamming": Image.HAMMING,
}


@dataclass(frozen=True)
class ImageSlicing:
    """data.image_slicing: how large images are cut into a thumbnail plus a grid of slices.

    ``scale_resolution`` is the side of the square whose area every view aims at (the encoder's
    native resolution); ``patch_size`` is what every view side is a multiple of (the encoder
    patch, or patch*merge when tokens are merged), so each view is whole patches.
    """

    max_slices: int = 9
    scale_resolution: int = 448
    patch_size: int = 14
    never_split: bool = False

    def check(self, prefix: str = "data.image_slicing.") -> None:
        """Raise ValueError naming the bad field, so a config error points at its key."""
        for name in ("max_slices", "scale_resolution", "patch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{prefix}{name} must be an integer >= 1, got {value!r}")
        if self.scale_resolution < self.patch_size:
            raise ValueError(
                f"{prefix}scale_resolution ({self.scale_resolution}) must be >= "
                f"{prefix}patch_size ({self.patch_size})"
            )
        if not isinstance(self.never_split, bool):
            raise ValueError(f"{prefix}never_split must be true or false, got {self.never_split!r}")


@dataclass(frozen=True)
class SlicePlan:
    """The views one image becomes: sizes only, so token counts are known before decoding."""

    image_size: tuple[int, int]  # (width, height) of the source image
    thumbnail: tuple[int, int]  # (width, height) of the global view, multiples of patch_size
    grid: tuple[int, int] | None  # (columns, rows) of slices, None when not sliced
    slice_size: tuple[int, int] | None  # (width, height) of each slice, multiples of patch_size

    def __post_init__(self) -> None:
        if (self.grid is None) != (self.slice_size is None):
            raise ValueError(f"grid {self.grid} and slice_size {self.slice_size}: both or neither")

    @property
    def num_slices(self) -> int:
        """Slices besides the thumbnail (0 when not sliced)."""
        return 0 if self.grid is None else self.grid[0] * self.grid[1]

    @property
    def view_sizes(self) -> list[tuple[int, int]]:
        """(width, height) of every view: thumbnail first, then the slices row-major."""
        if self.slice_size is None:
            return [self.thumbnail]
        return [self.thumbnail] + [self.slice_size] * self.num_slices


def _to_patches(length: float, patch: int) -> int:
    """Nearest multiple of the patch (Python round, halves to even), at least one patch."""
    return max(round(length / patch) * patch, patch)


def _best_resize(
    size: tuple[float, float], slicing: ImageSlicing, *, upscale: bool
) -> tuple[int, int]:
    """Aspect-kept size of about scale_resolution**2 pixels (only shrinks unless ``upscale``)."""
    width, height = size
    if width * height > slicing.scale_resolution**2 or upscale:
        aspect = width / height
        height = int(slicing.scale_resolution / math.sqrt(aspect))
        width = int(height * aspect)
    return _to_patches(width, slicing.patch_size), _to_patches(height, slicing.patch_size)


def _candidate_grids(width: int, height: int, slicing: ImageSlicing) -> list[tuple[int, int]]:
    """Every (cols, rows) on offer, in search order: n ascending, then cols ascending."""
    area = slicing.scale_resolution**2
    multiple = min(math.ceil(width * height / area), slicing.max_slices)
    grids = []
    for n in (multiple - 1, multiple, multiple + 1):
        if 1 < n <= slicing.max_slices:
            grids += [(cols, n // cols) for cols in range(1, n + 1) if n % cols == 0]
    return grids


def _aspect_error(width: int, height: int, grid: tuple[int, int]) -> Fraction:
    """exp(|log(W/H) - log(cols/rows)|) as an exact rational: same order, exact ties."""
    q = Fraction(width * grid[1], height * grid[0])
    return max(q, 1 / q)


def plan_slices(width: int, height: int, slicing: ImageSlicing) -> SlicePlan:
    """The thumbnail size, slice grid and slice size for a ``width`` x ``height`` image."""
    slicing.check()
    if isinstance(width, bool) or isinstance(height, bool) or min(width, height) < 1:
        raise ValueError(f"image size must be positive integers, got {width}x{height}")
    area = slicing.scale_resolution**2
    multiple = min(math.ceil(width * height / area), slicing.max_slices)
    grids = [] if multiple <= 1 or slicing.never_split else _candidate_grids(width, height, slicing)
    if not grids:  # one view, scaled to the target area either way
        size = _best_resize((width, height), slicing, upscale=True)
        return SlicePlan((width, height), size, None, None)
    best = grids[0]
    for grid in grids[1:]:
        if _aspect_error(width, height, grid) < _aspect_error(width, height, best):
            best = grid
    cols, rows = best
    thumbnail = _best_resize((width, height), slicing, upscale=False)
    refined_w, refined_h = -(-width // cols) * cols, -(-height // rows) * rows
    cell = _best_resize((refined_w // cols, refined_h // rows), slicing, upscale=True)
    return SlicePlan((width, height), thumbnail, best, cell)


def describe(plan: SlicePlan) -> str:
    """One line for READMEs, notebooks and logs, e.g. ``216x72 -> thumbnail 120x42 + ...``."""
    source = f"{plan.image_size[0]}x{plan.image_size[1]}"
    thumb = f"{plan.thumbnail[0]}x{plan.thumbnail[1]}"
    if plan.grid is None or plan.slice_size is None:
        return f"{source} -> one view {thumb}"
    (cols, rows), (sw, sh) = plan.grid, plan.slice_size
    return f"{source} -> thumbnail {thumb} + {cols}x{rows} slices of {sw}x{sh}"


def slice_views(
    image: Image.Image, plan: SlicePlan, resample: int = Image.BICUBIC
) -> list[Image.Image]:
    """The plan's views as images: the thumbnail, then the slices row-major.

    The thumbnail is the image resized to ``plan.thumbnail``; the slices are the image resized
    once to ``(cols*sw, rows*sh)`` and cropped into the grid, so neighbouring slices meet
    without a seam or overlap.
    """
    if image.size != plan.image_size:
        raise ValueError(f"plan is for a {plan.image_size} image, got {image.size}")
    views = [image.resize(plan.thumbnail, resample)]
    if plan.grid is None or plan.slice_size is None:
        return views
    (cols, rows), (sw, sh) = plan.grid, plan.slice_size
    refined = image.resize((cols * sw, rows * sh), resample)
    for row in range(rows):
        for col in range(cols):
            views.append(refined.crop((col * sw, row * sh, (col + 1) * sw, (row + 1) * sh)))
    return views


class SlicedImageTransform:
    """PIL image -> list of normalised float tensors (3, h, w), one per view, in plan order.

    Uses the encoder's timm data config for mean, std and interpolation only: sizes come from
    the plan (views differ in shape, so no crop or fixed input size applies).
    """

    def __init__(self, data_config: Mapping[str, Any], slicing: ImageSlicing) -> None:
        slicing.check()
        self.slicing = slicing
        interpolation = str(data_config.get("interpolation", "bicubic"))
        if interpolation not in _RESAMPLE:
            raise ValueError(
                f"interpolation {interpolation!r} is not one of {sorted(_RESAMPLE)} "
                "(a sliced image is resized deterministically)"
            )
        self.resample = _RESAMPLE[interpolation]
        self.mean = torch.tensor(data_config["mean"], dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(data_config["std"], dtype=torch.float32).view(3, 1, 1)

    def plan(self, image: Image.Image) -> SlicePlan:
        """The slice plan for this image's size."""
        return plan_slices(image.width, image.height, self.slicing)

    def __call__(self, image: Image.Image) -> tuple[SlicePlan, list[torch.Tensor]]:
        """The plan and one normalised (3, h, w) float32 tensor per view."""
        if image.mode != "RGB":
            image = image.convert("RGB")
        plan = self.plan(image)
        tensors = []
        for view in slice_views(image, plan, self.resample):
            pixels = torch.from_numpy(np.asarray(view, dtype=np.uint8).copy())
            pixels = pixels.permute(2, 0, 1).to(torch.float32).div_(255.0)
            tensors.append((pixels - self.mean) / self.std)
        return plan, tensors
