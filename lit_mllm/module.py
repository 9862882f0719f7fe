"""MLLMModule: the Lightning hooks around the multimodal model.

The training side is here; validation, test and predict hooks are in ``evaluation.py``. What
each hook delegates to: the model and its assembly (``models/``), settings and presets
(``config.py``), AdamW groups and schedule (``optim.py``), token-weighted steps that every rank
takes or skips together (``gradients.py``), captions and prediction files (``captioning.py``),
caption metrics (``metrics/``), dropped-sample reports (``skips.py``), checkpoint contents and
``init_from`` (``checkpoints/``).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from torch import Tensor

from lit_mllm import captioning
from lit_mllm.checkpoints.frozen import (
    kept_weights,
    parts_to_keep,
    require_trainable,
    trainable_names,
)
from lit_mllm.checkpoints.init_from import load_init_weights
from lit_mllm.checkpoints.native import load_native_weights, read_native
from lit_mllm.config import (
    ConnectorConfig,
    DecoderConfig,
    DecodingConfig,
    EncoderConfig,
    OptimConfig,
    resolve_model_settings,
    section,
)
from lit_mllm.data.slicing import ImageSlicing
from lit_mllm.data.tokenizer import load_tokenizer
from lit_mllm.errors import UsageError
from lit_mllm.evaluation import CaptionEvaluation
from lit_mllm.gradients import LOSS_SUM_SCALE, TokenMeanWindow, clip_gradients, zero_loss
from lit_mllm.models.build import build_model
from lit_mllm.optim import build_optimizer, no_decay_parameters, parameter_groups
from lit_mllm.skips import SkippedSamples

log = logging.getLogger(__name__)


class MLLMModule(CaptionEvaluation, L.LightningModule):
    """Frozen timm encoder + trainable connector + causal LM decoder.

    The model is a named preset (``preset="tiny"``) and/or explicit ``tokenizer`` / ``encoder``
    / ``connector`` / ``decoder`` sections (a section given replaces the preset's). Checkpoints
    hold the trainable weights and those settings; frozen weights only when they cannot be
    rebuilt from their source (``save_frozen: auto`` keeps a random-init encoder, never a
    pretrained 7B decoder).
    """

    def __init__(
        self,
        preset: str | None = None,
        tokenizer: str | None = None,
        encoder: EncoderConfig | None = None,
        connector: ConnectorConfig | None = None,
        decoder: DecoderConfig | None = None,
        optim: OptimConfig | None = None,
        generation: DecodingConfig | None = None,
        metrics: list[str] | None = None,
        val_caption_limit: int | None = None,
        save_frozen: Literal["auto", "always", "never"] = "auto",
        predictions_path: str | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
        max_consecutive_skips: int = 10,
        init_from: str | None = None,
        init_from_strict: bool = True,
        compile_blocks: Literal["auto", "on", "off"] = "auto",
        image_slicing: ImageSlicing | None = None,
        residual_dtype: Literal["float32", "autocast"] = "float32",
    ) -> None:
        """``image_slicing``: the model reads images as a thumbnail + slices (the CLI links it
        from ``data.image_slicing``, so it is set there); it is stored with the weights.

        ``residual_dtype: autocast`` keeps the decoder's residual stream in bf16 under
        ``bf16-mixed`` (less memory traffic; float32 is the default, as transformers does)."""
        super().__init__()
        self.settings = resolve_model_settings(preset, tokenizer, encoder, connector, decoder)
        self.image_slicing: ImageSlicing | None = section(ImageSlicing, image_slicing)
        self.optim_cfg: OptimConfig = section(OptimConfig, optim) or OptimConfig()
        self.generation_cfg: DecodingConfig = (
            section(DecodingConfig, generation) or DecodingConfig()
        )
        # only what defines the model: LightningCLI puts a checkpoint's hyper-parameters over
        # the command line (`--ckpt_path`), so run settings (optimiser, generation, metrics,
        # output paths) stay out and can be changed when validating or resuming
        self.save_hyperparameters(
            {
                "preset": preset,
                **self.settings.as_dict(),
                "save_frozen": save_frozen,
                "chat_template_kwargs": chat_template_kwargs,
                "image_slicing": None if self.image_slicing is None else asdict(self.image_slicing),
            }
        )
        if metrics is not None:  # a typo must not wait for the first validation
            from lit_mllm.metrics.scorers import resolve_metrics

            try:
                resolve_metrics(metrics)
            except ValueError as error:
                raise ValueError(f"model.metrics: {error}") from None
        self.metric_names = metrics
        self.tokenizer = load_tokenizer(self.settings.tokenizer)
        self.model = build_model(self.settings, self.tokenizer, self.image_slicing)
        self.end_token_ids = captioning.end_token_ids(
            self.tokenizer,
            self.model.language_model().generation_config.eos_token_id,
            chat_template_kwargs,
        )
        self.chat_template_kwargs = chat_template_kwargs
        self.val_caption_limit = val_caption_limit
        self.save_frozen = save_frozen
        self.predictions_path = predictions_path
        self.compile_blocks_mode = compile_blocks
        if residual_dtype not in ("float32", "autocast"):
            raise UsageError(
                f"model.residual_dtype: {residual_dtype!r} is neither 'float32' nor 'autocast'"
            )
        self.model.autocast_residual = residual_dtype == "autocast"
        self.max_consecutive_skips = max_consecutive_skips
        self.init_from_strict = init_from_strict
        self.caption_metrics = None  # built in setup/first use: Java is only needed to validate
        self._checked_metrics: tuple[str, ...] | None = None
        self.skipped = SkippedSamples()
        self.window = TokenMeanWindow()
        self.skipped_steps = 0
        self.consecutive_skips = 0
        self.empty_batches = 0
        self.step_dropped = False  # this optimiser step's gradients were dropped (all ranks)
        self.last_val_examples: dict[str, Any] | None = None
        self.last_caption_scores: dict[str, float] = {}
        self.last_predictions: dict[str, dict[Any, str]] = {}  # stage -> image id -> caption
        self._predictions: list[dict[str, Any]] = []
        self.strict_loading = False  # frozen pretrained weights are not in checkpoints
        if init_from:
            self.load_trainable_weights(init_from)

    # -- what other parts read -------------------------------------------------------------------
    @property
    def encoder_cfg(self) -> EncoderConfig:
        return self.settings.encoder

    @property
    def connector_cfg(self) -> ConnectorConfig:
        return self.settings.connector

    @property
    def decoder_cfg(self) -> DecoderConfig:
        return self.settings.decoder

    @property
    def tokenizer_name(self) -> str:
        return self.settings.tokenizer

    @property
    def num_image_tokens(self) -> int:
        return self.model.num_image_tokens

    @property
    def image_data_config(self) -> dict[str, Any]:
        return self.model.image_data_config

    @property
    def tokens_per_view(self) -> int | None:
        """Tokens of one view of a sliced image: the resampler's queries; None for the MLP,
        one token per ``image_slicing.patch_size`` cell."""
        return self.connector_cfg.num_queries if self.connector_cfg.kind == "resampler" else None

    def data_settings(self) -> dict[str, Any]:
        """What the DataModule must agree on with this model (LightningCLI links the same
        values): ``MLLMDataModule(**module.data_settings(), ...)``."""
        return {
            "tokenizer": self.tokenizer_name,
            "num_image_tokens": self.num_image_tokens,
            "image_data_config": self.image_data_config,
            "chat_template_kwargs": self.chat_template_kwargs,
            "image_slicing": copy.deepcopy(self.image_slicing),
            "tokens_per_view": self.tokens_per_view,
        }

    def check_data_agrees(self, data: Any) -> None:
        """A DataModule built apart from this model (Python, or a checkpoint validated with
        other data settings) must write images the way the model reads them."""
        if data is None or not hasattr(data, "image_slicing"):
            return
        if data.image_slicing != self.image_slicing:
            raise ValueError(
                f"data.image_slicing {data.image_slicing} differs from the model's "
                f"{self.image_slicing} (what it was built or trained with): pass the same"
            )
        if self.image_slicing is not None and data.tokens_per_view != self.tokens_per_view:
            raise ValueError(
                f"data.tokens_per_view {data.tokens_per_view} differs from the model's "
                f"{self.tokens_per_view}: build the DataModule with **module.data_settings()"
            )

    # -- checkpoints ------------------------------------------------------------------------------
    def load_trainable_weights(self, path: str) -> None:
        """``init_from``: start from another run's weights (e.g. stage 2 from stage 1)."""
        load_init_weights(self, path, strict=self.init_from_strict)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["lit_mllm_counters"] = {  # plain ints: loads with weights_only=True
            "skipped": self.skipped.state_dict(),
            "skipped_steps": self.skipped_steps,
            "consecutive_skips": self.consecutive_skips,
            "empty_batches": self.empty_batches,
        }
        keep = parts_to_keep(self.save_frozen, self.hparams)
        checkpoint["state_dict"] = kept_weights(
            checkpoint["state_dict"], trainable_names(self), keep
        )

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        counters = checkpoint.get("lit_mllm_counters", {})
        self.skipped.load_state_dict(counters.get("skipped", {}))
        self.skipped_steps = counters.get("skipped_steps", 0)
        self.consecutive_skips = counters.get("consecutive_skips", 0)
        self.empty_batches = counters.get("empty_batches", 0)
        if "state_dict" in checkpoint:  # FSDP sharded checkpoints load the weights themselves
            require_trainable(checkpoint["state_dict"], self.state_dict(), trainable_names(self))

    @classmethod
    def from_pretrained(
        cls, directory: str, map_location: str = "cpu", *, trust_remote_code: bool = False
    ) -> MLLMModule:
        """Load a folder written by ``lit-mllm-export --format native``."""
        folder = read_native(directory, map_location, trust_remote_code=trust_remote_code)
        module = cls(**folder.hyper_parameters)
        load_native_weights(module, folder)
        return module.to(map_location).eval()

    # -- set-up ----------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        """Check what would otherwise fail at the first validation, thousands of steps in
        (recipes skip the sanity check): the caption metrics' Java and SPICE jars.

        FSDP flattens each unit's parameters into one buffer of one dtype, so a bf16 encoder
        beside fp32 connector weights cannot be wrapped: keep it in float32 there (the compute
        still runs in bf16 under the ``bf16-mixed`` precision)."""
        self.check_data_agrees(getattr(self.trainer, "datamodule", None))
        if self.model.autocast_residual and str(self.trainer.precision).startswith("16"):
            raise UsageError(
                "model.residual_dtype: autocast keeps the residual stream in float16 under "
                f"precision {self.trainer.precision}, where it overflows: use bf16-mixed"
            )
        validates = stage in ("validate", "test") or (
            stage == "fit" and bool(self.trainer.limit_val_batches)
        )
        if validates:  # imported here: training without validation needs no pycocoevalcap
            from lit_mllm.metrics.caption import check_caption_metrics

            self._checked_metrics = check_caption_metrics(self.metric_names)
        encoder = self.model.encoder
        if self._fsdp() and encoder.dtype != torch.float32:
            log.warning(
                "FSDP needs one dtype per wrapped unit: casting the frozen encoder from %s to "
                "float32 (set `model.encoder.dtype: float32` to silence this)",
                encoder.dtype,
            )
            encoder.model.float()

    def _fsdp(self) -> bool:
        """Whether the Trainer shards the weights with FSDP (False outside a Trainer)."""
        from lightning.pytorch.strategies import FSDPStrategy

        try:
            strategy = self.trainer.strategy
        except RuntimeError:  # not attached to a Trainer (notebooks, scripts)
            return False
        return isinstance(strategy, FSDPStrategy)

    def _grad_scaler(self) -> bool:
        """Whether the precision plugin scales gradients (and so skips non-finite steps)."""
        return getattr(self.trainer.precision_plugin, "scaler", None) is not None

    def on_train_start(self) -> None:
        """``compile_blocks: auto`` compiles on CUDA, except under FSDP (its flat parameters and
        per-layer wrapping do not mix with compiling the layers in place); never on CPU, where
        compile time would outweigh the gain of a short run."""
        wanted = self.compile_blocks_mode == "on" or (
            self.compile_blocks_mode == "auto" and self.device.type == "cuda" and not self._fsdp()
        )
        if wanted:
            self.model.compile_blocks()

    # -- optimisation ----------------------------------------------------------------------------
    def configure_optimizers(self) -> dict[str, Any]:
        exempt = no_decay_parameters(self, self.model.language_model().get_output_embeddings())
        groups = parameter_groups(
            self.named_parameters(), exempt, self.optim_cfg, "model.connector."
        )
        fused = self.optim_cfg.fused
        if fused is None:  # a grad scaler must unscale before clipping: not fused then
            fused = torch.cuda.is_available() and not self._grad_scaler()
        return build_optimizer(
            groups, self.optim_cfg, self.trainer.estimated_stepping_batches, fused
        )

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        if gradient_clip_val and not self.step_dropped:  # the same decision on every rank
            clip_gradients(
                optimizer,
                gradient_clip_val,
                gradient_clip_algorithm,
                fsdp_root=self.trainer.strategy.model if self._fsdp() else None,
                scaled=self._grad_scaler(),
                lightning_clip=self.clip_gradients,
            )

    # -- training ---------------------------------------------------------------------------------
    def forward(
        self,
        batch: dict[str, Any],
        image_features: Tensor | None = None,
        reduction: Literal["mean", "sum"] = "mean",
    ) -> tuple[Tensor, Tensor]:
        return self.model(
            batch["input_ids"],
            batch["labels"],
            pixel_values=batch.get("pixel_values"),
            attention_mask=batch.get("attention_mask"),
            position_ids=batch.get("position_ids"),
            sample_ids=batch.get("sample_id"),
            image_features=image_features,
            reduction=reduction,
            layout=batch.get("layout"),
        )

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        """The micro-batch's *summed* token loss times ``LOSS_SUM_SCALE``; ``finish_gradients``
        turns the step's gradients into those of the mean over all its supervised tokens.

        Never ``None``: under DDP/FSDP every rank must run forward and backward in every step
        (collectives). An empty micro-batch runs a placeholder sample; a non-finite loss returns
        a zero loss and flags the step, which every rank then skips together.
        """
        self.skipped.add("train", batch)
        if batch.get("batch_size", 1) == 0:  # every sample of the micro-batch was dropped
            batch = self.model.placeholder_batch(self.device)
        loss_sum, count = self(batch, reduction="sum")
        layout = batch.get("layout")
        if (layout.num_supervised if layout is not None else int(count)) == 0:
            self.empty_batches += 1
            self.log("train/empty_batches", float(self.empty_batches), batch_size=1)
        if layout is not None:  # no host sync: the loss is checked on the device, the step
            # then dropped by `finish_gradients` (its gradients may be NaN; they are discarded)
            self.window.add(loss_sum, count)
            return loss_sum * LOSS_SUM_SCALE
        if not torch.isfinite(loss_sum):
            self.window.flag_nonfinite_loss()
            log.warning(
                "non-finite training loss in micro-batch %d: %s", batch_idx, loss_sum.item()
            )
            trainable = [p for p in self.parameters() if p.requires_grad]
            return zero_loss(loss_sum, trainable, through_graph=self._fsdp())
        self.window.add(loss_sum, count)
        return loss_sum * LOSS_SUM_SCALE

    def optimizer_step(
        self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None
    ) -> None:
        """Lightning calls this once per optimiser step, and the closure runs the window's last
        micro-batch (forward, backward, DDP/FSDP gradient reduction). The gradients are
        finished right after it, before any ``on_before_optimizer_step`` hook (callbacks run
        theirs first: the logged grad norm must be the final one), clipping and the step."""
        if optimizer_closure is None:
            optimizer.step()
            return

        def closure() -> Any:
            result = optimizer_closure()
            self.finish_gradients(optimizer)
            return result

        optimizer.step(closure=closure)

    def finish_gradients(self, optimizer: torch.optim.Optimizer) -> None:
        """Every rank rescales to the global token mean, or every rank drops the step."""
        params = [p for group in optimizer.param_groups for p in group["params"]]
        outcome = self.window.finish(
            params,
            accumulate=self.trainer.accumulate_grad_batches,
            world=self.trainer.world_size,
            check_gradients=not self._grad_scaler(),
            device=self.device,
        )
        self.step_dropped = outcome.dropped
        if outcome.skipped_because == "no supervised token":
            log.warning("optimiser step %d saw no supervised token: skipped", self.global_step)
        elif outcome.dropped:
            self._skip_step(outcome.skipped_because)
        else:
            self.consecutive_skips = 0
            self.log("train/loss", outcome.loss, prog_bar=True, batch_size=1)
            self.log("train/supervised_tokens", outcome.tokens, batch_size=1)
            self.log("train/lr", optimizer.param_groups[0]["lr"], batch_size=1)

    def _skip_step(self, why: str) -> None:
        self.skipped_steps += 1
        self.consecutive_skips += 1
        self.log("train/skipped_steps", float(self.skipped_steps), batch_size=1)
        log.warning("skipping optimiser step %d: %s", self.global_step, why)
        if self.consecutive_skips >= self.max_consecutive_skips:
            raise RuntimeError(
                f"{self.consecutive_skips} consecutive optimiser steps skipped ({why}); "
                "lower the learning rate, check the data, or use bf16 instead of fp16"
            )

    def on_train_epoch_end(self) -> None:
        self._report_skipped("train")

    def _report_skipped(self, stage: str) -> None:
        """Counted per batch, summed over ranks, logged and written next to the logs."""
        data = getattr(self.trainer, "datamodule", None)
        # only this stage's source: {stage: {reason: count}}
        at_load = dict((getattr(data, "skipped_at_load", None) or {}).get(stage) or {})
        run_dir = Path(self.trainer.log_dir or self.trainer.default_root_dir)  # a collective
        gathered = self.skipped.report(
            stage, self.current_epoch, at_load, run_dir, self.trainer.is_global_zero
        )
        for reason, count in gathered.items():
            self.log(f"data/skipped_{reason}", float(count), rank_zero_only=True)

    def train(self, mode: bool = True) -> MLLMModule:
        super().train(mode)
        self.model.encoder.train(False)  # frozen: never dropout / batch-norm updates
        return self
