"""Crash-safe checkpoints: atomic saves, periodic + epoch-end + last, RNG state, clear load errors.

Why not Lightning's own save alone: ``TorchCheckpointIO`` writes through an fsspec transaction,
whose local temp file comes from ``tempfile.mkstemp()`` in the *system temp dir*, then
``shutil.move``-s it into place. That is an atomic rename only when ``$TMPDIR`` is on the same
file system as the checkpoint; otherwise ``shutil.move`` falls back to copying, and a kill during
the copy leaves a truncated file under the final name (tests/test_resume.py reproduces this).
Nothing is fsync-ed, and a killed save leaves a checkpoint-sized orphan in ``/tmp``.

:class:`AtomicModelCheckpoint` therefore has every checkpoint written to ``.<name>.partial`` in
the checkpoint's own folder, fsync-ed, and ``os.replace``-d over the final name (then the folder
is fsync-ed): a reader sees the old file or the new one, never half of one.
"""

from __future__ import annotations

import os
import random
import shutil
import zipfile
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

PARTIAL_SUFFIX = ".partial"


# -- loading with clear errors --------------------------------------------------------------------
def _other_checkpoints(path: Path) -> list[str]:
    if not path.parent.is_dir():
        return []
    return sorted(p.name for p in path.parent.glob("*.ckpt") if p != path)


def _broken(path: Path, what: str) -> ValueError:
    others = _other_checkpoints(path)
    hint = (
        f"resume from another checkpoint in {str(path.parent)!r} ({', '.join(others)})"
        if others
        else "start the run again without --ckpt_path"
    )
    return ValueError(f"checkpoint {str(path)!r} {what}; delete it and {hint}")


def load_checkpoint_file(
    path: str | Path, *, map_location: Any = "cpu", weights_only: bool = True
) -> dict[str, Any]:
    """``torch.load`` a Lightning checkpoint; a missing/empty/truncated/foreign file is an error
    that names the file and what to do, instead of a zip-reader traceback."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint {str(path)!r} not found"
            + (
                f"; checkpoints next to it: {', '.join(_other_checkpoints(path))}"
                if path.parent.is_dir()
                else ""
            )
        )
    size = path.stat().st_size
    if size == 0:
        raise _broken(path, "is empty (0 bytes): its save was interrupted")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=weights_only)
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as error:
        if weights_only and "Weights only load failed" in str(error):
            raise  # a policy refusal, not corruption: torch's message says what to allow
        raise _broken(
            path, f"is corrupt or truncated ({size} bytes; {type(error).__name__}: {error})"
        ) from error
    except Exception as error:  # pickle.UnpicklingError and friends: damaged contents
        raise _broken(path, f"cannot be read ({type(error).__name__}: {error})") from error
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise _broken(path, "is not a Lightning checkpoint (no 'state_dict')")
    return checkpoint


class CheckedCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local loads fail with :func:`load_checkpoint_file`'s errors."""

    def load_checkpoint(
        self, path: Any, map_location: Any = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        if not _is_local_file_protocol(path):
            return super().load_checkpoint(
                path, map_location=map_location, weights_only=weights_only
            )
        location = map_location if map_location is not None else (lambda storage, loc: storage)
        return load_checkpoint_file(
            path, map_location=location, weights_only=True if weights_only is None else weights_only
        )


# -- RNG state ------------------------------------------------------------------------------------
def collect_rng_state() -> dict[str, Any]:
    """Python, NumPy, torch CPU and CUDA generator states, as weights_only-loadable objects."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- atomic writes --------------------------------------------------------------------------------
def partial_path(filepath: str | Path) -> str:
    """Where a checkpoint is written before it is moved into place (same folder, hidden)."""
    head, tail = os.path.split(str(filepath))
    return os.path.join(head, f".{tail}{PARTIAL_SUFFIX}")


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
        old = filepath + ".old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(filepath, old)
        os.replace(tmp, filepath)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, filepath)
    _fsync(os.path.dirname(os.path.abspath(filepath)))


class AtomicModelCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` with atomic saves, ``last.ckpt`` also at every epoch end, RNG state.

    All ``ModelCheckpoint`` arguments apply; defaults differ in ``save_last=True`` (what a crashed
    run resumes from: ``--ckpt_path last``). With ``every_n_train_steps=N`` the periodic save runs
    every N optimiser steps, and ``last.ckpt`` is refreshed at every epoch end as well.

    ``save_rng_state``: store Python/NumPy/torch/CUDA generator states in the checkpoint and
    restore them just before the first training batch after a resume, so that random ops
    (dropout) continue the same stream. Lightning itself does not save RNG states.
    It also installs :class:`CheckedCheckpointIO` on a strategy that uses the default
    ``TorchCheckpointIO``, so a truncated checkpoint passed to ``fit`` fails with a clear error.
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
        if trainer.is_global_zero and self.dirpath and _is_local_file_protocol(self.dirpath):
            # leftovers of saves killed mid-write: never complete, never read
            for stale in Path(self.dirpath).glob(f".*{PARTIAL_SUFFIX}"):
                shutil.rmtree(stale) if stale.is_dir() else stale.unlink(missing_ok=True)

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
        if not _is_local_file_protocol(filepath):  # object stores: a put is already atomic
            super()._save_checkpoint(trainer, filepath)
            return
        tmp = partial_path(filepath)
        trainer.save_checkpoint(tmp, self.save_weights_only)  # every rank; rank 0 writes
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
