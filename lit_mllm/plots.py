"""Training curves from TensorBoard event files, as a PNG (for READMEs, notebooks, CI artefacts).

``lit-mllm-plot --logdir runs/tiny --out curves.png`` plots ``train/loss`` and ``val/CIDEr`` of
every run (event-file folder) found under ``logdir``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path


def event_dirs(logdir: str | Path) -> list[Path]:
    """Folders under ``logdir`` (itself included) that hold TensorBoard event files."""
    root = Path(logdir)
    if not root.exists():
        raise FileNotFoundError(f"log directory {root} does not exist; pass the --logdir of a run")
    return sorted({p.parent for p in root.rglob("events.out.tfevents.*")})


def read_scalars(logdir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """All scalar tags of one run folder: ``{tag: [(step, value), ...]}`` sorted by step.

    When ``logdir`` holds several runs (e.g. ``version_0``, ``version_1``), the newest run that
    has events is read; use ``event_dirs`` + this function to read each one.
    """
    from tensorboard.backend.event_processing.event_accumulator import (
        SCALARS,
        EventAccumulator,
    )

    dirs = event_dirs(logdir)
    if not dirs:
        raise FileNotFoundError(f"no TensorBoard event files under {logdir}")
    run = max(dirs, key=lambda d: max(f.stat().st_mtime for f in d.glob("events.out.tfevents.*")))
    acc = EventAccumulator(str(run), size_guidance={SCALARS: 0})  # 0: keep every point
    acc.Reload()
    return {
        tag: sorted((int(e.step), float(e.value)) for e in acc.Scalars(tag))
        for tag in acc.Tags()["scalars"]
    }


def plot_curves(
    logdir: str | Path,
    out_png: str | Path,
    tags: Sequence[str] = ("train/loss", "val/CIDEr"),
) -> Path:
    """One panel per tag against the optimiser step; missing tags get an empty, labelled panel."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    scalars = read_scalars(logdir)
    fig, axes = plt.subplots(1, len(tags), figsize=(5 * len(tags), 3.6), squeeze=False)
    for ax, tag in zip(axes[0], tags, strict=True):
        points = scalars.get(tag, [])
        if points:
            steps, values = zip(*points, strict=True)
            ax.plot(steps, values, marker="o" if len(points) < 30 else None, markersize=3)
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(tag)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logdir", required=True, help="a run folder or a parent of runs")
    parser.add_argument("--out", default="curves.png", help="PNG file to write")
    parser.add_argument(
        "--tags", nargs="+", default=["train/loss", "val/CIDEr"], help="scalar tags to plot"
    )
    parser.add_argument("--list", action="store_true", help="print the scalar tags and exit")
    args = parser.parse_args(argv)
    if args.list:
        for tag, points in sorted(read_scalars(args.logdir).items()):
            print(f"{tag}\t{len(points)} points, last {points[-1][1]:.4g} at step {points[-1][0]}")
        return
    print(plot_curves(args.logdir, args.out, args.tags))


if __name__ == "__main__":
    main()
