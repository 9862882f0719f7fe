"""Scenes of the synthetic set: shape counts, placement, drawing, and the scene record."""

from __future__ import annotations

import numpy as np
import pytest
from synthetic_checks import grid_scene

from lit_mllm.data import synthetic as syn


def test_scene_count_and_jitter_settings() -> None:
    cell = 64 / syn.GRID
    for i in range(40):
        one = syn.sample_scene(np.random.default_rng(i), 64, max_shapes=1)
        assert len(one.shapes) == 1
        fixed = syn.sample_scene(np.random.default_rng(i), 64, jitter=False)
        for s in fixed.shapes:
            centre = ((s.col + 0.5) * cell, (s.row + 0.5) * cell)
            assert (s.cx, s.cy) == pytest.approx(centre, abs=1e-3)  # stored rounded
    assert {len(syn.sample_scene(np.random.default_rng(i)).shapes) for i in range(40)} == {1, 2, 3}
    with pytest.raises(ValueError, match="max_shapes"):
        syn.sample_scene(np.random.default_rng(0), 64, max_shapes=4)


def test_shapes_have_distinct_kinds_and_cells_in_reading_order() -> None:
    for i in range(60):
        scene = syn.sample_scene(np.random.default_rng(i), 72)
        cells = [(s.row, s.col) for s in scene.shapes]
        assert cells == sorted(cells) and len(set(cells)) == len(cells)
        assert len({s.kind for s in scene.shapes}) == len(scene.shapes)
        assert scene.image_size == 72 and scene.background in syn.BACKGROUNDS


def test_drawn_pixels_match_the_scene() -> None:
    """Each shape's centre pixel has its colour, a corner has the background (noise: 3.5 sigma)."""
    for i in range(30):
        rng = syn.image_rng(5, "train", i)
        scene = syn.sample_scene(rng, 64)
        arr = np.asarray(syn.draw_scene(scene, rng), dtype=int)
        assert arr.shape == (64, 64, 3)
        tol = 3.5 * syn.NOISE_SIGMA if scene.noise else 1
        for s in scene.shapes:
            assert np.abs(arr[int(s.cy), int(s.cx)] - np.array(syn.COLOURS[s.colour])).max() <= tol
        bg = np.array(syn.BACKGROUNDS[scene.background])
        assert np.abs(arr[0, 0] - bg).max() <= (3.5 * syn.NOISE_SIGMA if scene.noise else 0)


def test_image_rng_depends_only_on_seed_split_and_index() -> None:
    draw = [syn.image_rng(1, "val", 3).random() for _ in range(2)]
    assert draw[0] == draw[1]
    assert syn.image_rng(1, "val", 3).random() != syn.image_rng(1, "test", 3).random()
    assert syn.image_rng(1, "val", 3).random() != syn.image_rng(2, "val", 3).random()


def test_relation_keys_and_the_scene_record_round_trip() -> None:
    vertical = grid_scene(("circle", 0, 1), ("square", 2, 1))
    horizontal = grid_scene(("circle", 1, 0), ("square", 1, 2))
    assert syn.relation_key(*vertical.shapes) == (-1, 0)
    assert syn.relation_key(*horizontal.shapes) == (0, -1)
    assert syn.relation_key(horizontal.shapes[1], horizontal.shapes[0]) == (0, 1)
    scene = syn.sample_scene(np.random.default_rng(3))
    assert syn.Scene.from_dict(scene.to_dict()) == scene
