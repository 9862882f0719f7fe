"""Caption metric speed: `CaptionMetrics` vs plain pycocoevalcap `COCOEvalCap`, side by side.

Makes seeded synthetic COCO-style data (N images x 5 references, predictions that partly
overlap them), runs COCOEvalCap(coco, cocoRes).evaluate() (SPICE stubbed out: it needs
CoreNLP jars that cannot be downloaded offline) and CaptionMetrics without SPICE on the same
data, asserts every number matches to 1e-9, and prints total and per-scorer times.

Validation calls compute() every epoch with new predictions for the same references, so we
time three cases: the cold first call (construct, update, compute: JVM start-up included),
a first call whose METEOR JVM was started by update() while the validation loop ran, and
steady-state epochs. Usage: python benchmarks/metric_speed.py [--images 5000] [--epochs 3]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

from lit_mllm.metrics.caption import CaptionMetrics

TOLERANCE = 1e-9
METRICS = ("BLEU", "METEOR", "ROUGE_L", "CIDEr")


def _words(text: str) -> list[str]:
    return text.split()


ARTICLES = ["a", "an", "the", "two", "three", "some", "several", "A", "The"]
ADJECTIVES = _words(
    "red blue green yellow small large young old wooden white black brown tall little "
    "happy busy empty crowded shiny dirty striped colorful metal plastic open closed wet "
    "dry sunny snowy grassy sandy tiny huge fluffy modern vintage"
)
NOUNS = _words(
    "man woman person dog cat child boy girl bus train car bicycle horse table plate "
    "pizza sandwich bench tree building street field beach kite umbrella clock giraffe "
    "elephant zebra sheep cow bird skateboard surfboard laptop phone kitchen bathroom "
    "sink toilet bed couch window door sign truck motorcycle boat airplane banana apple "
    "cake bowl cup bear frisbee racket ball player tennis baseball wave vase flowers "
    "oven fridge teddy chair desk mirror"
)
VERBS = _words(
    "sitting standing walking riding holding eating playing looking flying lying running "
    "parked driving carrying watching throwing catching cutting jumping crossing waiting"
)
PREPOSITIONS = _words("on in near under behind beside across with along at inside over")
PUNCTUATION = ["", "", ".", " .", "!", ",", "..."]


def _phrase(rng: random.Random, rare: list[str]) -> str:
    words = [rng.choice(ARTICLES)]
    if rng.random() < 0.6:
        words.append(rng.choice(ADJECTIVES))
    # Zipf-like: mostly common nouns, a long tail of rare ones (realistic CIDEr IDF spread)
    words.append(rng.choice(rare) if rng.random() < 0.08 else rng.choice(NOUNS))
    return " ".join(words)


def _caption(rng: random.Random, rare: list[str]) -> str:
    words = [_phrase(rng, rare), rng.choice(["is", "are", ""]), rng.choice(VERBS)]
    words += [rng.choice(PREPOSITIONS), _phrase(rng, rare)]
    if rng.random() < 0.4:
        words += [rng.choice(PREPOSITIONS), _phrase(rng, rare)]
    text = " ".join(w for w in words if w) + rng.choice(PUNCTUATION)
    return text[0].upper() + text[1:] if rng.random() < 0.5 else text


def make_references(n_images: int, seed: int, n_refs: int = 5) -> dict[int, list[str]]:
    rng = random.Random(seed)
    rare = [
        "".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(4, 9))) for _ in range(3000)
    ]
    return {100_000 + i: [_caption(rng, rare) for _ in range(n_refs)] for i in range(n_images)}


def make_predictions(references: dict[int, list[str]], seed: int) -> dict[int, str]:
    """Per image: a reference with some words dropped/replaced, or an unrelated caption."""
    rng = random.Random(seed)
    vocabulary = NOUNS + ADJECTIVES + VERBS
    predictions = {}
    for image_id, refs in references.items():
        if rng.random() < 0.1:
            predictions[image_id] = _caption(rng, vocabulary)
            continue
        words = [w for w in rng.choice(refs).split() if rng.random() > 0.1]
        words = [w if rng.random() < 0.75 else rng.choice(vocabulary) for w in words]
        predictions[image_id] = " ".join(words)
    return predictions


class _StubSpice:
    """Stands in for pycocoevalcap's Spice (its CoreNLP jars cannot be fetched offline)."""

    def method(self) -> str:
        return "SPICE"

    def compute_score(self, gts: dict, res: dict) -> tuple[float, list[float]]:
        return 0.0, [0.0] * len(gts)


def _timed_class(cls: type, name: str, timings: dict[str, float], method: str) -> type:
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
    assert ours.keys() == reference.keys(), (label, ours.keys(), reference.keys())
    for key, value in reference.items():
        assert abs(ours[key] - value) <= TOLERANCE, f"{label} {key}: {ours[key]!r} != {value!r}"


def fmt(timings: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.2f}s" for k, v in timings.items())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--epochs", type=int, default=3, help="computes after the first (>= 1)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    references = make_references(args.images, args.seed)
    epochs = [make_predictions(references, args.seed + 1 + e) for e in range(args.epochs + 1)]
    print(
        f"{args.images} images x 5 references, {args.epochs + 1} prediction sets, seed {args.seed}"
    )
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} (timings are wall clock)")
    with tempfile.TemporaryDirectory() as tmp:
        baseline = [run_cocoevalcap(Path(tmp), references, p) for p in epochs]
    for e, (_, seconds, timings) in enumerate(baseline):
        print(f"COCOEvalCap  epoch {e}: {seconds:6.2f}s  ({fmt(timings)})")
    base_times = [seconds for _, seconds, _ in baseline]

    metric, scores, first = run_metric(None, references, epochs[0])
    check_equal(scores, baseline[0][0], "first call")
    print(
        f"CaptionMetrics first call (cold JVM): {first:6.2f}s  ({fmt(metric.scorer.last_timings)})"
    )
    steady = []
    for e in range(1, args.epochs + 1):
        _, scores, seconds = run_metric(metric, references, epochs[e])
        check_equal(scores, baseline[e][0], f"epoch {e}")
        steady.append(seconds)
        print(
            f"CaptionMetrics epoch {e} (steady state): {seconds:6.2f}s  ({fmt(metric.scorer.last_timings)})"
        )
    metric.close()
    warm_metric, scores, warm_first = run_metric(None, references, epochs[0], pre_start=True)
    check_equal(scores, baseline[0][0], "first call, JVM pre-started")
    print(
        f"CaptionMetrics first call, JVM started by update(): {warm_first:6.2f}s  "
        f"({fmt(warm_metric.scorer.last_timings)})"
    )
    warm_metric.close()

    print(
        f"all numbers match COCOEvalCap to {TOLERANCE:g}: {', '.join(f'{k}={v:.4f}' for k, v in baseline[0][0].items())}"
    )
    steady_ratio = sum(s / b for s, b in zip(steady, base_times[1:], strict=True)) / len(steady)
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")
    print(f"ratio first call (cold)         : {first / base_times[0]:.3f}")
    print(f"ratio first call (JVM pre-start): {warm_first / base_times[0]:.3f}")
    print(f"ratio steady state (mean of {len(steady)})  : {steady_ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
