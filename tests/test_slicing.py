"""Adaptive image slicing: the size policy (hand-computed plans, fuzzed invariants), the views,
the normalising transform, config checks and the README picture.

Throughout, the default area is 448**2 = 200704 px and ``ratio = W*H / 200704``.
"""

from __future__ import annotations

import math
import random
import re

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import resolve_data_config

from lit_mllm.data import slicing as slicing_module
from lit_mllm.data.slicing import (
    ImageSlicing,
    SlicedImageTransform,
    SlicePlan,
    describe,
    plan_slices,
    slice_views,
)
from lit_mllm.data.slicing_figure import draw_slice_plan, synthetic_scene

DEFAULT = ImageSlicing()  # max_slices 9, scale_resolution 448, patch_size 14
TINY = ImageSlicing(scale_resolution=72, patch_size=6)  # area 5184


def _noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


# ----------------------------------------------------------------------------- worked examples


def test_module_docstring_worked_examples_hold() -> None:
    """Every ``WxH -> ...`` line of the module docstring is what describe(plan) says."""
    doc = slicing_module.__doc__
    assert doc is not None and "WORKED EXAMPLES" in doc
    default_part, tiny_part = doc.split("Tiny-model scale", 1)
    pattern = re.compile(r"^\s+(\d+)x(\d+) -> .*$", re.MULTILINE)
    checked = 0
    for part, slicing in ((default_part, DEFAULT), (tiny_part, TINY)):
        for match in pattern.finditer(part):
            width, height = int(match.group(1)), int(match.group(2))
            assert describe(plan_slices(width, height, slicing)) == match.group(0).strip()
            checked += 1
    assert checked == 10


# ------------------------------------------------------------------------------ grid choice

# (width, height, expected (cols, rows)); the candidates are every cols*rows = n for n in
# (multiple-1, multiple, multiple+1), 1 < n <= 9, multiple = min(ceil(ratio), 9); the winner
# minimises |log(W/H) - log(cols/rows)| (exact ties: the first in n-then-cols order).
GRID_CASES = [
    # 1:6, ratio 448*2688/200704 = 6 -> n in 5,6,7: 1x6 matches exactly
    (448, 2688, (1, 6)),
    # 1:6, ratio 300*1800/200704 = 2.69 -> 3 -> n in 2,3,4; tallest on offer 1x4:
    # |log(1/6) - log(1/4)| = log(1.5) = 0.41 < 1x3's log(2) = 0.69
    (300, 1800, (1, 4)),
    # 1:4, ratio 448*1792/200704 = 4 -> n in 3,4,5: 1x4 exact
    (448, 1792, (1, 4)),
    # 1:3, ratio 3 -> n in 2,3,4: 1x3 exact
    (448, 1344, (1, 3)),
    # 1:2, ratio 448*896/200704 = 2 -> n in 2,3 (1 is never a candidate): 1x2 exact
    (448, 896, (1, 2)),
    # 1:2, ratio 640*1280/200704 = 4.08 -> 5 -> n in 4,5,6; no 1:2 grid among them:
    # 1x4, 2x2 err log 2 = 0.69; 1x5 err log 2.5 = 0.92; 2x3 err |log(1/2) - log(2/3)| = 0.29
    (640, 1280, (2, 3)),
    # 2:3, ratio 896*1344/200704 = 6 -> n in 5,6,7: 2x3 exact
    (896, 1344, (2, 3)),
    # 1:1, ratio 896*896/200704 = 4 -> n in 3,4,5: 2x2 exact
    (896, 896, (2, 2)),
    # 1:1, ratio 1100*1100/200704 = 6.03 -> 7 -> n in 6,7,8; 2x3 and 3x2 tie at log 1.5 = 0.41
    # (1x7 1.95, 2x4 0.69): the first found, 2x3 (MiniCPM-V's float logs pick 3x2)
    (1100, 1100, (2, 3)),
    # 1:1, ratio 1344*1344/200704 = 9 -> n in 8,9 (10 > max_slices): 3x3 exact
    (1344, 1344, (3, 3)),
    # 3:2, ratio 6 -> n in 5,6,7: 3x2 exact
    (1344, 896, (3, 2)),
    # 2:1, ratio 896*448/200704 = 2 -> n in 2,3: 2x1 exact
    (896, 448, (2, 1)),
    # 2:1, ratio 1792*896/200704 = 8 -> n in 7,8,9: 4x2 exact (not 2x1: n >= 7)
    (1792, 896, (4, 2)),
    # 3:1, ratio 3 -> n in 2,3,4: 3x1 exact
    (1344, 448, (3, 1)),
    # 3:1, ratio 2016*672/200704 = 6.75 -> 7 -> n in 6,7,8: 3x2 and 6x1 err log 2 = 0.69,
    # 7x1 log(7/3) = 0.85, 4x2 log(3/2) = 0.41 -> 4x2
    (2016, 672, (4, 2)),
    # 4:1, ratio 1792*448/200704 = 4 -> n in 3,4,5: 4x1 exact
    (1792, 448, (4, 1)),
    # 4:1, ratio 3052*763/200704 = 11.6 -> 9 -> n in 8,9: 4x2 and 8x1 tie at log 2 = 0.69
    # (9x1 log 2.25 = 0.81, 3x3 log 4 = 1.39): the first found, 4x2 (n=8, cols 4 < 8)
    (3052, 763, (4, 2)),
    # 6:1, ratio 6 -> n in 5,6,7: 6x1 exact
    (2688, 448, (6, 1)),
    # 6:1, ratio 1800*300/200704 = 2.69 -> 3 -> n in 2,3,4: widest on offer 4x1
    (1800, 300, (4, 1)),
]


@pytest.mark.parametrize(("width", "height", "grid"), GRID_CASES)
def test_grid_follows_the_aspect_ratio(width: int, height: int, grid: tuple[int, int]) -> None:
    plan = plan_slices(width, height, DEFAULT)
    assert plan.grid == grid
    assert plan.num_slices == grid[0] * grid[1]


def test_small_image_is_one_upscaled_view_with_its_aspect() -> None:
    # ratio 100*50/200704 < 1: one view, upscaled: r = 2, h = int(448/sqrt 2) = int(316.78) = 316,
    # w = int(316*2) = 632; round(316/14 = 22.57) = 23 -> 322, round(632/14 = 45.14) = 45 -> 630
    plan = plan_slices(100, 50, DEFAULT)
    assert plan == SlicePlan((100, 50), (630, 322), None, None)
    assert plan.num_slices == 0 and plan.view_sizes == [(630, 322)]


def test_exactly_fitting_image_is_one_view_of_its_own_size() -> None:
    # ratio 1 -> multiple 1: no slicing; r = 1, h = w = int(448/1) = 448, already multiples of 14
    assert plan_slices(448, 448, DEFAULT) == SlicePlan((448, 448), (448, 448), None, None)


def test_three_to_one_image_is_three_square_slices() -> None:
    # ratio 1344*448/200704 = 3 -> 3x1; thumbnail (shrunk): r = 3, h = int(448/1.7321) = 258 ->
    # round(18.43) = 18 -> 252, w = int(258*3) = 774 -> round(55.29) = 55 -> 770;
    # cell 1344/3 x 448 = 448x448 -> r = 1 -> 448x448
    plan = plan_slices(1344, 448, DEFAULT)
    assert plan == SlicePlan((1344, 448), (770, 252), (3, 1), (448, 448))
    assert plan.view_sizes == [(770, 252)] + [(448, 448)] * 3


def test_huge_image_is_capped_at_max_slices() -> None:
    # ratio 4480**2/200704 = 100 -> multiple min(100, 9) = 9 -> n in 8, 9: 3x3 exact;
    # thumbnail r = 1 -> 448x448; cell: 4480 rounded up to a multiple of 3 = 4482, /3 = 1494
    # -> upscale=True resize r = 1 -> 448x448
    plan = plan_slices(4480, 4480, DEFAULT)
    assert plan == SlicePlan((4480, 4480), (448, 448), (3, 3), (448, 448))
    assert plan.num_slices == 9
    # 8000x1000: ratio 39.9 -> 9 -> n in 8, 9: 8x1 exact (log 8); cell 1000x1000 -> 448x448
    wide = plan_slices(8000, 1000, DEFAULT)
    assert wide.grid == (8, 1) and wide.slice_size == (448, 448)
    assert plan_slices(8000, 8000, ImageSlicing(max_slices=4)).grid == (2, 2)  # n in 3, 4


def test_tall_slices_keep_the_cell_aspect() -> None:
    # 300x1800 -> 1x4 (above); cell: 1800 is a multiple of 4 -> 300x450, r = 2/3:
    # h = int(448/sqrt(2/3)) = int(548.69) = 548 -> round(39.14) = 39 -> 546,
    # w = int(548*2/3) = int(365.33) = 365 -> round(26.07) = 26 -> 364.
    # Thumbnail r = 1/6: h = int(448*sqrt 6) = int(1097.36) = 1097 -> round(78.36) = 78 -> 1092,
    # w = int(1097/6) = int(182.83) = 182 -> 13*14 = 182
    plan = plan_slices(300, 1800, DEFAULT)
    assert plan == SlicePlan((300, 1800), (182, 1092), (1, 4), (364, 546))


def test_cell_is_taken_after_rounding_up_to_the_grid() -> None:
    # 1100x1100 -> 2x3; 1100 rounded up to a multiple of 3 is 1101 -> cell 550x367, r = 1.4986:
    # h = int(448/1.22418) = int(365.96) = 365 -> round(26.07) = 26 -> 364,
    # w = int(365*1.4986) = int(547.0) = 547 -> round(39.07) = 39 -> 546
    plan = plan_slices(1100, 1100, DEFAULT)
    assert plan == SlicePlan((1100, 1100), (448, 448), (2, 3), (546, 364))
    # 461x448: ratio 206528/200704 = 1.03 -> 2 -> n in 2,3: 2x1 (err |0.029 - 0.693| = 0.66,
    # 1x2 0.72). 461 rounds UP to 462 -> cell 231x448, r = 0.515625: h = int(448/0.71807) =
    # int(623.89) = 623 -> 623/14 = 44.5 -> 44 (halves to even) -> 616, w = int(623*0.515625) =
    # int(321.23) = 321 -> round(22.93) = 23 -> 322. (MiniCPM-V's round-to-nearest would take
    # 460 -> cell 230x448 -> h = 625 -> 630: a slice one patch taller.)
    assert plan_slices(461, 448, DEFAULT).slice_size == (322, 616)


def test_tiny_model_scale() -> None:
    # scale 72, patch 6, area 5184. 216x72: ratio 15552/5184 = 3 -> 3x1; thumbnail r = 3:
    # h = int(72/sqrt 3) = int(41.57) = 41 -> round(6.83) = 7 -> 42,
    # w = int(41*3) = 123 -> round(20.5) = 20 (halves to even) -> 120; cell 72x72 -> 72x72
    assert plan_slices(216, 72, TINY) == SlicePlan((216, 72), (120, 42), (3, 1), (72, 72))
    # 144x144: ratio 20736/5184 = 4 -> n in 3,4,5: 2x2 exact; thumbnail r = 1 -> 72x72;
    # cell 72x72 -> 72x72
    assert plan_slices(144, 144, TINY) == SlicePlan((144, 144), (72, 72), (2, 2), (72, 72))


def test_never_split_and_max_slices_one_give_one_view() -> None:
    # never_split: the one view resized to the area, aspect kept (770x252 as the thumbnail above)
    never = ImageSlicing(never_split=True)
    assert plan_slices(1344, 448, never) == SlicePlan((1344, 448), (770, 252), None, None)
    # max_slices 1: multiple = min(3, 1) = 1 -> no slicing
    assert plan_slices(1344, 448, ImageSlicing(max_slices=1)).grid is None
    # max_slices 2, ratio 3 -> multiple 2 -> n in 2, 3 but 3 > 2 -> 2x1 or 1x2; 3:1 -> 2x1
    assert plan_slices(1344, 448, ImageSlicing(max_slices=2)).grid == (2, 1)


def test_bad_image_sizes_are_refused() -> None:
    for width, height in ((0, 10), (10, 0), (-5, 5)):
        with pytest.raises(ValueError, match="image size"):
            plan_slices(width, height, DEFAULT)


def test_slice_plan_refuses_half_a_grid() -> None:
    with pytest.raises(ValueError, match="both or neither"):
        SlicePlan((10, 10), (14, 14), (2, 1), None)


# ------------------------------------------------------------------------------ invariants


def _log_error(width: int, height: int, grid: tuple[int, int]) -> float:
    return abs(math.log(width / height) - math.log(grid[0] / grid[1]))


def _candidates(width: int, height: int, slicing: ImageSlicing) -> list[tuple[int, int]]:
    """Written again here (not the module's helper): every factorisation of each allowed n."""
    multiple = min(math.ceil(width * height / slicing.scale_resolution**2), slicing.max_slices)
    grids = []
    for n in range(max(multiple - 1, 2), min(multiple + 1, slicing.max_slices) + 1):
        grids += [(c, r) for c in range(1, n + 1) for r in range(1, n + 1) if c * r == n]
    return grids


def test_fuzzed_plans_keep_the_invariants() -> None:
    rng = random.Random(1234)
    sliced = 0
    for _ in range(1000):
        patch = rng.choice([6, 8, 14, 16, 28])
        slicing = ImageSlicing(
            max_slices=rng.randint(1, 12),
            scale_resolution=patch * rng.randint(1, 40),
            patch_size=patch,
            never_split=rng.random() < 0.1,
        )
        width = max(1, int(math.exp(rng.uniform(0, math.log(6000)))))
        height = max(1, int(math.exp(rng.uniform(0, math.log(6000)))))
        plan = plan_slices(width, height, slicing)
        sizes = plan.view_sizes
        assert plan.image_size == (width, height)
        assert len(sizes) == 1 + plan.num_slices and sizes[0] == plan.thumbnail
        for w, h in sizes:
            assert w % patch == 0 and h % patch == 0 and w >= patch and h >= patch
        assert plan.num_slices <= slicing.max_slices
        ratio = width * height / slicing.scale_resolution**2
        candidates = _candidates(width, height, slicing)
        if slicing.never_split or ratio <= 1 or not candidates:
            assert plan.grid is None and plan.slice_size is None and sizes == [plan.thumbnail]
            continue
        sliced += 1
        assert plan.grid in candidates
        assert plan.slice_size is not None and sizes[1:] == [plan.slice_size] * plan.num_slices
        best = min(_log_error(width, height, grid) for grid in candidates)
        assert _log_error(width, height, plan.grid) <= best + 1e-9
        # the thumbnail only shrinks: no side beyond the source's, rounded up by half a patch
        assert plan.thumbnail[0] <= max(width + patch / 2, patch)
        assert plan.thumbnail[1] <= max(height + patch / 2, patch)
    assert sliced > 200  # the fuzz really exercised slicing


# ----------------------------------------------------------------------------------- views


def test_slice_views_are_crops_of_one_resize() -> None:
    image = _noise(230, 150)
    plan = plan_slices(230, 150, TINY)
    assert plan.grid is not None and plan.slice_size is not None
    (cols, rows), (sw, sh) = plan.grid, plan.slice_size
    views = slice_views(image, plan)
    assert [view.size for view in views] == plan.view_sizes
    assert np.array_equal(
        np.asarray(views[0]), np.asarray(image.resize(plan.thumbnail, Image.BICUBIC))
    )
    whole = np.asarray(image.resize((cols * sw, rows * sh), Image.BICUBIC))
    for index, view in enumerate(views[1:]):
        row, col = divmod(index, cols)  # row-major
        expected = whole[row * sh : (row + 1) * sh, col * sw : (col + 1) * sw]
        assert np.array_equal(np.asarray(view), expected)
    nearest = slice_views(image, plan, Image.NEAREST)
    assert np.array_equal(
        np.asarray(nearest[-1]),
        np.asarray(image.resize((cols * sw, rows * sh), Image.NEAREST))[-sh:, -sw:],
    )


def test_slice_views_of_an_unsliced_plan_and_a_wrong_image() -> None:
    plan = plan_slices(40, 30, TINY)
    views = slice_views(_noise(40, 30), plan)
    assert [view.size for view in views] == plan.view_sizes == [plan.thumbnail]
    with pytest.raises(ValueError, match="plan is for"):
        slice_views(_noise(41, 30), plan)


CONFIG = {
    "input_size": (3, 224, 224),
    "interpolation": "bilinear",
    "mean": (0.5, 0.4, 0.3),
    "std": (0.2, 0.25, 0.3),
    "crop_pct": 0.9,
    "crop_mode": "center",
}


def test_transform_normalises_each_view_with_the_config() -> None:
    transform = SlicedImageTransform(CONFIG, TINY)
    colour = (200, 100, 50)
    plan, tensors = transform(Image.new("RGB", (216, 72), colour))
    assert plan == transform.plan(Image.new("RGB", (216, 72))) == plan_slices(216, 72, TINY)
    assert [tuple(t.shape) for t in tensors] == [(3, h, w) for w, h in plan.view_sizes]
    triples = zip(colour, CONFIG["mean"], CONFIG["std"], strict=True)
    expected = [(c / 255 - m) / s for c, m, s in triples]
    for tensor in tensors:
        assert tensor.dtype == torch.float32
        for channel in range(3):
            torch.testing.assert_close(
                tensor[channel], torch.full_like(tensor[channel], expected[channel])
            )


def test_transform_uses_the_config_interpolation_and_converts_to_rgb() -> None:
    image = _noise(230, 150, seed=3)
    plan, tensors = SlicedImageTransform(CONFIG, TINY)(image.convert("RGBA"))
    views = slice_views(image, plan, Image.BILINEAR)
    mean = torch.tensor(CONFIG["mean"]).view(3, 1, 1)
    std = torch.tensor(CONFIG["std"]).view(3, 1, 1)
    for view, tensor in zip(views, tensors, strict=True):
        pixels = torch.from_numpy(np.asarray(view).copy()).permute(2, 0, 1).float() / 255
        torch.testing.assert_close(tensor, (pixels - mean) / std)


def test_transform_accepts_timm_config_and_refuses_random_interpolation() -> None:
    timm_config = resolve_data_config(
        {"img_size": 224}
    )  # timm's own defaults: bicubic, ImageNet mean/std
    plan, tensors = SlicedImageTransform(timm_config, DEFAULT)(_noise(100, 50))
    assert len(tensors) == 1 and tuple(tensors[0].shape) == (3, 322, 630)
    with pytest.raises(ValueError, match="interpolation 'random'"):
        SlicedImageTransform({**CONFIG, "interpolation": "random"}, TINY)


# ---------------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_slices": 0}, "data.image_slicing.max_slices"),
        ({"max_slices": 2.5}, "data.image_slicing.max_slices"),
        ({"scale_resolution": -1}, "data.image_slicing.scale_resolution"),
        ({"patch_size": 0}, "data.image_slicing.patch_size"),
        ({"patch_size": True}, "data.image_slicing.patch_size"),
        ({"scale_resolution": 10, "patch_size": 14}, "data.image_slicing.scale_resolution"),
        ({"never_split": "yes"}, "data.image_slicing.never_split"),
    ],
)
def test_check_names_the_bad_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=re.escape(field)):
        ImageSlicing(**kwargs).check()
    with pytest.raises(ValueError):
        plan_slices(100, 100, ImageSlicing(**kwargs))


def test_check_accepts_sane_values_and_a_custom_prefix() -> None:
    ImageSlicing().check()
    ImageSlicing(max_slices=1, scale_resolution=14, patch_size=14).check()  # not a multiple: ok
    ImageSlicing(scale_resolution=450, patch_size=14).check()
    with pytest.raises(ValueError, match=r"^slicing\.max_slices"):
        ImageSlicing(max_slices=0).check(prefix="slicing.")


# --------------------------------------------------------------------------------- figure


def test_draw_slice_plan_lays_out_source_and_views() -> None:
    slicing = ImageSlicing(scale_resolution=336, patch_size=14)
    image = synthetic_scene(1008, 336)
    plan = plan_slices(1008, 336, slicing)
    assert describe(plan) == "1008x336 -> thumbnail 574x196 + 3x1 slices of 336x336"
    figure = draw_slice_plan(image, plan, max_side=640)
    assert figure.mode == "RGB"
    # scale 640/1008: source 640x213 on the left; right, 3 slices of 213 px side by side
    scale = 640 / 1008
    assert figure.width >= 640 + 3 * round(336 * scale)
    assert figure.width <= 640 + 3 * round(336 * scale) + 200  # margins, gaps
    assert round(196 * scale) + round(336 * scale) <= figure.height <= 600
    unsliced = plan_slices(200, 100, slicing)
    small = draw_slice_plan(_noise(200, 100), unsliced)
    assert small.height >= unsliced.thumbnail[1] and small.width >= 200 + unsliced.thumbnail[0]
