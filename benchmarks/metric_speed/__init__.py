"""Caption metric speed: `CaptionMetrics` vs plain pycocoevalcap `COCOEvalCap`, side by side.

Makes seeded synthetic COCO-style data (N images x 5 references, predictions that partly
overlap them), runs COCOEvalCap(coco, cocoRes).evaluate() (SPICE stubbed out: it needs
CoreNLP jars that cannot be downloaded offline) and CaptionMetrics without SPICE on the same
data, asserts every number matches to 1e-9, and prints total and per-scorer times.

Validation calls compute() every epoch with new predictions for the same references, so we
time three cases: the cold first call (construct, update, compute: JVM start-up included),
a first call whose METEOR JVM was started by update() while the validation loop ran, and
steady-state epochs. Usage: python -m benchmarks.metric_speed [--images 5000] [--epochs 3]

Modules: ``captions`` (the synthetic data), ``timing`` (both implementations timed on it, and
the equality check), ``__main__`` (the command line and the printed comparison).
"""
