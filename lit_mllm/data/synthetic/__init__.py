"""Synthetic shape-captioning data: the embedded default data set that needs no download.

``settings`` (what a set is made of), ``scene`` (shapes and drawing), ``language`` (captions,
questions, conversations), ``writer`` (files on disk) and ``facts`` (fact accuracy of captions
against scenes). The names other code uses are importable from here.
"""

from lit_mllm.data.synthetic.facts import FACTS, fact_accuracy, read_caption, shape_facts
from lit_mllm.data.synthetic.language import (
    COLOUR_WORDS,
    COUNT_WORDS,
    KIND_WORDS,
    NUM_CAPTIONS,
    PLACES,
    RELATIONS,
    RELATIONS_ITS,
    SIZE_WORDS,
    consensus_caption,
    iter_synthetic_texts,
    make_captions,
    make_conversation,
    make_qa,
    make_sample,
)
from lit_mllm.data.synthetic.scene import (
    BACKGROUNDS,
    COLOURS,
    GRID,
    KINDS,
    NOISE_SIGMA,
    SIZES,
    Scene,
    Shape,
    draw_scene,
    image_rng,
    relation_key,
    sample_scene,
)
from lit_mllm.data.synthetic.settings import MAX_SHAPES, SYNTHETIC_VERSION, SyntheticSettings
from lit_mllm.data.synthetic.writer import (
    MANIFEST,
    ensure_written,
    generate_synthetic_dataset,
    load_references,
    read_manifest,
    write_synthetic,
)

__all__ = [
    "BACKGROUNDS",
    "COLOURS",
    "COLOUR_WORDS",
    "COUNT_WORDS",
    "FACTS",
    "GRID",
    "KINDS",
    "KIND_WORDS",
    "MANIFEST",
    "MAX_SHAPES",
    "NOISE_SIGMA",
    "NUM_CAPTIONS",
    "PLACES",
    "RELATIONS",
    "RELATIONS_ITS",
    "SIZES",
    "SIZE_WORDS",
    "SYNTHETIC_VERSION",
    "Scene",
    "Shape",
    "SyntheticSettings",
    "consensus_caption",
    "draw_scene",
    "ensure_written",
    "fact_accuracy",
    "generate_synthetic_dataset",
    "image_rng",
    "iter_synthetic_texts",
    "load_references",
    "make_captions",
    "make_conversation",
    "make_qa",
    "make_sample",
    "read_caption",
    "read_manifest",
    "relation_key",
    "sample_scene",
    "shape_facts",
    "write_synthetic",
]
