"""Synthetic shape-captioning data: the embedded default data set that needs no download.

Each image shows 1-3 non-overlapping coloured shapes on a 3x3 grid. Every image gets five
reference captions that state the same facts (kind, colour, size and place of every shape), each
written by a simulated annotator with its own wording habits (synonyms, templates, openings), plus
a LLaVA-style multi-turn conversation. As with human captions, the most common wording (the
consensus caption) scores about twice the leave-one-out reference, so the metric rewards a model
that gets the facts right. All randomness comes from a per-image
generator seeded by ``(seed, split, index)``, so the output is byte-identical whatever the number
of worker processes. Each COCO ``images`` entry also carries its ``scene`` (the drawn facts), which
pycocotools ignores and tests use to check captions against pixels.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from PIL import Image, ImageDraw

SYNTHETIC_VERSION = "2.0"
SPLIT_CODES = {"train": 0, "val": 1, "test": 2, "text": 3}
NUM_CAPTIONS = 5
GRID = 3
SUPERSAMPLE = 4

KINDS = ("circle", "square", "triangle", "star", "diamond", "cross")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 230),
    "yellow": (245, 215, 40),
    "purple": (150, 60, 200),
    "orange": (250, 140, 30),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "black": (10, 10, 10),
    "gray": (128, 128, 128),
}
SIZES = ("small", "large")
SIZE_WORDS = {
    "small": ("small", "little", "tiny", "smallish", "miniature"),
    "large": ("large", "big", "huge", "sizeable", "giant"),
}
SIZE_FRACTION = {"small": 0.17, "large": 0.28}  # diameter as a fraction of the image side
NOISE_SIGMA = 12.0

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

T = TypeVar("T")


@dataclass(frozen=True)
class Shape:
    """One drawn shape; ``cx``, ``cy`` and ``diameter`` are in pixels of the final image."""

    kind: str
    colour: str
    size: str
    row: int
    col: int
    cx: float
    cy: float
    diameter: float


@dataclass(frozen=True)
class Scene:
    """The facts of one image, kept so captions and tests can be checked against the drawing."""

    shapes: tuple[Shape, ...]
    background: str
    noise: bool
    image_size: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "shapes": [asdict(s) for s in self.shapes],
            "background": self.background,
            "noise": self.noise,
            "image_size": self.image_size,
        }

    @staticmethod
    def from_dict(d: dict[str, Any]) -> Scene:
        shapes = tuple(Shape(**s) for s in d["shapes"])
        return Scene(shapes, d["background"], bool(d["noise"]), int(d["image_size"]))


def _pick(rng: np.random.Generator, seq: Sequence[T]) -> T:
    return seq[int(rng.integers(len(seq)))]


def image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of one image: depends only on (seed, split, index), not on worker layout."""
    return np.random.default_rng([int(seed), SPLIT_CODES[split], int(index)])


# ----------------------------------------------------------------------------- scenes and drawing


MAX_SHAPES = 3


def _check_max_shapes(max_shapes: int) -> None:
    if not 1 <= max_shapes <= MAX_SHAPES:
        raise ValueError(f"max_shapes must be in 1..{MAX_SHAPES}, got {max_shapes}")


def sample_scene(
    rng: np.random.Generator,
    image_size: int = 64,
    max_shapes: int = MAX_SHAPES,
    jitter: bool = True,
) -> Scene:
    """Draw 1..max_shapes shapes of distinct kinds into distinct grid cells (never overlapping).

    ``jitter`` moves each shape randomly inside its cell; without it every shape sits at its
    cell's centre, so a kind always looks the same (an easier task for tiny random encoders).
    """
    _check_max_shapes(max_shapes)
    n = 1 + int(rng.integers(max_shapes))
    kinds = [KINDS[i] for i in rng.permutation(len(KINDS))[:n]]
    cells = [divmod(int(c), GRID) for c in rng.permutation(GRID * GRID)[:n]]
    colour_names = list(COLOURS)
    cell = image_size / GRID
    shapes = []
    for kind, (row, col) in zip(kinds, cells, strict=True):
        colour = _pick(rng, colour_names)
        size = _pick(rng, SIZES)
        diameter = SIZE_FRACTION[size] * image_size
        slack = max(0.0, (cell - diameter) / 2 - 0.04 * cell) if jitter else 0.0
        cx = (col + 0.5) * cell + float(rng.uniform(-slack, slack))
        cy = (row + 0.5) * cell + float(rng.uniform(-slack, slack))
        shapes.append(Shape(kind, colour, size, row, col, round(cx, 3), round(cy, 3), diameter))
    shapes.sort(key=lambda s: (s.row, s.col))  # reading order: the canonical caption order
    background = "white" if rng.random() < 0.5 else _pick(rng, ("black", "gray"))
    noise = bool(rng.random() < 0.3)
    return Scene(tuple(shapes), background, noise, image_size)


def _shape_polygon(kind: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if kind == "square":
        h = 0.85 * r
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if kind == "triangle":
        cy += 0.15 * r  # centre the triangle's bounding box on the cell point
        angles = np.deg2rad([-90.0, 30.0, 150.0])
        return [(cx + 1.1 * r * np.cos(a), cy + 1.1 * r * np.sin(a)) for a in angles]
    if kind == "star":
        pts = []
        for i in range(10):
            rad = r if i % 2 == 0 else 0.45 * r
            a = np.deg2rad(-90.0 + 36.0 * i)
            pts.append((cx + rad * np.cos(a), cy + 0.08 * r + rad * np.sin(a)))
        return pts
    if kind == "diamond":
        return [(cx, cy - r), (cx + 0.75 * r, cy), (cx, cy + r), (cx - 0.75 * r, cy)]
    if kind == "cross":
        t = 0.32 * r
        return [
            (cx - t, cy - r), (cx + t, cy - r), (cx + t, cy - t), (cx + r, cy - t),
            (cx + r, cy + t), (cx + t, cy + t), (cx + t, cy + r), (cx - t, cy + r),
            (cx - t, cy + t), (cx - r, cy + t), (cx - r, cy - t), (cx - t, cy - t),
        ]  # fmt: skip
    raise ValueError(f"unknown shape kind {kind!r}; expected one of {KINDS}")


def draw_scene(scene: Scene, rng: np.random.Generator) -> Image.Image:
    """Render at 4x and box-downsample (anti-aliased edges), then add optional Gaussian noise."""
    big = scene.image_size * SUPERSAMPLE
    img = Image.new("RGB", (big, big), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(img)
    for s in scene.shapes:
        cx, cy, r = s.cx * SUPERSAMPLE, s.cy * SUPERSAMPLE, s.diameter * SUPERSAMPLE / 2
        fill = COLOURS[s.colour]
        if s.kind == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        else:
            draw.polygon(_shape_polygon(s.kind, cx, cy, r), fill=fill)
    img = img.reduce(SUPERSAMPLE)
    if scene.noise:
        arr = np.asarray(img, dtype=np.float32)
        arr = arr + rng.normal(0.0, NOISE_SIGMA, size=arr.shape).astype(np.float32)
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "RGB")
    return img


# ----------------------------------------------------------------------------- captions


def _sign(x: int) -> int:
    return (x > 0) - (x < 0)


def relation_key(a: Shape, b: Shape) -> tuple[int, int]:
    """Where ``a`` lies relative to ``b`` as (vertical, horizontal) signs; -1 = above/left."""
    return _sign(a.row - b.row), _sign(a.col - b.col)


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


# ----------------------------------------------------------------------------- conversations

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
        (_pick(rng, COUNT_QUESTIONS), f"There {verb} {COUNT_WORDS[n]} {noun}."),
        ("What colour is the background?", f"The background is {scene.background}."),
    ]
    for s in shapes:
        qa.append((f"What colour is the {s.kind}?", f"The {s.kind} is {s.colour}."))
        qa.append(
            (f"Where is the {s.kind}?", f"The {s.kind} is {_pick(rng, PLACES[(s.row, s.col)])}.")
        )
        qa.append((f"Is the {s.kind} small or large?", f"The {s.kind} is {s.size}."))
        qa.append((f"Is there a {s.kind} in the image?", f"Yes, there is a {s.colour} {s.kind}."))
    absent = [k for k in KINDS if k not in {s.kind for s in shapes}]
    k = _pick(rng, absent)
    qa.append((f"Is there a {k} in the image?", f"No, there is no {k}."))
    if n >= 2:
        i, j = (int(v) for v in rng.permutation(n)[:2])
        a, b = shapes[i], shapes[j]
        qa.append(
            (
                f"Where is the {a.kind} relative to the {b.kind}?",
                f"The {a.kind} is {_pick(rng, RELATIONS[relation_key(a, b)])} the {b.kind}.",
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
    cap_turn = (_pick(rng, CAPTION_REQUESTS), _pick(rng, captions))
    turns.insert(int(rng.integers(len(turns) + 1)), cap_turn)
    conv: list[dict[str, str]] = []
    for t, (q, a) in enumerate(turns):
        conv.append({"from": "human", "value": f"<image>\n{q}" if t == 0 else q})
        conv.append({"from": "gpt", "value": a})
    return conv


# ----------------------------------------------------------------------------- generation


@dataclass(frozen=True)
class _Job:
    out_dir: str
    split: str
    index: int
    image_id: int
    seed: int
    image_size: int
    image_format: str
    max_shapes: int
    jitter: bool


def _make_sample(
    seed: int,
    split: str,
    index: int,
    image_size: int,
    max_shapes: int = MAX_SHAPES,
    jitter: bool = True,
) -> tuple[Scene, list[str], list[dict[str, str]], np.random.Generator]:
    rng = image_rng(seed, split, index)
    scene = sample_scene(rng, image_size, max_shapes, jitter)
    captions = make_captions(scene, rng)
    conv = make_conversation(scene, captions, rng)
    return scene, captions, conv, rng


def _render_one(job: _Job) -> dict[str, Any]:
    scene, captions, conv, rng = _make_sample(
        job.seed, job.split, job.index, job.image_size, job.max_shapes, job.jitter
    )
    img = draw_scene(scene, rng)
    file_name = f"{job.image_id:06d}.{job.image_format}"
    path = Path(job.out_dir) / "images" / job.split / file_name
    if job.image_format == "png":
        img.save(path, format="PNG", optimize=False, compress_level=6)
    else:
        img.save(path, format="JPEG", quality=95, subsampling=0)
    return {
        "id": job.image_id,
        "file_name": file_name,
        "scene": scene.to_dict(),
        "captions": captions,
        "conversations": conv,
    }


def _mp_context() -> multiprocessing.context.BaseContext:
    """Fork where the OS has it: it starts fast and works from notebooks and stdin scripts
    (spawn re-imports ``__main__``); the workers only touch numpy and PIL."""
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else "spawn")


def _render_chunk(jobs: list[_Job]) -> list[dict[str, Any]]:
    return [_render_one(j) for j in jobs]


def _dump(path: Path, obj: Any, indent: int | None = None) -> None:
    seps = (",", ": ") if indent else (",", ":")
    path.write_text(json.dumps(obj, indent=indent, separators=seps, ensure_ascii=False) + "\n")


_OWNED_IMAGE = re.compile(r"^\d{6,}\.(png|jpg)$")


def _prepare_out_dir(out: Path, splits: list[str]) -> None:
    """Refuse foreign non-empty folders; clear only our own old images so no stale file remains."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"output path {out} exists and is not a folder; choose a folder path")
    if out.exists() and any(out.iterdir()) and not (out / "synthetic_manifest.json").exists():
        raise ValueError(
            f"{out} is not empty and holds no synthetic_manifest.json; "
            "choose an empty or new folder for the synthetic data set"
        )
    for split in SPLIT_CODES:
        d = out / "images" / split
        if d.is_dir():
            for f in d.iterdir():
                if _OWNED_IMAGE.match(f.name):
                    f.unlink()
    for split in splits:
        (out / "images" / split).mkdir(parents=True, exist_ok=True)


def generate_synthetic_dataset(
    out_dir: str | Path,
    num_train: int,
    num_val: int,
    num_test: int = 0,
    seed: int = 0,
    image_size: int = 64,
    image_format: str = "png",
    workers: int | None = None,
    max_shapes: int = MAX_SHAPES,
    jitter: bool = True,
) -> dict[str, Any]:
    """Write images, COCO caption files, LLaVA conversation files and a manifest; return a summary.

    Image ids run 1..N over train, then val, then test, so they are unique across splits; file
    names are the zero-padded id. ``workers=None`` uses all CPU cores; 0 or 1 runs in-process.
    """
    if image_format not in ("png", "jpg"):
        raise ValueError(f"image_format must be 'png' or 'jpg', got {image_format!r}")
    if image_size < 24:
        raise ValueError(f"image_size must be >= 24 pixels, got {image_size}")
    _check_max_shapes(max_shapes)  # here too: fail before any worker starts
    counts = {"train": int(num_train), "val": int(num_val), "test": int(num_test)}
    if any(v < 0 for v in counts.values()) or counts["train"] + counts["val"] == 0:
        raise ValueError(f"need non-negative counts and at least one train or val image: {counts}")
    splits = [s for s in ("train", "val", "test") if counts[s] > 0 or s != "test"]
    out = Path(out_dir)
    t0 = time.perf_counter()
    _prepare_out_dir(out, splits)

    jobs: dict[str, list[_Job]] = {}
    next_id = 1
    for split in splits:
        jobs[split] = [
            _Job(
                str(out), split, i, next_id + i, seed, image_size, image_format, max_shapes, jitter
            )
            for i in range(counts[split])
        ]
        next_id += counts[split]
    all_jobs = [j for s in splits for j in jobs[s]]
    chunk = 64
    chunks = [all_jobs[i : i + chunk] for i in range(0, len(all_jobs), chunk)]
    n_workers = (os.cpu_count() or 1) if workers is None else int(workers)
    n_workers = max(1, min(n_workers, len(chunks)))
    if n_workers == 1:
        results = [r for c in chunks for r in _render_chunk(c)]
    else:
        with ProcessPoolExecutor(n_workers, mp_context=_mp_context()) as pool:
            results = [r for rs in pool.map(_render_chunk, chunks) for r in rs]
    by_id = {r["id"]: r for r in results}

    for split in splits:
        recs = [by_id[j.image_id] for j in jobs[split]]
        _write_split(out, split, recs, image_size)
    manifest = {
        "name": "lit-mllm synthetic shapes",
        **manifest_settings(num_train, num_val, num_test, seed, image_size, max_shapes, jitter),
        "image_format": image_format,
        "captions_per_image": NUM_CAPTIONS,
        "kinds": list(KINDS),
        "colours": list(COLOURS),
        "backgrounds": list(BACKGROUNDS),
    }
    _dump(out / "synthetic_manifest.json", manifest, indent=2)
    return {
        "out_dir": str(out),
        "counts": manifest["counts"],
        "images": len(results),
        "workers": n_workers,
        "seconds": round(time.perf_counter() - t0, 3),
        "manifest": str(out / "synthetic_manifest.json"),
    }


def manifest_settings(
    num_train: int,
    num_val: int,
    num_test: int,
    seed: int,
    image_size: int,
    max_shapes: int,
    jitter: bool,
) -> dict[str, Any]:
    """The manifest fields that decide what a set holds (a test split only when it has images):
    a manifest with all of them was written with these settings."""
    counts = {"train": int(num_train), "val": int(num_val)}
    if num_test:
        counts["test"] = int(num_test)
    return {
        "version": SYNTHETIC_VERSION,
        "seed": int(seed),
        "image_size": int(image_size),
        "max_shapes": int(max_shapes),
        "jitter": bool(jitter),
        "counts": counts,
    }


def _write_split(out: Path, split: str, recs: list[dict[str, Any]], image_size: int) -> None:
    images, annotations, llava = [], [], []
    for r in recs:
        images.append(
            {
                "id": r["id"],
                "file_name": r["file_name"],
                "width": image_size,
                "height": image_size,
                "scene": r["scene"],
            }
        )
        for k, cap in enumerate(r["captions"]):
            annotations.append(
                {"id": (r["id"] - 1) * NUM_CAPTIONS + k + 1, "image_id": r["id"], "caption": cap}
            )
        llava.append(
            {
                "id": f"{r['id']:06d}",
                "image": f"{split}/{r['file_name']}",
                "conversations": r["conversations"],
            }
        )
    coco = {
        "info": {
            "description": f"lit-mllm synthetic shapes, {split} split",
            "version": SYNTHETIC_VERSION,
            "year": 2025,
        },
        "licenses": [
            {
                "id": 1,
                "name": "CC0-1.0",
                "url": "https://creativecommons.org/publicdomain/zero/1.0/",
            }
        ],
        "images": images,
        "annotations": annotations,
    }
    _dump(out / f"captions_{split}.json", coco)
    if split in ("train", "val"):
        _dump(out / f"llava_{split}.json", llava)


def load_references(out_dir: str | Path, split: str = "val") -> dict[int, list[str]]:
    """The reference captions of a split as ``{image_id: [caption, ...]}``."""
    coco = json.loads((Path(out_dir) / f"captions_{split}.json").read_text())
    refs: dict[int, list[str]] = {img["id"]: [] for img in coco["images"]}
    for ann in coco["annotations"]:
        refs[ann["image_id"]].append(ann["caption"])
    return refs


def iter_synthetic_texts(seed: int, n: int) -> Iterator[str]:
    """Captions, questions and answers of ``n`` scenes (no drawing): tokenizer training text."""
    for i in range(n):
        _, captions, conv, _ = _make_sample(seed, "text", i, 64)
        yield from captions
        for turn in conv:
            yield turn["value"]
