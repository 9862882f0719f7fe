"""Validation captions in TensorBoard: images with predicted vs reference text, and hparams."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def tensorboard_experiment(trainer: L.Trainer) -> Any | None:
    """The SummaryWriter of the first TensorBoard logger, or None (then callbacks do nothing)."""
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            return logger.experiment
    return None


def logger_step(trainer: L.Trainer) -> int:
    """The step Lightning's logger gives metrics logged now, so images line up with val/CIDEr.

    During validation inside fit Lightning logs at the last training step (global_step - 1).
    """
    loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
    return int(getattr(loop, "_batches_that_stepped", trainer.global_step))


def denormalize(pixel_values: torch.Tensor, data_config: dict[str, Any] | None) -> torch.Tensor:
    """Undo the encoder's mean/std normalisation: (N, 3, H, W) in [0, 1], float32."""
    cfg = data_config or {}
    mean = torch.tensor(cfg.get("mean", IMAGENET_MEAN), dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(cfg.get("std", IMAGENET_STD), dtype=torch.float32).view(1, -1, 1, 1)
    return (pixel_values.float().cpu() * std + mean).clamp(0.0, 1.0)


def caption_table(
    predictions: Sequence[str],
    references: Sequence[Sequence[str]],
    image_ids: Sequence[Any],
    max_references: int = 2,
) -> str:
    """A markdown table: image id | prediction | first references (pipes escaped)."""

    def cell(text: Any) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")

    rows = ["| image | prediction | references |", "|---|---|---|"]
    for image_id, prediction, refs in zip(image_ids, predictions, references, strict=False):
        shown = "<br>".join(cell(r) for r in list(refs)[:max_references])
        rows.append(f"| {cell(image_id)} | {cell(prediction)} | {shown} |")
    return "\n".join(rows)


def caption_figure(
    images: torch.Tensor,
    predictions: Sequence[str],
    references: Sequence[Sequence[str]],
    image_ids: Sequence[Any],
    columns: int = 4,
):
    """A matplotlib grid: each image with its prediction (P) and first reference (R) below.

    The captions are axis labels, so the constrained layout makes room for them (text drawn outside
    an axes would run into the next row's titles)."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib import pyplot as plt

    n = len(images)
    cols = max(1, min(columns, n))
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(3.2 * cols, 4.3 * rows), squeeze=False, layout="constrained"
    )
    for ax in axes.flat[n:]:
        ax.axis("off")
    for i in range(n):
        ax = axes.flat[i]
        ax.imshow(images[i].permute(1, 2, 0).numpy(), interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.spines[:].set_visible(False)
        ref = references[i][0] if i < len(references) and references[i] else ""
        pred = predictions[i] if i < len(predictions) else ""
        text = "\n".join(
            [
                *textwrap.wrap(f"P: {pred}", 46, max_lines=3, placeholder=" ..."),
                *textwrap.wrap(f"R: {ref}", 46, max_lines=3, placeholder=" ..."),
            ]
        )
        ax.set_title(f"id {image_ids[i]}" if i < len(image_ids) else "", fontsize=8)
        ax.set_xlabel(text, fontsize=7, loc="left", multialignment="left")
    return fig


class CaptionGallery(Callback):
    """After each validation epoch: an image grid with captions and a markdown caption table.

    Reads ``pl_module.last_val_examples`` (``pixel_values``, ``predictions``, ``references``,
    ``image_ids``) and writes the figure ``val/caption_gallery`` and the text ``val/captions``
    at the step of that validation's ``val/*`` scalars. It also fills the HPARAMS tab: the module's hyper-parameters
    with a column per caption metric, and ``hp_metric`` = the final ``val/CIDEr``. Only TensorBoard
    loggers are written to; with any other logger this callback does nothing.

    Args:
        num_images: at most this many examples in the grid and the table.
        columns: images per row of the grid.
        hp_metric: key of ``pl_module.last_caption_scores`` copied to ``hp_metric``.
    """

    def __init__(self, num_images: int = 8, columns: int = 4, hp_metric: str = "val/CIDEr") -> None:
        super().__init__()
        if num_images < 1 or columns < 1:
            raise ValueError(f"num_images and columns must be >= 1, got {num_images}, {columns}")
        self.num_images = num_images
        self.columns = columns
        self.hp_metric = hp_metric

    @rank_zero_only
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        writer = tensorboard_experiment(trainer)
        examples = getattr(pl_module, "last_val_examples", None)
        if writer is None or not examples or trainer.sanity_checking:
            return
        n = self.num_images
        predictions = list(examples.get("predictions") or [])[:n]
        references = [list(r) for r in (examples.get("references") or [])][:n]
        image_ids = list(examples.get("image_ids") or [])[:n]
        step = logger_step(trainer)
        if predictions:
            table = caption_table(predictions, references, image_ids)
            writer.add_text("val/captions", table, global_step=step)
        pixels = examples.get("pixel_values")
        if pixels is not None and len(pixels):
            config = getattr(pl_module, "image_data_config", None)
            images = (  # sliced images: thumbnails of different sizes
                [denormalize(p[None], config)[0] for p in pixels[:n]]
                if isinstance(pixels, list)
                else denormalize(pixels[:n], config)
            )
            fig = caption_figure(images, predictions, references, image_ids, self.columns)
            writer.add_figure("val/caption_gallery", fig, global_step=step, close=True)
        writer.flush()

    @rank_zero_only
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Declare the HPARAMS tab: hyper-parameters and metric columns.

        Written before Lightning's own hparams summary (TensorBoard keeps the first one), so
        the tab gets a column per caption metric; each column shows the last value of the
        scalar with that tag, so the scores are never written twice.
        """
        writer = tensorboard_experiment(trainer)
        if writer is None:
            return
        from torch.utils.tensorboard.summary import hparams

        columns = dict.fromkeys(["hp_metric", *_metric_tags(pl_module)], 0.0)
        summaries = hparams(_flat_params(getattr(pl_module, "hparams", {})), columns)
        file_writer = writer._get_file_writer()
        for summary in summaries[:2]:  # experiment, session start
            file_writer.add_summary(summary)

    @rank_zero_only
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """``hp_metric`` = the final caption score, at the last step (fills the HPARAMS tab)."""
        writer = tensorboard_experiment(trainer)
        scores = dict(getattr(pl_module, "last_caption_scores", None) or {})
        if writer is None or self.hp_metric not in scores:
            return
        writer.add_scalar("hp_metric", scores[self.hp_metric], global_step=logger_step(trainer))
        writer.flush()


def _metric_tags(pl_module: L.LightningModule) -> list[str]:
    """``val/loss`` and the ``val/<key>`` of every configured caption metric."""
    tags = ["val/loss"]
    try:
        from lit_mllm.metrics.scorers import DEFAULT_METRICS, SCORER_KEYS, resolve_metrics

        names = getattr(pl_module, "metric_names", None) or DEFAULT_METRICS
        tags += [f"val/{key}" for scorer in resolve_metrics(names) for key in SCORER_KEYS[scorer]]
    except (ImportError, ValueError):  # no caption metrics: loss only
        pass
    return tags


def _flat_params(params: Any, prefix: str = "") -> dict[str, Any]:
    """Nested hparams -> ``a/b`` keys with scalar values (TensorBoard's hparams tab needs them)."""
    out: dict[str, Any] = {}
    for key, value in dict(params).items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flat_params(value, f"{name}/"))
        elif value is None or isinstance(value, bool | int | float | str):
            out[name] = value if value is not None else "None"
        else:
            out[name] = str(value)
    return out
