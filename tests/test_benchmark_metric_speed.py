"""The metric-speed benchmark's synthetic captions and its equality check (no JVM needed)."""

from __future__ import annotations

import pytest

pytest.importorskip("pycocoevalcap")  # caption metrics; not on every GPU image

from benchmarks.metric_speed.captions import make_predictions, make_references
from benchmarks.metric_speed.timing import check_equal


def test_references_and_predictions_are_seeded_and_partly_overlap() -> None:
    references = make_references(200, seed=0)
    assert references == make_references(200, seed=0)
    assert references != make_references(200, seed=1)
    assert list(references) == list(range(100_000, 100_200))
    assert all(len(refs) == 5 and all(r.strip() for r in refs) for refs in references.values())
    predictions = make_predictions(references, seed=1)
    assert predictions == make_predictions(references, seed=1)
    assert predictions.keys() == references.keys()
    # most predictions share words with a reference of their image, but are not a copy of one
    shared = [
        bool(set(p.split()) & {w for r in references[i] for w in r.split()})
        for i, p in predictions.items()
    ]
    assert sum(shared) > 0.8 * len(shared)
    assert sum(p in references[i] for i, p in predictions.items()) < 0.2 * len(predictions)


def test_check_equal_accepts_1e_9_and_rejects_more() -> None:
    reference = {"BLEU": 0.5, "CIDEr": 1.25}
    check_equal({"BLEU": 0.5 + 5e-10, "CIDEr": 1.25}, reference, "close")
    with pytest.raises(AssertionError, match="CIDEr"):
        check_equal({"BLEU": 0.5, "CIDEr": 1.25 + 1e-8}, reference, "off")
    with pytest.raises(AssertionError):
        check_equal({"BLEU": 0.5}, reference, "missing")
