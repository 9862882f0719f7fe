"""Crash-safe checkpoints: atomic saves, periodic + epoch-end + last, RNG state, checked loads.

Why not Lightning's own save alone: ``TorchCheckpointIO`` writes through an fsspec transaction,
whose local temp file comes from ``tempfile.mkstemp()`` in the *system temp dir*, then
``shutil.move``-s it into place. That is an atomic rename only when ``$TMPDIR`` is on the same
file system as the checkpoint; otherwise ``shutil.move`` falls back to copying, and a kill during
the copy leaves a truncated file under the final name (tests/test_checkpoints_atomic.py
reproduces this). Nothing is fsync-ed, and a killed save leaves a checkpoint-sized orphan in
``/tmp``.

:class:`AtomicModelCheckpoint` therefore has every checkpoint written to ``.<name>.partial`` in
the checkpoint's own folder (by :class:`CheckedCheckpointIO`, with no temp file elsewhere),
fsync-ed, and ``os.replace``-d over the final name (then the folder is fsync-ed): a reader sees
the old file or the new one, never half of one. Sharded folders also get a checksum manifest
(:mod:`lit_mllm.checkpoints.integrity`); files carry torch's own per-record CRC32s. Loading
goes through :mod:`lit_mllm.checkpoints.safe_load`; RNG states: :mod:`lit_mllm.checkpoints.rng`.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from lit_mllm.checkpoints.integrity import crc32_of, files_to_check, write_manifest
from lit_mllm.checkpoints.rng import collect_rng_state, restore_rng_state
from lit_mllm.checkpoints.safe_load import is_remote, load_checkpoint_file
from lit_mllm.errors import UsageError

__all__ = [
    "AtomicModelCheckpoint",
    "CheckedCheckpointIO",
    "clean_stale_saves",
    "commit_partial",
    "partial_path",
]

PARTIAL_SUFFIX = ".partial"
OLD_SUFFIX = ".old"


# -- the CheckpointIO ------------------------------------------------------------------------------
class CheckedCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` that loads through
    :func:`lit_mllm.checkpoints.safe_load.load_checkpoint_file` (local files only, checksums
    first, ``weights_only=True``) and saves with ``torch.save`` straight into the checkpoint's
    folder: ``.<name>.partial``, then ``os.replace``. (Lightning's save stages a temp file in the
    system temp dir, left behind by a kill.)"""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if is_remote(path) or storage_options is not None:
            super().save_checkpoint(checkpoint, path, storage_options=storage_options)
            return
        if not torch.serialization.get_crc32_options():
            raise RuntimeError(
                "torch.serialization.set_crc32_options(False) is in effect: the checkpoint would "
                "carry no checksums and could not be verified when loaded; turn it back on"
            )
        target = os.fspath(path)
        os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
        if is_partial(target):  # AtomicModelCheckpoint moves it into place
            torch.save(checkpoint, target)
            return
        tmp = partial_path(target)
        torch.save(checkpoint, tmp)
        commit_partial(tmp, target)

    def load_checkpoint(
        self, path: Any, map_location: Any = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        if weights_only is False:
            raise UsageError(
                "lit-mllm loads checkpoints with weights_only=True only (a checkpoint that needs "
                "more can run code when loaded); leave weights_only unset"
            )
        location = map_location if map_location is not None else (lambda storage, loc: storage)
        return load_checkpoint_file(path, map_location=location)


# -- atomic writes --------------------------------------------------------------------------------
def partial_path(filepath: str | Path) -> str:
    """Where a checkpoint is written before it is moved into place (same folder, hidden)."""
    head, tail = os.path.split(str(filepath))
    return os.path.join(head, f".{tail}{PARTIAL_SUFFIX}")


def is_partial(path: str | Path) -> bool:
    name = os.path.basename(str(path))
    return name.startswith(".") and name.endswith(PARTIAL_SUFFIX)


def clean_stale_saves(folder: str | Path) -> list[str]:
    """Remove what saves killed mid-write left in ``folder`` (never complete, never read); a
    sharded checkpoint killed between its two renames gets its previous version back."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    cleaned = []
    for old in folder.glob(f"*{OLD_SUFFIX}"):
        target = old.with_name(old.name[: -len(OLD_SUFFIX)])
        if old.is_dir() and target.suffix == ".ckpt":
            if target.exists():
                shutil.rmtree(old)
            else:
                os.replace(old, target)
            cleaned.append(old.name)
    for stale in folder.glob(f".*{PARTIAL_SUFFIX}"):
        shutil.rmtree(stale) if stale.is_dir() and not stale.is_symlink() else stale.unlink()
        cleaned.append(stale.name)
    return cleaned


def _fsync(path: str) -> None:
    if os.path.isdir(path):
        for root, _, files in os.walk(path):
            for name in files:
                _fsync(os.path.join(root, name))
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit_partial(tmp: str, filepath: str) -> None:
    """fsync ``tmp`` and move it over ``filepath``; a crash leaves either the old or the new."""
    _fsync(tmp)
    if os.path.isdir(tmp) and os.path.isdir(filepath):  # sharded checkpoints are folders
        old = filepath + OLD_SUFFIX
        shutil.rmtree(old, ignore_errors=True)
        os.replace(filepath, old)
        os.replace(tmp, filepath)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, filepath)
    _fsync(os.path.dirname(os.path.abspath(filepath)))


def _write_manifest(trainer: L.Trainer, folder: str) -> None:
    """CRC32 of every file of a sharded checkpoint; each rank reads 1/world of the files."""
    names = trainer.strategy.broadcast(files_to_check(folder) if trainer.is_global_zero else None)
    rank, world = trainer.global_rank, trainer.world_size
    mine = {name: crc32_of(os.path.join(folder, name)) for name in names[rank::world]}
    parts: list[Any] = [mine]
    if world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        parts = [None] * world
        torch.distributed.all_gather_object(parts, mine)
    if trainer.is_global_zero:
        write_manifest(folder, {k: v for part in parts for k, v in part.items()})


class AtomicModelCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` with atomic saves, ``last.ckpt`` also at every epoch end, RNG state.

    All ``ModelCheckpoint`` arguments apply; defaults differ in ``save_last=True`` (what a crashed
    run resumes from: ``--ckpt_path last``). With ``every_n_train_steps=N`` the periodic save runs
    every N optimiser steps, and ``last.ckpt`` is refreshed at every epoch end as well.

    ``save_rng_state``: store Python/NumPy/torch/CUDA generator states in the checkpoint and
    restore them just before the first training batch after a resume, so that random ops
    (dropout) continue the same stream. Lightning itself does not save RNG states.
    It also installs :class:`CheckedCheckpointIO` on a strategy that uses the default
    ``TorchCheckpointIO``: saves write no temp file outside the checkpoint folder, and a damaged
    or foreign checkpoint passed to ``fit`` fails with a clear error.
    """

    def __init__(
        self,
        *args: Any,
        save_last: bool | Literal["link"] | None = True,
        save_rng_state: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, save_last=save_last, **kwargs)
        self.save_rng_state = save_rng_state
        self._rng_to_restore: dict[str, Any] | None = None
        self._last_saved_at_step = -1

    # -- hooks -------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = CheckedCheckpointIO()
        if trainer.is_global_zero and self.dirpath and not is_remote(self.dirpath):
            clean_stale_saves(self.dirpath)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """The run being resumed (``--ckpt_path``) usually lives in another folder (the previous
        logger version's): its killed saves are cleaned here, once the checkpoint is loaded."""
        super().on_train_start(trainer, pl_module)
        resumed = trainer.ckpt_path
        if (
            trainer.is_global_zero
            and resumed
            and not is_remote(resumed)
            and os.path.exists(resumed)
        ):
            clean_stale_saves(Path(resumed).parent)

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        if self._rng_to_restore is not None:
            restore_rng_state(self._rng_to_restore)
            self._rng_to_restore = None

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        # step-triggered checkpoints skip the epoch end; a crash early in the next epoch would
        # then lose the end of this one
        if (
            self.save_last
            and self._every_n_train_steps >= 1
            and self._last_saved_at_step != trainer.global_step
            and not trainer.fast_dev_run
            and not trainer.sanity_checking
            and trainer.state.fn == "fit"
        ):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self.save_rng_state:
            state["rng_state"] = collect_rng_state()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        rng = state_dict.pop("rng_state", None)
        super().load_state_dict(state_dict)
        if self.save_rng_state and rng is not None:
            self._rng_to_restore = rng

    # -- saving ------------------------------------------------------------------------------
    def _save_last_checkpoint(self, trainer: L.Trainer, monitor_candidates: dict) -> None:
        super()._save_last_checkpoint(trainer, monitor_candidates)
        if self.save_last:
            self._last_saved_at_step = trainer.global_step

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        if is_remote(filepath):  # object stores: a put is already atomic
            super()._save_checkpoint(trainer, filepath)
            return
        tmp = partial_path(filepath)
        trainer.save_checkpoint(tmp, self.save_weights_only)  # every rank; rank 0 writes
        if trainer.strategy.broadcast(os.path.isdir(tmp)):  # sharded: no checksums of its own
            _write_manifest(trainer, tmp)
        if trainer.is_global_zero:
            commit_partial(tmp, filepath)
        trainer.strategy.barrier("AtomicModelCheckpoint")
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(self)

    @staticmethod
    def _link_checkpoint(trainer: L.Trainer, filepath: str, linkpath: str) -> None:
        """``save_last="link"``: swap the link atomically (ModelCheckpoint deletes, then links)."""
        if trainer.is_global_zero and os.path.abspath(filepath) != os.path.abspath(linkpath):
            tmp = partial_path(linkpath)
            if os.path.lexists(tmp):
                os.remove(tmp)
            try:
                os.symlink(os.path.relpath(filepath, os.path.dirname(linkpath)), tmp)
            except OSError:  # no symlinks (Windows without privileges): copy
                shutil.copyfile(filepath, tmp)
            if os.path.isdir(linkpath) and not os.path.islink(linkpath):
                shutil.rmtree(linkpath)
            os.replace(tmp, linkpath)
        trainer.strategy.barrier()
