"""Fact accuracy: consensus captions and references score 100 %; one wrong word, one lost fact."""

from __future__ import annotations

import dataclasses
import re

import pytest
from synthetic_checks import grid_scene

from lit_mllm.data import synthetic as syn
from lit_mllm.data.synthetic.facts import VOCABULARY

ALL_RIGHT = dict.fromkeys(syn.FACTS, True)
SCENES = [syn.make_sample(0, "val", i, 64)[0] for i in range(150)]


def _with(scene: syn.Scene, index: int, **change: object) -> syn.Scene:
    shapes = list(scene.shapes)
    shapes[index] = dataclasses.replace(shapes[index], **change)
    return dataclasses.replace(scene, shapes=tuple(shapes))


def _expected(scene: syn.Scene, index: int, fact: str) -> list[dict[str, bool]]:
    facts = [dict(ALL_RIGHT) for _ in scene.shapes]
    facts[index][fact] = False
    return facts


def test_consensus_captions_and_references_state_every_fact() -> None:
    consensus = [syn.consensus_caption(scene) for scene in SCENES]
    assert syn.fact_accuracy(consensus, SCENES) == {**ALL_RIGHT, "count": 1.0, "consensus": 1.0}
    captions, scenes = [], []
    for seed in range(2):
        for i in range(150):
            scene, references, _, _ = syn.make_sample(seed, "train", i, 64)
            captions += references
            scenes += [scene.to_dict()] * len(references)  # the COCO files' scene records
    scores = syn.fact_accuracy(captions, scenes)
    assert {k: scores[k] for k in (*syn.FACTS, "count")} == {**ALL_RIGHT, "count": 1.0}
    assert 0 < scores["consensus"] < 0.5  # references vary their wording


def test_a_wrong_colour_size_or_place_costs_exactly_that_fact() -> None:
    checked = 0
    for scene in SCENES:
        cells = {(s.row, s.col) for s in scene.shapes}
        free = next((r, c) for r in range(syn.GRID) for c in range(syn.GRID) if (r, c) not in cells)
        for i, shape in enumerate(scene.shapes):
            colour = next(c for c in syn.COLOURS if c != shape.colour)
            size = next(s for s in syn.SIZES if s != shape.size)
            for fact, change in (
                ("colour", {"colour": colour}),
                ("size", {"size": size}),
                ("place", {"row": free[0], "col": free[1]}),
            ):
                caption = syn.consensus_caption(_with(scene, i, **change))
                assert syn.shape_facts(caption, scene) == _expected(scene, i, fact), caption
                checked += 1
    assert checked >= 3 * 250


def test_a_wrong_kind_synonym_costs_exactly_the_kind() -> None:
    for scene in SCENES:
        caption = syn.consensus_caption(scene)
        drawn = {s.kind for s in scene.shapes}
        other = next(k for k in syn.KINDS if k not in drawn)
        for i, shape in enumerate(scene.shapes):
            wrong = re.sub(rf"\b{shape.kind}\b", syn.KIND_WORDS[other][1], caption, count=1)
            assert wrong != caption
            assert syn.shape_facts(wrong, scene) == _expected(scene, i, "kind"), wrong
            right = re.sub(rf"\b{shape.kind}\b", syn.KIND_WORDS[shape.kind][3], caption, count=1)
            assert syn.shape_facts(right, scene) == [ALL_RIGHT] * len(scene.shapes), right


def test_colour_synonyms_case_and_punctuation() -> None:
    scene = grid_scene(("circle", 1, 1))
    assert syn.shape_facts("A huge Scarlet ball, dead centre.", scene) == [ALL_RIGHT]
    assert syn.shape_facts("a huge cobalt ball dead centre", scene) == _expected(scene, 0, "colour")
    assert syn.shape_facts("a ball dead centre", scene) == [
        {"kind": True, "colour": False, "size": False, "place": True}
    ]


def test_relations_credit_places_only_when_every_one_holds() -> None:
    scene = grid_scene(("circle", 1, 0), ("square", 1, 2))
    both_wrong = [{**ALL_RIGHT, "place": False}] * 2
    for right, wrong in (
        ("a large red circle to the left of a large red square",
         "a large red circle to the right of a large red square"),
        ("the large red square is right of the large red circle",
         "the large red square is left of the large red circle"),
        ("a large red square with a large red circle on its left",
         "a large red square with a large red circle on its right"),
        ("from left to right: a large red circle and a large red square",
         "from left to right: a large red square and a large red circle"),
    ):  # fmt: skip
        assert syn.shape_facts(right, scene) == [ALL_RIGHT, ALL_RIGHT], right
        assert syn.shape_facts(wrong, scene) == both_wrong, wrong
    # "to the left of" also says "in the same row": not true of a shape one row up
    diagonal = grid_scene(("circle", 0, 0), ("square", 1, 2))
    caption = "a large red circle to the left of a large red square"
    assert syn.shape_facts(caption, diagonal) == both_wrong
    # a right absolute place does not excuse a wrong relation: every claim must hold
    caption = "a large red circle on the left, to the right of a large red square on the right"
    assert syn.shape_facts(caption, scene) == both_wrong
    # a relation with the place of the other shape stated absolutely
    caption = "a large red circle to the left of a large red square on the right"
    assert syn.shape_facts(caption, scene) == [ALL_RIGHT, ALL_RIGHT]


def test_missing_and_extra_shapes() -> None:
    scene = grid_scene(("circle", 0, 0), ("star", 2, 2))
    one = "a large red circle in the top left corner"
    assert syn.shape_facts(one, scene) == [ALL_RIGHT, dict.fromkeys(syn.FACTS, False)]
    three = one + ", a large red star in the bottom right corner and a small blue cross on the left"
    assert syn.shape_facts(three, scene) == [ALL_RIGHT, ALL_RIGHT]
    scores = syn.fact_accuracy([one, three], [scene, scene])
    assert scores == {"kind": 0.75, "colour": 0.75, "size": 0.75, "place": 0.75, "count": 0.0,
                      "consensus": 0.0}  # fmt: skip


def test_inputs_are_checked() -> None:
    with pytest.raises(ValueError, match="2 captions for 1 scenes"):
        syn.fact_accuracy(["a", "b"], SCENES[:1])
    with pytest.raises(ValueError, match="at least one caption"):
        syn.fact_accuracy([], [])


def test_every_annotator_phrase_has_one_meaning() -> None:
    tables = (
        syn.SIZE_WORDS, syn.COLOUR_WORDS, syn.KIND_WORDS, syn.PLACES, syn.RELATIONS,
        syn.RELATIONS_ITS,
    )  # fmt: skip
    phrases = [p for table in tables for words in table.values() for p in words]
    assert len(phrases) == len(set(phrases))
    assert set(phrases) < set(VOCABULARY)
