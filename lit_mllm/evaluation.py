"""The validation, test and predict hooks of :class:`~lit_mllm.module.MLLMModule`: captions.

A mixin, so the LightningModule's hooks read as two files of one job each: training
(``module.py``) and evaluation (here). It uses what ``MLLMModule.__init__`` builds: ``model``,
``tokenizer``, ``generation_cfg``, ``end_token_ids``, the metric settings and ``skipped``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lit_mllm import captioning
from lit_mllm.models.mllm import has_images
from lit_mllm.models.views import ImageViews


class CaptionEvaluation:
    """Loss and captions in validation and test (caption metrics each epoch), predictions."""

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        with torch.compiler.set_stance("force_eager"):  # compiled blocks serve training only
            self._evaluate(batch, batch_idx, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        with torch.compiler.set_stance("force_eager"):
            self._evaluate(batch, batch_idx, "test")

    def _evaluate(self, batch: dict[str, Any], batch_idx: int, prefix: str) -> None:
        """Loss, then captions of the first ``val_caption_limit`` samples into the metrics; the
        images are encoded once and serve both."""
        self.skipped.add(prefix, batch)
        if batch.get("batch_size", 1) == 0:
            return
        pixel_values = batch.get("pixel_values")
        features = None
        if has_images(pixel_values):
            features = self.model.image_features(pixel_values)
        loss, count = self(batch, image_features=features)
        if int(count) > 0:
            self.log(f"{prefix}/loss", loss, prog_bar=True, batch_size=int(count), sync_dist=True)
        size = len(batch["sample_id"])
        limit = self.val_caption_limit if prefix == "val" else None
        keep = size if limit is None else min(size, limit - batch_idx * size)
        if "prompt_ids" not in batch or keep <= 0:
            return
        captions = self.caption(batch, limit=keep, image_features=features)
        ids, refs = batch["image_id"][:keep], batch["references"][:keep]
        with_refs = [i for i, r in enumerate(refs) if r]
        if with_refs:
            self.caption_metric().update(
                [ids[i] for i in with_refs],
                [captions[i] for i in with_refs],
                [refs[i] for i in with_refs],
            )
        if batch_idx == 0:  # for the caption gallery: first images of the epoch
            images = gallery_images(batch, len(captions))
            self.last_val_examples = {
                "pixel_values": images,
                "predictions": captions,
                "references": [list(r) for r in refs],
                "image_ids": list(ids),
            }

    def caption(
        self, batch: dict[str, Any], limit: int | None = None, image_features: Tensor | None = None
    ) -> list[str]:
        """Greedy/beam captions for the batch's generation prompts (the first ``limit`` rows)."""
        self.model.graphed_decoding.compile_step = self.generation_cfg.compile_step
        return captioning.caption_batch(
            self.model,
            self.tokenizer,
            batch,
            self.hf_generation_config(),
            limit,
            image_features,
            # FSDP gathers weights in every forward: ranks must step together, as generate's
            # synced loop does; the graph loop stops per rank
            cuda_graph=self.generation_cfg.cache == "cuda_graph" and not self._fsdp(),
        )

    def hf_generation_config(self):
        """The complete transformers decoding setup from ``model.generation`` (read at each
        call, so changing ``generation_cfg`` takes effect)."""
        return captioning.generation_config(
            self.generation_cfg, self.end_token_ids, self.tokenizer.pad_token_id
        )

    def caption_metric(self):
        """The caption metrics, built once (every rank: ``compute`` is a collective)."""
        if self.caption_metrics is None:
            from lit_mllm.metrics.caption import CaptionMetrics

            names = self._checked_metrics or self.metric_names
            kwargs = {"metrics": list(names)} if names else {}
            self.caption_metrics = CaptionMetrics(**kwargs).to(self.device)
        return self.caption_metrics

    def on_validation_epoch_start(self) -> None:
        self.caption_metric()

    def on_test_epoch_start(self) -> None:
        self.caption_metric()

    def on_validation_epoch_end(self) -> None:
        self._log_caption_metrics("val")
        self._report_skipped("val")
        # training goes on: give its memory back (caches, graphs, cast weights of
        # `generation.cache: cuda_graph`); the next validation captures again
        self.model.graphed_decoding.clear()

    def on_test_epoch_end(self) -> None:
        self._log_caption_metrics("test")
        self._report_skipped("test")

    def _log_caption_metrics(self, prefix: str) -> None:
        metric = self.caption_metrics
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if metric is None or (not distributed and not metric.has_samples):
            return
        scores = metric.compute()
        self.last_predictions[prefix] = dict(metric.last_predictions)
        metric.reset()
        self.last_caption_scores = {f"{prefix}/{k}": float(v) for k, v in scores.items()}
        for name, value in self.last_caption_scores.items():
            self.log(name, value, sync_dist=False, rank_zero_only=False)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        self.skipped.add("predict", batch)
        if batch.get("batch_size", 1) == 0:
            return []
        rows = captioning.prediction_rows(batch, self.caption(batch))
        self._predictions.extend(rows)
        return rows

    def on_predict_epoch_end(self) -> None:
        rows = self._predictions
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            parts: list[list] = [[] for _ in range(torch.distributed.get_world_size())]
            torch.distributed.all_gather_object(parts, rows)
            rows = captioning.unique_predictions(parts)
        if self.predictions_path and self.trainer.is_global_zero:
            captioning.write_predictions(self.predictions_path, rows)
        self._predictions = []


def gallery_images(batch: dict[str, Any], count: int) -> Tensor | list[Tensor] | None:
    """The first ``count`` samples' images for the caption gallery, on the CPU: a tensor, or a
    list of thumbnails (sliced images) cut at the first sample without an image."""
    pixels = batch.get("pixel_values")
    if isinstance(pixels, ImageViews):
        views = pixels.in_text_order(pixels.groups)
        thumbnails = []
        for index in (batch.get("first_views") or [])[:count]:
            if index is None:
                break
            thumbnails.append(views[index].detach().float().cpu())
        return thumbnails
    return None if pixels is None else pixels[:count].detach().float().cpu()
