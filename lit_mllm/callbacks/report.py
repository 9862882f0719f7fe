"""The end-of-run summary: caption scores next to the data set's own ceiling, and wall time."""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

from lit_mllm.metrics import reference
from lit_mllm.metrics.reference import REPORT_KEYS

log = logging.getLogger(__name__)


def reference_scores(
    trainer: L.Trainer, split: str = "val", metrics: Sequence[str] = REPORT_KEYS
) -> dict[str, float] | None:
    """Leave-one-out scores of the split's COCO caption file, when it has one.

    Each reference scored against the other references of its image: the score a "human"
    caption gets, a natural ceiling for the model. Computed from the annotation file alone
    (``metrics/reference.py``, cached next to it); never fails the report.
    """
    sources = getattr(getattr(trainer, "datamodule", None), "sources", None) or {}
    source = sources.get(split)
    if not metrics or source is None or getattr(source, "kind", None) != "coco":
        return None
    try:
        return reference.reference_scores(source.file, metrics)
    except Exception as error:  # no Java, one reference per image, ...: a report without it
        log.warning("no reference scores for %s: %s", source.file, error)
        return None


def scene_facts(
    trainer: L.Trainer, split: str, predictions: dict[Any, str] | None
) -> dict[str, float] | None:
    """Fact accuracy of the split's captions when its COCO file carries the drawn scenes (the
    synthetic set does): the share of shapes whose kind, colour, size and place they state."""
    sources = getattr(getattr(trainer, "datamodule", None), "sources", None) or {}
    source = sources.get(split)
    if not predictions or source is None or getattr(source, "kind", None) != "coco":
        return None
    from lit_mllm.data.synthetic.facts import fact_accuracy

    scenes = {
        image["id"]: image["scene"]
        for image in json.loads(Path(source.file).read_text()).get("images", [])
        if "scene" in image
    }
    ids = [i for i in predictions if i in scenes]
    if not ids:
        return None
    return fact_accuracy([predictions[i] for i in ids], [scenes[i] for i in ids])


def build_report(
    stage: str,
    scores: dict[str, float],
    references: dict[str, float] | None,
    wall_seconds: float,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """JSON-ready report; ``scores`` keys are ``prefix/Metric``, references are bare names."""
    rows = []
    for key, value in scores.items():
        name = key.split("/", 1)[-1]
        ref = (references or {}).get(name)
        ratio = value / ref if ref else None
        rows.append({"metric": name, "model": value, "reference": ref, "ratio": ratio})
    return {
        "stage": stage,
        "wall_seconds": round(wall_seconds, 3),
        "metrics": rows,
        "reference_scores": references,
        **(extra or {}),
    }


def format_report(report: dict[str, Any]) -> str:
    """A fixed-width table for the terminal."""
    wall = int(round(report["wall_seconds"]))
    head = f"lit-mllm caption report ({report['stage']}"
    if report.get("global_step") is not None:
        head += f", {report['global_step']} steps"
    head += f", wall time {wall // 3600}:{wall % 3600 // 60:02d}:{wall % 60:02d})"
    lines = [head]
    if report["metrics"]:
        with_ref = report["reference_scores"] is not None
        header = f"  {'metric':<10} {'model':>8}"
        if with_ref:
            header += f" {'reference':>10} {'model/ref':>10}"
        lines += [header, "  " + "-" * (len(header) - 2)]
        for row in report["metrics"]:
            line = f"  {row['metric']:<10} {_num(row['model']):>8}"
            if with_ref:
                ratio = "n/a" if row["ratio"] is None else f"{100 * row['ratio']:.1f}%"
                line += f" {_num(row['reference']):>10} {ratio:>10}"
            lines.append(line)
        if with_ref:
            lines.append("  reference = leave-one-out score of the human-style references")
    else:
        lines.append("  no caption metrics were computed (no validation with references ran)")
    facts = report.get("facts")
    if facts:
        shares = ", ".join(
            f"{k} {100 * facts[k]:.1f}%" for k in ("colour", "size", "place", "kind")
        )
        lines.append(f"  facts right per drawn shape: {shares}")
        lines.append(f"  captions equal to the consensus caption: {100 * facts['consensus']:.1f}%")
    for key in ("loss", "best_checkpoint", "report_path"):
        if report.get(key) is not None:
            lines.append(f"  {key.replace('_', ' ')}: {report[key]}")
    return "\n".join(lines)


def _num(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.4f}"


class CaptionReport(Callback):
    """Prints and saves the last caption scores at the end of fit, validate and test.

    Reads ``pl_module.last_caption_scores`` (``{"val/CIDEr": ...}``); when the split comes from a
    COCO caption file (the synthetic set does) it adds the leave-one-out reference scores of
    ``reference_metrics`` and the model/reference ratio (an empty list: none), and where that file
    carries the drawn scenes (the synthetic set), the fact accuracy of the captions (``facts``:
    kind, colour, size and place per shape, ``data/synthetic/facts.py``). The JSON goes to
    ``trainer.log_dir``: ``caption_report.json`` after fit, ``caption_report_<stage>.json``
    after validate/test.
    """

    def __init__(
        self, print_report: bool = True, reference_metrics: Sequence[str] = REPORT_KEYS
    ) -> None:
        super().__init__()
        self.print_report = print_report
        self.reference_metrics = list(reference_metrics)
        self._start = time.perf_counter()
        self.last_report: dict[str, Any] | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._start = time.perf_counter()

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._report(trainer, pl_module, "fit", "val")

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "validate":
            self._report(trainer, pl_module, "validate", "val")

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._report(trainer, pl_module, "test", "test")

    def _report(
        self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str, split: str
    ) -> None:
        run_dir = Path(trainer.log_dir or trainer.default_root_dir)  # a collective: every rank
        if not trainer.is_global_zero:
            return
        scores = {
            k: v
            for k, v in (getattr(pl_module, "last_caption_scores", None) or {}).items()
            if k.startswith(f"{split}/")
        }
        loss = trainer.callback_metrics.get(f"{split}/loss")
        checkpoint = trainer.checkpoint_callback
        extra: dict[str, Any] = {
            "global_step": trainer.global_step,
            "epochs": trainer.current_epoch,
            "loss": None if loss is None else round(float(loss), 4),
            "best_checkpoint": getattr(checkpoint, "best_model_path", None) or None,
        }
        wall_seconds = time.perf_counter() - self._start  # the baseline is not the run's time
        references = reference_scores(trainer, split, self.reference_metrics)
        predictions = (getattr(pl_module, "last_predictions", None) or {}).get(split)
        extra["facts"] = scene_facts(trainer, split, predictions)
        report = build_report(stage, scores, references, wall_seconds, extra)
        name = "caption_report.json" if stage == "fit" else f"caption_report_{stage}.json"
        run_dir.mkdir(parents=True, exist_ok=True)
        report["report_path"] = str(run_dir / name)
        (run_dir / name).write_text(json.dumps(report, indent=2))
        self.last_report = report
        if self.print_report:
            print("\n" + format_report(report), flush=True)
