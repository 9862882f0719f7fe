"""Fact accuracy: does a caption state the kind, colour, size and place of every drawn shape?

n-gram metrics reward wording; this checks facts, with the vocabulary the annotators use
(``language.py``): every synonym of a kind, colour and size, every place phrase and relation
phrase. A pure function of captions and scenes (the COCO files carry each image's ``scene``),
so a report can run it on any model's captions.

How a caption is read:

- A *mention* is a kind word with the size and colour words written before it ("a big crimson
  disc"). Phrases are matched longest first, so "on the left of" is a relation, not a place.
- A place phrase belongs to the mention before it if that one has no place yet ("a red circle in
  the centre"), else to the next mention ("in the centre there is a red circle").
- "A <relation> B" relates the mentions around the phrase; "B with A <on its left>" relates A to
  B; "from left to right: A, B and C" orders neighbours left to right (rows not stated), "from top
  to bottom" top to bottom (columns not stated).
- Mentions are matched to shapes (at most one each) so that the most facts agree; ties go to
  caption order. Kinds differ within a scene, but a wrong kind word still finds its shape by
  colour, size and place.

How facts are credited, per drawn shape (a shape no mention matches gets none):

- kind, colour, size: the matched mention names them (any synonym), and rightly.
- place: every place claim about the shape is true, and there is at least one. Claims are its
  absolute place phrases and every relation it takes part in; a relation is true when the shapes
  lie that way (a relation implies places only relative to the other shape, so "A to the left of
  B" credits both places exactly when A is in B's row and left of it, as the annotators say it).
  One wrong relation costs both shapes in it their place.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from lit_mllm.data.synthetic.language import (
    COLOUR_WORDS,
    KIND_WORDS,
    PLACES,
    RELATIONS,
    RELATIONS_ITS,
    SIZE_WORDS,
    consensus_caption,
)
from lit_mllm.data.synthetic.scene import Scene, Shape, relation_key

FACTS = ("kind", "colour", "size", "place")
# (vertical, horizontal) signs of subject vs object; None: the caption does not say
Direction = tuple[int | None, int | None]
ORDERS: dict[str, Direction] = {"from left to right": (None, -1), "from top to bottom": (-1, None)}


def _vocabulary() -> dict[str, tuple[str, Any]]:
    """Every phrase the annotators write, mapped to (what it is, what it says)."""
    tables: list[tuple[str, Mapping[Any, Sequence[str]]]] = [
        ("size", SIZE_WORDS),
        ("colour", COLOUR_WORDS),
        ("kind", KIND_WORDS),
        ("place", PLACES),
        ("relation", RELATIONS),
        ("relation_its", RELATIONS_ITS),
        ("order", {key: (phrase,) for phrase, key in ORDERS.items()}),
    ]
    vocabulary: dict[str, tuple[str, Any]] = {}
    for what, table in tables:
        for value, phrases in table.items():
            for phrase in phrases:
                if vocabulary.setdefault(phrase, (what, value)) != (what, value):
                    raise ValueError(f"the phrase {phrase!r} means two things: fix language.py")
    return vocabulary


VOCABULARY = _vocabulary()
_PHRASE = re.compile(
    r"(?<![a-z])(?:"
    + "|".join(re.escape(p).replace(r"\ ", r"\s+") for p in sorted(VOCABULARY, key=len)[::-1])
    + r")(?![a-z])"
)


@dataclass
class Mention:
    """One shape as a caption names it; ``places`` are the grid cells stated for it."""

    kind: str
    colour: str | None
    size: str | None
    places: list[tuple[int, int]] = field(default_factory=list)


@dataclass(frozen=True)
class Relation:
    """The caption says mention ``subject`` lies in ``direction`` of mention ``object``."""

    subject: int
    object: int
    direction: Direction


@dataclass
class ReadCaption:
    """What a caption states: its mentions in caption order, and relations between them."""

    mentions: list[Mention] = field(default_factory=list)
    relations: list[Relation] = field(default_factory=list)


def read_caption(caption: str) -> ReadCaption:
    """The mentions and relations a caption states (see the module docstring for the rules)."""
    out = ReadCaption()
    size = colour = None
    waiting_places: list[tuple[int, int]] = []
    relation_from: tuple[int, Direction] | None = None  # "A <relation>" waits for B
    order: tuple[int, Direction] | None = None  # (first mention of the list, direction)
    for match in _PHRASE.finditer(caption.lower()):
        what, value = VOCABULARY[re.sub(r"\s+", " ", match.group())]
        last = len(out.mentions) - 1
        if what == "size":
            size = value
        elif what == "colour":
            colour = value
        elif what == "kind":
            out.mentions.append(Mention(value, colour, size, waiting_places))
            size = colour = None
            waiting_places = []
            index = last + 1
            if relation_from is not None:
                out.relations.append(Relation(relation_from[0], index, relation_from[1]))
                relation_from = None
            if order is not None and index > order[0]:
                out.relations.append(Relation(index - 1, index, order[1]))
        elif what == "place":
            if last >= 0 and not out.mentions[last].places and not waiting_places:
                out.mentions[last].places.append(value)
            else:
                waiting_places.append(value)
        elif what == "relation" and last >= 0:
            relation_from = (last, value)
        elif what == "relation_its" and last >= 1:
            out.relations.append(Relation(last, last - 1, value))
        elif what == "order":
            order = (last + 1, value)
    return out


def _agrees(shape: Shape, mention: Mention) -> int:
    """How many facts of ``shape`` the mention states rightly, absolute places only."""
    place = bool(mention.places) and all(p == (shape.row, shape.col) for p in mention.places)
    return (
        (mention.kind == shape.kind)
        + (mention.colour == shape.colour)
        + (mention.size == shape.size)
        + place
    )


def _match(shapes: Sequence[Shape], mentions: Sequence[Mention]) -> list[int | None]:
    """The mention of each shape (None: unnamed), chosen so that the most facts agree."""
    n, k = len(shapes), len(mentions)
    agrees = [[_agrees(s, m) for m in mentions] + [0] * n for s in shapes]  # >= k: unnamed
    best: tuple[int, list[int | None]] = (-1, [None] * n)
    for picks in itertools.permutations(range(k + n), n):
        score = sum(agrees[i][m] for i, m in enumerate(picks))
        if score > best[0]:
            best = (score, [m if m < k else None for m in picks])
    return best[1]


def _holds(direction: Direction, subject: Shape, obj: Shape) -> bool:
    actual = relation_key(subject, obj)
    return all(d is None or d == a for d, a in zip(direction, actual, strict=True))


def shape_facts(caption: str, scene: Scene) -> list[dict[str, bool]]:
    """For each shape of ``scene`` (in its order): which of its facts the caption states rightly."""
    read = read_caption(caption)
    matched = _match(scene.shapes, read.mentions)
    shape_of = {m: scene.shapes[i] for i, m in enumerate(matched) if m is not None}
    out = []
    for shape, m in zip(scene.shapes, matched, strict=True):
        if m is None:
            out.append(dict.fromkeys(FACTS, False))
            continue
        mention = read.mentions[m]
        claims = [p == (shape.row, shape.col) for p in mention.places]
        for r in read.relations:
            if m in (r.subject, r.object):
                subject, obj = shape_of.get(r.subject), shape_of.get(r.object)
                claims.append(
                    subject is not None and obj is not None and _holds(r.direction, subject, obj)
                )
        out.append(
            {
                "kind": mention.kind == shape.kind,
                "colour": mention.colour == shape.colour,
                "size": mention.size == shape.size,
                "place": bool(claims) and all(claims),
            }
        )
    return out


def fact_accuracy(
    captions: Sequence[str], scenes: Sequence[Scene | Mapping[str, Any]]
) -> dict[str, float]:
    """Share of drawn shapes whose kind, colour, size and place the captions state rightly;
    ``count``: share of captions that name as many shapes as are drawn; ``consensus``: share
    of captions that are exactly the consensus caption. ``scenes`` may be COCO ``scene`` dicts."""
    if len(captions) != len(scenes):
        raise ValueError(f"fact_accuracy got {len(captions)} captions for {len(scenes)} scenes")
    if not captions:
        raise ValueError("fact_accuracy needs at least one caption and its scene")
    right = dict.fromkeys(FACTS, 0)
    shapes = counted = consensus = 0
    for caption, given in zip(captions, scenes, strict=True):
        scene = given if isinstance(given, Scene) else Scene.from_dict(dict(given))
        for facts in shape_facts(caption, scene):
            for fact in FACTS:
                right[fact] += facts[fact]
        shapes += len(scene.shapes)
        counted += len(read_caption(caption).mentions) == len(scene.shapes)
        consensus += caption.strip() == consensus_caption(scene)
    return {
        **{fact: right[fact] / shapes for fact in FACTS},
        "count": counted / len(captions),
        "consensus": consensus / len(captions),
    }
