"""Checks shared by the synthetic-data tests: what every caption of a scene must state."""

from __future__ import annotations

import re

from lit_mllm.data import synthetic as syn


def _alternatives(words: dict[str, tuple[str, ...]]) -> dict[str, str]:
    return {key: "(?:" + "|".join(re.escape(w) for w in ws) + ")" for key, ws in words.items()}


SIZE_RE = _alternatives(syn.SIZE_WORDS)
COLOUR_RE = _alternatives(syn.COLOUR_WORDS)
KIND_RE = _alternatives(syn.KIND_WORDS)


def _named(caption: str, alternatives: dict[str, str]) -> set[str]:
    return {key for key, pattern in alternatives.items() if re.search(rf"\b{pattern}\b", caption)}


def check_caption_facts(caption: str, scene: syn.Scene) -> None:
    """Every shape named with its size, colour and kind (any of their words); no colour or
    kind that is not drawn; counts right."""
    assert _named(caption, COLOUR_RE) == {s.colour for s in scene.shapes}, caption
    assert _named(caption, KIND_RE) == {s.kind for s in scene.shapes}, caption
    for s in scene.shapes:
        shape_re = rf"\b{SIZE_RE[s.size]} {COLOUR_RE[s.colour]} {KIND_RE[s.kind]}\b"
        assert re.search(shape_re, caption), (caption, s)
    sizes = {s.size for s in scene.shapes}
    for absent in set(SIZE_RE) - sizes:  # a size no shape has is never mentioned
        assert not re.search(rf"\b{SIZE_RE[absent]}\b", caption), caption
    for n, word in syn.COUNT_WORDS.items():
        if re.search(rf"\b{word} shapes?\b", caption):
            assert n == len(scene.shapes), caption


def grid_scene(*cells: tuple[str, int, int], colour: str = "red", size: str = "large") -> syn.Scene:
    """A 64 px scene with one shape of ``kind`` centred in each ``(kind, row, col)`` cell."""
    shapes = [
        syn.Shape(k, colour, size, r, c, (c + 0.5) * 64 / 3, (r + 0.5) * 64 / 3, 17.9)
        for k, r, c in cells
    ]
    return syn.Scene(tuple(shapes), "white", False, 64)
