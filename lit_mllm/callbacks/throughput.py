"""Speed, efficiency and gradient health of training, logged under ``perf/`` and ``train/``."""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn

from lit_mllm.flops import (
    Convention,
    FlopsSpec,
    peak_flops,
    sample_lengths,
    spec_from_model,
    step_flops,
    supervised_token_count,
)
from lit_mllm.models.views import ImageViews

log = logging.getLogger(__name__)
GIB = 2**30


@dataclass
class _Counts:
    """What one optimiser step processed (summed over its micro-batches)."""

    seconds: float = 0.0
    samples: int = 0
    tokens: int = 0
    padded_tokens: int = 0
    supervised_tokens: int = 0
    flops: float = 0.0
    data_wait: float = 0.0  # host seconds between a micro-batch's end and the next one's start

    def add(self, other: _Counts) -> None:
        names = ("seconds", "samples", "tokens", "padded_tokens", "supervised_tokens", "flops")
        for name in (*names, "data_wait"):
            setattr(self, name, getattr(self, name) + getattr(other, name))


class ThroughputMonitor(Callback):
    """Per optimiser step: step time, samples/s, tokens/s, padding waste, memory, MFU, grad norm.

    Rates are averaged over the last ``window`` optimiser steps (sums of work over sums of
    time, so a slow step weighs by its duration) and logged at the Trainer's
    ``log_every_n_steps``. The step time runs from the end of the previous step to the end of
    this one, data loading included; the clock restarts after validation and at each epoch.
    The monitor synchronises CUDA once per micro-batch so the times are real, not launch times.

    Tags: ``perf/step_time_s``, ``perf/samples_per_sec``, ``perf/tokens_per_sec`` (all
    non-padding tokens, image tokens included; on the progress bar),
    ``perf/supervised_tokens_per_sec``, ``perf/tokens_per_sec_per_device``,
    ``perf/padding_waste_pct``, ``perf/model_tflops_per_device``, ``perf/mfu`` (only when the
    device peak is known or ``peak_flops`` is given), ``perf/gpu_mem_alloc_gib`` and
    ``perf/gpu_mem_peak_gib`` (CUDA), ``perf/data_wait_pct`` (share of the step between one
    micro-batch's end and the next one's start: fetching the batch from the loader and moving
    it to the device; an upper bound on the time the loader makes training wait),
    ``train/grad_norm`` (total L2 norm before clipping).
    Rates across devices are rank 0's times the world size (ranks see equal-sized batches).

    Args:
        peak_flops: dense peak FLOP/s of one device; overrides the table in ``lit_mllm.flops``
            (needed for MFU on devices it does not list, CPUs included).
        window: optimiser steps averaged in each logged rate.
        convention: ``"6N"`` or ``"executed"`` decoder FLOPs, see ``lit_mllm.flops.step_flops``.
        log_grad_norm: log ``train/grad_norm``.
        prog_bar: show tokens/s on the progress bar.
    """

    def __init__(
        self,
        peak_flops: float | None = None,
        window: int = 10,
        convention: Convention = "6N",
        log_grad_norm: bool = True,
        prog_bar: bool = True,
    ) -> None:
        super().__init__()
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        if peak_flops is not None and peak_flops <= 0:
            raise ValueError(f"peak_flops must be positive FLOP/s, got {peak_flops}")
        self.peak_flops_override = peak_flops
        self.window = window
        self.convention = convention
        self.log_grad_norm = log_grad_norm
        self.prog_bar = prog_bar
        self.spec: FlopsSpec | None = None
        self.peak: float | None = None
        self._steps: deque[_Counts] = deque(maxlen=window)
        self._pending = _Counts()
        self._clock: float | None = None
        self._batch_end: float | None = None
        self._last_global_step = 0
        self._grids: dict[tuple[int, int], int] = {}

    # -- set-up ----------------------------------------------------------------------------------
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        model = getattr(pl_module, "model", None)
        try:
            self.spec = spec_from_model(model)
        except AttributeError as err:  # not a MultimodalLM: rates still work, FLOPs do not
            rank_zero_warn(f"ThroughputMonitor: no FLOPs model for {type(model).__name__} ({err})")
            self.spec = None
        device = pl_module.device
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
        self.peak = self.peak_flops_override or peak_flops(name, str(trainer.precision))
        if self.peak is None and self.spec is not None:
            log.info("peak FLOP/s of %s unknown: perf/mfu is not logged (set peak_flops)", device)
        self._last_global_step = trainer.global_step
        self._steps.clear()
        self._pending = _Counts()

    def _restart_clock(self, *_: Any) -> None:
        self._clock = None
        self._batch_end = None

    on_train_epoch_start = _restart_clock
    on_validation_end = _restart_clock

    # -- per micro-batch -------------------------------------------------------------------------
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._clock is None:
            _synchronize(pl_module.device)
            self._clock = time.perf_counter()
        elif self._batch_end is not None:
            self._pending.data_wait += time.perf_counter() - self._batch_end

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if isinstance(batch, dict):
            self._pending.add(self._count(pl_module, batch))
        if trainer.global_step == self._last_global_step:
            self._batch_end = time.perf_counter()
            return  # gradient accumulation: the optimiser has not stepped yet
        self._last_global_step = trainer.global_step
        _synchronize(pl_module.device)
        now = time.perf_counter()
        self._pending.seconds = now - (self._clock if self._clock is not None else now)
        self._clock = now
        self._batch_end = now
        if self._pending.seconds > 0:
            self._steps.append(self._pending)
        self._pending = _Counts()
        if self._steps:
            self._log(trainer, pl_module)

    def _count(self, pl_module: L.LightningModule, batch: dict[str, Any]) -> _Counts:
        input_ids = batch.get("input_ids")
        if input_ids is None or batch.get("batch_size", 1) == 0:
            return _Counts()
        lengths = sample_lengths(batch)
        layout = batch.get("layout")
        if layout is not None:  # counted by the collator: no host sync
            supervised = layout.num_supervised
        else:
            supervised = int(supervised_token_count(batch["labels"])) if "labels" in batch else 0
        counts = _Counts(
            samples=int(batch.get("batch_size", input_ids.shape[0])),
            tokens=int(batch.get("num_tokens", sum(lengths))),
            padded_tokens=int(batch.get("num_padded_tokens", input_ids.numel())),
            supervised_tokens=supervised,
        )
        if self.spec is not None:
            pixels = batch.get("pixel_values")
            if isinstance(pixels, ImageViews):  # sliced images: each view at its own grid
                view_patches = [
                    self._patches(pl_module, group)
                    for group in pixels.groups
                    for _ in range(group.shape[0])
                ]
            elif pixels is not None and pixels.shape[0]:
                view_patches = [self._patches(pl_module, pixels)] * int(pixels.shape[0])
            else:
                view_patches = []
            counts.flops = step_flops(
                self.spec,
                view_patches=view_patches,
                sample_lengths=lengths,
                supervised_tokens=supervised,
                convention=self.convention,
            )
        return counts

    def _patches(self, pl_module: L.LightningModule, pixels: torch.Tensor) -> int:
        size = (int(pixels.shape[-2]), int(pixels.shape[-1]))
        if size not in self._grids:
            gh, gw = pl_module.model.encoder.grid_for(*size)
            self._grids[size] = int(gh) * int(gw)
        return self._grids[size]

    # -- logging ---------------------------------------------------------------------------------
    def _log(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        total = _Counts()
        for step in self._steps:
            total.add(step)
        seconds = total.seconds
        world = trainer.world_size
        metrics = {
            "perf/step_time_s": seconds / len(self._steps),
            "perf/samples_per_sec": world * total.samples / seconds,
            "perf/tokens_per_sec": world * total.tokens / seconds,
            "perf/tokens_per_sec_per_device": total.tokens / seconds,
            "perf/supervised_tokens_per_sec": world * total.supervised_tokens / seconds,
            "perf/data_wait_pct": 100.0 * total.data_wait / seconds,
        }
        if total.padded_tokens:
            waste = total.padded_tokens - total.tokens
            metrics["perf/padding_waste_pct"] = 100.0 * waste / total.padded_tokens
        if self.spec is not None:
            achieved = total.flops / seconds
            metrics["perf/model_tflops_per_device"] = achieved / 1e12
            if self.peak:
                metrics["perf/mfu"] = achieved / self.peak
        device = pl_module.device
        if device.type == "cuda":
            metrics["perf/gpu_mem_alloc_gib"] = torch.cuda.memory_allocated(device) / GIB
            metrics["perf/gpu_mem_peak_gib"] = torch.cuda.max_memory_allocated(device) / GIB
        for name, value in metrics.items():
            pl_module.log(
                name,
                float(value),
                on_step=True,
                on_epoch=False,
                prog_bar=self.prog_bar and name == "perf/tokens_per_sec",
                batch_size=1,
            )

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        """Called after AMP unscaling and before clipping: the norm the optimiser really saw."""
        if not self.log_grad_norm:
            return
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        strategy = getattr(trainer, "strategy", None)
        sharded = _grad_shard_replicas(strategy) is not None
        if not grads and not sharded:  # a skipped step (no gradients anywhere)
            return
        norm = global_grad_norm(grads, strategy, device=None if grads else pl_module.device)
        if sharded and not grads and float(norm) == 0.0:
            return
        pl_module.log("train/grad_norm", norm.float(), on_step=True, on_epoch=False, batch_size=1)


def _grad_shard_replicas(strategy: Any) -> int | None:
    """How many ranks hold each gradient shard under FSDP (None: gradients are not sharded).

    FULL_SHARD / SHARD_GRAD_OP shard over all ranks (1 copy), HYBRID_SHARD shards within a
    node and replicates across nodes (one copy per node), NO_SHARD replicates like DDP.
    """
    from lightning.pytorch.strategies import FSDPStrategy

    if not isinstance(strategy, FSDPStrategy):
        return None
    name = getattr(strategy.sharding_strategy, "name", str(strategy.sharding_strategy))
    if name == "NO_SHARD":
        return None
    return int(getattr(strategy, "num_nodes", 1)) if "HYBRID" in name else 1


def global_grad_norm(
    grads: list[torch.Tensor], strategy: Any = None, device: torch.device | None = None
) -> torch.Tensor:
    """Total L2 norm of the model's gradients across ranks.

    DDP and single-device gradients are whole (and equal on every rank after the all-reduce):
    the local norm is the norm. Under FSDP each rank holds a shard: the squared local norms
    are summed over ranks (a collective: every rank must call this).
    """
    if grads:
        norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0).double()
    else:
        norm = torch.zeros((), dtype=torch.float64, device=device)
    replicas = _grad_shard_replicas(strategy)
    if replicas is None or not torch.distributed.is_initialized():
        return norm
    squared = norm.square()
    torch.distributed.all_reduce(squared)
    return (squared / replicas).sqrt()


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
