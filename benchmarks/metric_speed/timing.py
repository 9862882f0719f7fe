"""Both implementations timed on the same captions, and the check that their numbers agree."""

from __future__ import annotations

import contextlib
import io
import json
import time
from pathlib import Path

from lit_mllm.metrics.caption import CaptionMetrics

TOLERANCE = 1e-9
METRICS = ("BLEU", "METEOR", "ROUGE_L", "CIDEr")


class _StubSpice:
    """Stands in for pycocoevalcap's Spice (its CoreNLP jars cannot be fetched offline)."""

    def method(self) -> str:
        return "SPICE"

    def compute_score(self, gts: dict, res: dict) -> tuple[float, list[float]]:
        return 0.0, [0.0] * len(gts)


def _timed_class(cls: type, name: str, timings: dict[str, float], method: str) -> type:
    """A subclass of ``cls`` whose ``method`` adds its wall time to ``timings[name]``."""

    def wrapper(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return getattr(cls, method)(self, *args, **kwargs)
        finally:
            timings[name] = timings.get(name, 0.0) + time.perf_counter() - start

    return type(cls.__name__, (cls,), {method: wrapper})


def run_cocoevalcap(
    workdir: Path, references: dict[int, list[str]], predictions: dict[int, str]
) -> tuple[dict[str, float], float, dict[str, float]]:
    """Plain COCOEvalCap on COCO json files; returns (scores, seconds, per-scorer seconds)."""
    import pycocoevalcap.eval as coco_eval
    from pycocotools.coco import COCO

    annotations = {
        "images": [{"id": i} for i in references],
        "annotations": [
            {"id": len(refs) * i + k, "image_id": i, "caption": caption}
            for i, refs in references.items()
            for k, caption in enumerate(refs)
        ],
    }
    results = [{"image_id": i, "caption": c} for i, c in predictions.items()]
    (workdir / "captions.json").write_text(json.dumps(annotations))
    (workdir / "results.json").write_text(json.dumps(results))
    timings: dict[str, float] = {}
    originals = {
        n: getattr(coco_eval, n)
        for n in ("PTBTokenizer", "Bleu", "Meteor", "Rouge", "Cider", "Spice")
    }
    try:
        coco_eval.PTBTokenizer = _timed_class(
            originals["PTBTokenizer"], "tokenize", timings, "tokenize"
        )
        coco_eval.Spice = _StubSpice
        for name, key in (("Bleu", "BLEU"), ("Rouge", "ROUGE_L"), ("Cider", "CIDEr")):
            setattr(coco_eval, name, _timed_class(originals[name], key, timings, "compute_score"))
        # METEOR time includes its JVM start-up, which happens in Meteor.__init__
        meteor_cls = originals["Meteor"]
        timed_meteor = _timed_class(meteor_cls, "METEOR", timings, "compute_score")
        timed_meteor = _timed_class(timed_meteor, "METEOR", timings, "__init__")
        coco_eval.Meteor = timed_meteor
        with contextlib.redirect_stdout(io.StringIO()):
            coco = COCO(str(workdir / "captions.json"))
            coco_results = coco.loadRes(str(workdir / "results.json"))
            start = time.perf_counter()
            evaluator = coco_eval.COCOEvalCap(coco, coco_results)
            evaluator.evaluate()
            seconds = time.perf_counter() - start
    finally:
        for name, value in originals.items():
            setattr(coco_eval, name, value)
    scores = {k: v for k, v in evaluator.eval.items() if k != "SPICE"}
    return scores, seconds, timings


def run_metric(
    metric: CaptionMetrics | None,
    references: dict[int, list[str]],
    predictions: dict[int, str],
    pre_start: bool = False,
    batch_size: int = 64,
) -> tuple[CaptionMetrics, dict[str, float], float]:
    """Update batch by batch and compute; timed from construction when `metric` is None."""
    start = time.perf_counter()
    if metric is None:
        metric = CaptionMetrics(metrics=METRICS)
    metric.reset()
    ids = list(references)
    for i in range(0, len(ids), batch_size):
        batch = ids[i : i + batch_size]
        metric.update(batch, [predictions[j] for j in batch], [references[j] for j in batch])
    if pre_start:  # what a validation loop longer than the JVM start-up gives us
        metric.scorer.meteor.wait_ready()
        start = time.perf_counter()
    scores = metric.compute()
    return metric, scores, time.perf_counter() - start


def check_equal(ours: dict[str, float], reference: dict[str, float], label: str) -> None:
    """Fail unless every score matches: the speed comparison only counts for equal numbers."""
    assert ours.keys() == reference.keys(), (label, ours.keys(), reference.keys())
    for key, value in reference.items():
        assert abs(ours[key] - value) <= TOLERANCE, f"{label} {key}: {ours[key]!r} != {value!r}"


def fmt(timings: dict[str, float]) -> str:
    """Per-scorer seconds on one line."""
    return ", ".join(f"{k} {v:.2f}s" for k, v in timings.items())
