"""The words of the synthetic set: reference captions, question/answer pairs, conversations.

Every image gets five reference captions that state the same facts (kind, colour, size and place
of every shape), each written by a simulated annotator with its own wording habits (synonyms,
templates, openings), plus a LLaVA-style multi-turn conversation. As with human captions, the
most common wording (the consensus caption) scores about twice the leave-one-out reference, so
the metric rewards a model that gets the facts right. The tables here are also the vocabulary
that ``facts.py`` reads captions with.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TypeVar

import numpy as np

from lit_mllm.data.synthetic.scene import (
    KINDS,
    Scene,
    Shape,
    image_rng,
    pick,
    relation_key,
    sample_scene,
)
from lit_mllm.data.synthetic.settings import MAX_SHAPES

NUM_CAPTIONS = 5
T = TypeVar("T")

SIZE_WORDS = {
    "small": ("small", "little", "tiny", "smallish", "miniature"),
    "large": ("large", "big", "huge", "sizeable", "giant"),
}

# Absolute places of the 3x3 grid cells, (row, col) -> wordings.
PLACES: dict[tuple[int, int], tuple[str, ...]] = {
    (0, 0): (
        "in the top left corner",
        "at the top left",
        "in the upper left corner",
        "up in the top left",
        "near the top left corner",
    ),
    (0, 1): (
        "at the top",
        "at the top centre",
        "in the top middle",
        "along the top edge",
        "up at the top",
    ),
    (0, 2): (
        "in the top right corner",
        "at the top right",
        "in the upper right corner",
        "up in the top right",
        "near the top right corner",
    ),
    (1, 0): (
        "on the left",
        "on the left side",
        "at the centre left",
        "off to the left",
        "at the left edge",
    ),
    (1, 1): (
        "in the centre",
        "in the middle",
        "at the centre",
        "in the very middle",
        "dead centre",
    ),
    (1, 2): (
        "on the right",
        "on the right side",
        "at the centre right",
        "off to the right",
        "at the right edge",
    ),
    (2, 0): (
        "in the bottom left corner",
        "at the bottom left",
        "in the lower left corner",
        "down in the bottom left",
        "near the bottom left corner",
    ),
    (2, 1): (
        "at the bottom",
        "at the bottom centre",
        "in the bottom middle",
        "along the bottom edge",
        "down at the bottom",
    ),
    (2, 2): (
        "in the bottom right corner",
        "at the bottom right",
        "in the lower right corner",
        "down in the bottom right",
        "near the bottom right corner",
    ),
}
# Relation of shape A to shape B, keyed by (sign(row_a - row_b), sign(col_a - col_b)).
RELATIONS: dict[tuple[int, int], tuple[str, ...]] = {
    (0, -1): ("to the left of", "left of", "on the left of"),
    (0, 1): ("to the right of", "right of", "on the right of"),
    (-1, 0): ("above", "over", "directly above"),
    (1, 0): ("below", "under", "beneath"),
    (-1, -1): ("above and to the left of", "to the upper left of"),
    (-1, 1): ("above and to the right of", "to the upper right of"),
    (1, -1): ("below and to the left of", "to the lower left of"),
    (1, 1): ("below and to the right of", "to the lower right of"),
}
# "... and a red circle on its left": where A is, seen from B.
RELATIONS_ITS: dict[tuple[int, int], tuple[str, ...]] = {
    (0, -1): ("on its left", "to its left"),
    (0, 1): ("on its right", "to its right"),
    (-1, 0): ("above it", "over it"),
    (1, 0): ("below it", "under it"),
    (-1, -1): ("above it on the left", "to its upper left"),
    (-1, 1): ("above it on the right", "to its upper right"),
    (1, -1): ("below it on the left", "to its lower left"),
    (1, 1): ("below it on the right", "to its lower right"),
}
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}


def _pick_habit(rng: np.random.Generator, seq: Sequence[T], p_first: float) -> T:
    """The first wording with probability ``p_first``, else any other one: a phrasing most
    writers share, and personal variants that few share (as in human caption sets)."""
    if len(seq) == 1 or rng.random() < p_first:
        return seq[0]
    return seq[1 + int(rng.integers(len(seq) - 1))]


OPENINGS = (
    "",
    "a picture of ",
    "an image of ",
    "a simple drawing of ",
    "i can see ",
    "this image shows ",
    "a computer graphic of ",
    "here we see ",
    "a plain picture with ",
    "a sketch of ",
)
BACKGROUND_PHRASES = (
    " on a {} background",
    " against a {} backdrop",
    " set on a plain {} background",
    " with a {} background behind it",
    " drawn on {}",
)
# Other names writers use for colours and kinds; the first is the canonical one.
COLOUR_WORDS: dict[str, tuple[str, ...]] = {
    "red": ("red", "crimson", "scarlet", "bright red"),
    "green": ("green", "emerald", "grass green", "dark green"),
    "blue": ("blue", "royal blue", "cobalt", "deep blue"),
    "yellow": ("yellow", "golden", "lemon", "bright yellow"),
    "purple": ("purple", "violet", "lilac", "mauve"),
    "orange": ("orange", "amber", "tangerine", "bright orange"),
}
KIND_WORDS: dict[str, tuple[str, ...]] = {
    "circle": ("circle", "disc", "round dot", "ball"),
    "square": ("square", "box", "block", "tile"),
    "triangle": ("triangle", "triangular shape", "wedge", "pyramid shape"),
    "star": ("star", "five pointed star", "starburst", "star shape"),
    "diamond": ("diamond", "rhombus", "lozenge", "diamond shape"),
    "cross": ("cross", "plus sign", "plus", "cross shape"),
}
# How often a writer uses the first (common) wording of a word and of a caption template, and
# how often the background gets mentioned: set so that the consensus caption scores about twice
# the leave-one-out reference in CIDEr, as the best captioning models do on COCO's human captions.
P_FIRST = 0.7
P_TEMPLATE = 0.7
P_BACKGROUND = 0.15


class _Annotator:
    """The wording habits of one reference caption's writer. Each of the five references of an
    image gets its own annotator, so references state the same facts in different words, as
    human captions do, and the most common phrasing (a consensus caption) scores above any
    single reference."""

    def __init__(
        self,
        rng: np.random.Generator,
        scene: Scene,
        p_first: float | None = None,
        p_background: float | None = None,
    ) -> None:
        self.rng = rng
        self.p_first = P_FIRST if p_first is None else p_first
        self.opening = self._pick(OPENINGS)
        self.background = ""
        if rng.random() < (P_BACKGROUND if p_background is None else p_background):
            self.background = self._pick(BACKGROUND_PHRASES).format(scene.background)

    def _pick(self, seq: Sequence[str]) -> str:
        return _pick_habit(self.rng, seq, self.p_first)

    def np(self, s: Shape, det: str = "a") -> str:
        size, colour = self._pick(SIZE_WORDS[s.size]), self._pick(COLOUR_WORDS[s.colour])
        return f"{det} {size} {colour} {self._pick(KIND_WORDS[s.kind])}"

    def place(self, s: Shape) -> str:
        return self._pick(PLACES[(s.row, s.col)])

    def rel(self, a: Shape, b: Shape) -> str:
        return self._pick(RELATIONS[relation_key(a, b)])

    def rel_its(self, a: Shape, b: Shape) -> str:
        return self._pick(RELATIONS_ITS[relation_key(a, b)])


def _one_shape_captions(p: _Annotator, a: Shape) -> list[str]:
    o = p.opening
    return [
        f"{o}{p.np(a)} {p.place(a)}",
        f"there is {p.np(a)} {p.place(a)}",
        f"{p.place(a)} there is {p.np(a)}",
        f"{o}one shape, {p.np(a)} {p.place(a)}",
        f"{o}a single shape: {p.np(a)} {p.place(a)}",
    ]


def _two_shape_captions(p: _Annotator, a: Shape, b: Shape) -> list[str]:
    o = p.opening
    return [
        f"{o}{p.np(a)} {p.place(a)} and {p.np(b)} {p.place(b)}",
        f"{o}{p.np(a)} {p.rel(a, b)} {p.np(b)}",
        f"{o}two shapes: {p.np(a)} {p.place(a)} and {p.np(b)} {p.place(b)}",
        f"{o}{p.np(b)} {p.rel(b, a)} {p.np(a)}",
        f"{p.np(a, 'the')} is {p.rel(a, b)} {p.np(b, 'the')}",
        f"{o}{p.np(b)} with {p.np(a)} {p.rel_its(a, b)}",
        f"there are two shapes, {p.np(a)} {p.place(a)} and {p.np(b)} {p.place(b)}",
    ]


def _three_shape_captions(
    p: _Annotator, rng: np.random.Generator, shapes: list[Shape]
) -> list[str]:
    a, b, c = shapes
    x, y, z = (shapes[i] for i in rng.permutation(3))
    o = p.opening
    caps = [
        f"{o}{p.np(a)} {p.place(a)}, {p.np(b)} {p.place(b)} and {p.np(c)} {p.place(c)}",
        f"{o}three shapes: {p.np(a)} {p.place(a)}, {p.np(b)} {p.place(b)} and {p.np(c)} {p.place(c)}",
        f"there are three shapes: {p.np(x)} {p.place(x)}, {p.np(y)} {p.place(y)} "
        f"and {p.np(z)} {p.place(z)}",
        f"{p.place(a)} there is {p.np(a)}, {p.place(b)} {p.np(b)} and {p.place(c)} {p.np(c)}",
        f"{o}{p.np(a)} {p.rel(a, b)} {p.np(b)}, and {p.np(c)} {p.place(c)}",
    ]
    if len({s.col for s in shapes}) == 3:
        by_col = sorted(shapes, key=lambda s: s.col)
        caps.append("from left to right: " + _join([p.np(s) for s in by_col]))
    if len({s.row for s in shapes}) == 3:
        caps.append("from top to bottom: " + _join([p.np(s) for s in shapes]))
    return caps


def _join(items: list[str]) -> str:
    return ", ".join(items[:-1]) + " and " + items[-1]


def _templates(p: _Annotator, rng: np.random.Generator, shapes: list[Shape]) -> list[str]:
    if len(shapes) == 1:
        return _one_shape_captions(p, shapes[0])
    if len(shapes) == 2:
        return _two_shape_captions(p, shapes[0], shapes[1])
    return _three_shape_captions(p, rng, shapes)


def consensus_caption(scene: Scene) -> str:
    """The most common wording of the scene's facts: first template and words, no opening or
    background. A captioner that learned the references' habits says this; its score against
    the five references is the ceiling for the model (about 2x the leave-one-out score)."""
    rng = np.random.default_rng(0)
    annotator = _Annotator(rng, scene, p_first=1.0, p_background=0.0)
    return _templates(annotator, rng, list(scene.shapes))[0]


def make_captions(scene: Scene, rng: np.random.Generator, n: int = NUM_CAPTIONS) -> list[str]:
    """``n`` distinct captions, each naming size, colour, kind and place of every shape.

    Each caption has its own annotator (wording habits) and template; the first template and
    wordings are the most common, so there is a consensus phrasing, but no two references agree
    word for word."""
    shapes = list(scene.shapes)
    out: list[str] = []
    for _ in range(50 * n):  # distinct captions come within a few draws; the bound is generous
        p = _Annotator(rng, scene)
        caption = _pick_habit(rng, _templates(p, rng, shapes), P_TEMPLATE) + p.background
        if caption not in out:
            out.append(caption)
        if len(out) == n:
            return out
    raise RuntimeError(f"could not make {n} distinct captions for scene {scene.to_dict()}")


CAPTION_REQUESTS = (
    "Describe the image briefly.",
    "Write a short caption for this image.",
    "What does this picture show?",
    "Give a one-sentence description of the image.",
)
COUNT_QUESTIONS = ("How many shapes are there?", "How many shapes can you see?")


def make_qa(scene: Scene, rng: np.random.Generator) -> list[tuple[str, str]]:
    """All question/answer pairs that the scene supports (colours, counts, places, relations)."""
    shapes = list(scene.shapes)
    n = len(shapes)
    noun = "shape" if n == 1 else "shapes"
    verb = "is" if n == 1 else "are"
    qa = [
        (pick(rng, COUNT_QUESTIONS), f"There {verb} {COUNT_WORDS[n]} {noun}."),
        ("What colour is the background?", f"The background is {scene.background}."),
    ]
    for s in shapes:
        qa.append((f"What colour is the {s.kind}?", f"The {s.kind} is {s.colour}."))
        qa.append(
            (f"Where is the {s.kind}?", f"The {s.kind} is {pick(rng, PLACES[(s.row, s.col)])}.")
        )
        qa.append((f"Is the {s.kind} small or large?", f"The {s.kind} is {s.size}."))
        qa.append((f"Is there a {s.kind} in the image?", f"Yes, there is a {s.colour} {s.kind}."))
    absent = [k for k in KINDS if k not in {s.kind for s in shapes}]
    k = pick(rng, absent)
    qa.append((f"Is there a {k} in the image?", f"No, there is no {k}."))
    if n >= 2:
        i, j = (int(v) for v in rng.permutation(n)[:2])
        a, b = shapes[i], shapes[j]
        qa.append(
            (
                f"Where is the {a.kind} relative to the {b.kind}?",
                f"The {a.kind} is {pick(rng, RELATIONS[relation_key(a, b)])} the {b.kind}.",
            )
        )
    return qa


def make_conversation(
    scene: Scene, captions: list[str], rng: np.random.Generator
) -> list[dict[str, str]]:
    """2-4 Q&A turns plus one caption request, in random order; ``<image>`` opens turn one."""
    qa = make_qa(scene, rng)
    k = 2 + int(rng.integers(3))
    turns = [qa[int(i)] for i in rng.permutation(len(qa))[:k]]
    cap_turn = (pick(rng, CAPTION_REQUESTS), pick(rng, captions))
    turns.insert(int(rng.integers(len(turns) + 1)), cap_turn)
    conv: list[dict[str, str]] = []
    for t, (q, a) in enumerate(turns):
        conv.append({"from": "human", "value": f"<image>\n{q}" if t == 0 else q})
        conv.append({"from": "gpt", "value": a})
    return conv


def make_sample(
    seed: int,
    split: str,
    index: int,
    image_size: int = 64,
    max_shapes: int = MAX_SHAPES,
    jitter: bool = True,
) -> tuple[Scene, list[str], list[dict[str, str]], np.random.Generator]:
    """Scene, captions and conversation of one image, and its generator (drawing comes next)."""
    rng = image_rng(seed, split, index)
    scene = sample_scene(rng, image_size, max_shapes, jitter)
    captions = make_captions(scene, rng)
    conv = make_conversation(scene, captions, rng)
    return scene, captions, conv, rng


def iter_synthetic_texts(seed: int, n: int) -> Iterator[str]:
    """Captions, questions and answers of ``n`` scenes (no drawing): tokenizer training text."""
    for i in range(n):
        _, captions, conv, _ = make_sample(seed, "text", i, 64)
        yield from captions
        for turn in conv:
            yield turn["value"]
