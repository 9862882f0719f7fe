"""The command line: ``python -m benchmarks.metric_speed [--images N] [--epochs E] [--seed S]``."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from benchmarks import metric_speed
from benchmarks.metric_speed.captions import make_predictions, make_references
from benchmarks.metric_speed.timing import (
    TOLERANCE,
    check_equal,
    fmt,
    run_cocoevalcap,
    run_metric,
)

PROG = "python -m benchmarks.metric_speed"


def main(argv: list[str] | None = None) -> int:
    """Time COCOEvalCap and CaptionMetrics epoch by epoch, check their scores, print ratios."""
    summary = (metric_speed.__doc__ or "").splitlines()[0]
    parser = argparse.ArgumentParser(prog=PROG, description=summary)
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
