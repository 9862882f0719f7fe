"""Atomic saves (lit_mllm.checkpoints.atomic): a save killed at any point leaves the previous
checkpoint intact and nothing outside the checkpoint folder; damaged files get a clear error."""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.distributed.checkpoint as dcp
from lightning.pytorch.demos.boring_classes import BoringModel

from lit_mllm.checkpoints import AtomicModelCheckpoint
from lit_mllm.checkpoints.atomic import CheckedCheckpointIO, clean_stale_saves, partial_path
from lit_mllm.checkpoints.integrity import MANIFEST, folder_problem
from lit_mllm.checkpoints.safe_load import load_checkpoint_file

KILLED = -signal.SIGKILL


def _tiny_trainer(tmp_path: Path, callbacks: list, max_steps: int = 1):

    trainer = L.Trainer(
        accelerator="cpu",
        logger=False,
        max_steps=max_steps,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=callbacks,
    )
    module = BoringModel()
    trainer.strategy.connect(module)
    return trainer


def _interrupt_cross_device_moves(monkeypatch, system_tmp: Path) -> None:
    """Stage temp files in ``system_tmp`` as if it were another file system; die mid-copy.

    ``shutil.move`` then falls back from ``os.rename`` to copying, as it does when ``$TMPDIR``
    is a tmpfs or another disk; the copy writes half the bytes and the process "dies".
    """
    import tempfile

    system_tmp.mkdir(exist_ok=True)
    monkeypatch.setattr(tempfile, "tempdir", str(system_tmp))
    real_rename = os.rename

    def rename(src, dst, *a, **k):
        if str(src).startswith(str(system_tmp)) and not str(dst).startswith(str(system_tmp)):
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return real_rename(src, dst, *a, **k)

    def copyfile(src, dst, *a, **k):
        data = Path(src).read_bytes()
        Path(dst).write_bytes(data[: len(data) // 2])
        raise KeyboardInterrupt("killed during the copy")

    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(shutil, "copyfile", copyfile)


def test_lightning_save_is_not_atomic_across_file_systems(tmp_path, monkeypatch) -> None:
    """Why AtomicModelCheckpoint exists: Lightning's fsspec transaction stages in $TMPDIR."""
    trainer = _tiny_trainer(tmp_path, [])
    target = tmp_path / "last.ckpt"
    trainer.save_checkpoint(target)
    good = target.read_bytes()
    _interrupt_cross_device_moves(monkeypatch, tmp_path / "system_tmp")
    with pytest.raises(KeyboardInterrupt):
        trainer.save_checkpoint(target)
    monkeypatch.undo()
    assert target.read_bytes() != good  # the good checkpoint was replaced by half a file
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_checkpoint_file(target)


def _die_mid_write(monkeypatch) -> None:
    """``torch.save`` writes half the checkpoint to its target, then the process "dies"."""
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        half = buffer.getvalue()[: len(buffer.getvalue()) // 2]
        if isinstance(f, str | os.PathLike):
            Path(f).write_bytes(half)
        else:
            f.write(half)
        raise KeyboardInterrupt("killed during the save")

    monkeypatch.setattr(torch, "save", save)


def test_atomic_checkpoint_keeps_the_old_file_when_a_save_dies(tmp_path, monkeypatch) -> None:

    callback = AtomicModelCheckpoint(dirpath=tmp_path)
    trainer = _tiny_trainer(tmp_path, [callback])
    callback.setup(trainer, trainer.lightning_module, "fit")
    target = str(tmp_path / "last.ckpt")
    callback._save_checkpoint(trainer, target)
    good = Path(target).read_bytes()
    assert load_checkpoint_file(target)["state_dict"]
    _die_mid_write(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        callback._save_checkpoint(trainer, target)
    monkeypatch.undo()
    assert Path(target).read_bytes() == good  # untouched: the half file is the .partial
    assert os.path.exists(partial_path(target))
    callback.setup(trainer, trainer.lightning_module, "fit")  # a new run cleans it up
    assert not os.path.exists(partial_path(target))


KILL_BEFORE_THE_MOVE = """
import os, signal, sys
from pathlib import Path
import lightning as L
from lightning.pytorch.demos.boring_classes import BoringModel
from lit_mllm.checkpoints import AtomicModelCheckpoint

folder = Path(sys.argv[1])
callback = AtomicModelCheckpoint(dirpath=folder)
trainer = L.Trainer(accelerator="cpu", logger=False, max_steps=1, enable_progress_bar=False,
                    enable_model_summary=False, default_root_dir=folder, callbacks=[callback])
trainer.strategy.connect(BoringModel())
callback.setup(trainer, trainer.lightning_module, "fit")

def die_before_the_move(event, args):  # every byte written, the rename not done: kill -9
    if event == "os.rename":
        os.kill(os.getpid(), signal.SIGKILL)

sys.addaudithook(die_before_the_move)
callback._save_checkpoint(trainer, str(folder / "last.ckpt"))
"""


def test_save_killed_before_its_rename_leaves_nothing_in_the_system_temp_dir(tmp_path) -> None:
    """Lightning's save stages the file in $TMPDIR: a kill -9 left a checkpoint-sized orphan
    there, which no later run removes. Now the only leftover is the .partial next to the
    checkpoint, which the next run deletes."""
    system_tmp, folder = tmp_path / "system_tmp", tmp_path / "checkpoints"
    system_tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(system_tmp)}
    command = [sys.executable, "-c", KILL_BEFORE_THE_MOVE, str(folder)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == KILLED, done.stderr[-3000:]
    assert [p for p in system_tmp.rglob("*") if p.is_file()] == []
    assert [p.name for p in folder.iterdir()] == [".last.ckpt.partial"]


def test_resume_cleans_the_killed_saves_of_the_run_it_resumes(tmp_path) -> None:
    """The resumed run's folder (the previous logger version's) is not the new run's: its stale
    .partial files used to stay forever."""

    old_run, new_run = tmp_path / "version_0", tmp_path / "version_1"
    callback = AtomicModelCheckpoint(dirpath=old_run)
    trainer = _tiny_trainer(tmp_path, [callback])
    callback.setup(trainer, trainer.lightning_module, "fit")
    callback._save_checkpoint(trainer, str(old_run / "last.ckpt"))
    stale = old_run / ".last.ckpt.partial"
    stale.write_bytes(b"PK\x03\x04 half of a checkpoint")

    resumed = _tiny_trainer(tmp_path, [AtomicModelCheckpoint(dirpath=new_run)], max_steps=2)
    resumed.fit(BoringModel(), ckpt_path=old_run / "last.ckpt")
    assert resumed.global_step == 2
    assert not stale.exists()
    assert (old_run / "last.ckpt").is_file()  # the checkpoint itself stays


def test_a_sharded_save_gets_a_checksum_manifest(tmp_path, monkeypatch) -> None:
    """Folders (FSDP) have no checksums of their own: AtomicModelCheckpoint writes them."""

    callback = AtomicModelCheckpoint(dirpath=tmp_path)
    trainer = _tiny_trainer(tmp_path, [callback])
    callback.setup(trainer, trainer.lightning_module, "fit")

    def save_folder(filepath, weights_only=False, storage_options=None) -> None:
        """What FSDPStrategy writes: DCP files of the weights, and meta.pt."""
        folder = Path(filepath)
        folder.mkdir()
        state = {"model": trainer.lightning_module.state_dict()}
        dcp.save(state, checkpoint_id=folder, no_dist=True)
        torch.save({"global_step": trainer.global_step}, folder / "meta.pt")

    monkeypatch.setattr(trainer, "save_checkpoint", save_folder)
    folder = tmp_path / "last.ckpt"
    for _ in range(2):  # a new folder, then one replacing it
        callback._save_checkpoint(trainer, str(folder))
        listed = json.loads((folder / MANIFEST).read_text())["files"]
        assert set(listed) == {p.name for p in folder.iterdir()} - {MANIFEST}
        assert {".metadata", "meta.pt"} < set(listed)
        assert folder_problem(folder) is None
        assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    (folder / "meta.pt").write_bytes(b"other bytes")
    assert folder_problem(folder) == "is damaged: meta.pt has 11 bytes, " + (
        f"{listed['meta.pt']['size']} when saved"
    )


def test_sharded_save_killed_between_its_renames_gets_its_previous_version_back(tmp_path) -> None:

    previous = tmp_path / "last.ckpt.old"  # commit_partial moved it aside, then died
    previous.mkdir()
    (previous / "meta.pt").write_bytes(b"previous")
    (tmp_path / ".last.ckpt.partial").mkdir()
    assert sorted(clean_stale_saves(tmp_path)) == [".last.ckpt.partial", "last.ckpt.old"]
    assert (tmp_path / "last.ckpt" / "meta.pt").read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_atomic_checkpoint_writes_with_os_replace_in_the_same_folder(tmp_path, monkeypatch) -> None:

    callback = AtomicModelCheckpoint(dirpath=tmp_path)
    trainer = _tiny_trainer(tmp_path, [callback])
    callback.setup(trainer, trainer.lightning_module, "fit")
    replaced = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (replaced.append((a, b)), real_replace(a, b)))
    target = tmp_path / "epoch=0-step=1.ckpt"
    callback._save_checkpoint(trainer, str(target))
    assert replaced == [(str(tmp_path / ".epoch=0-step=1.ckpt.partial"), str(target))]
    assert target.is_file() and not list(tmp_path.glob(".*.partial"))


# -- clear errors ---------------------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage", "missing"])
def test_broken_checkpoint_gives_a_clear_error(tmp_path, damage) -> None:

    callback = AtomicModelCheckpoint(dirpath=tmp_path)
    trainer = _tiny_trainer(tmp_path, [callback])
    callback.setup(trainer, trainer.lightning_module, "fit")
    assert isinstance(trainer.strategy.checkpoint_io, CheckedCheckpointIO)
    good = tmp_path / "epoch=0-step=1.ckpt"
    trainer.save_checkpoint(good)
    bad = tmp_path / "last.ckpt"
    data = good.read_bytes()
    if damage == "truncated":
        bad.write_bytes(data[: len(data) * 2 // 3])
    elif damage == "empty":
        bad.write_bytes(b"")
    elif damage == "garbage":
        bad.write_bytes(b"\x00not a checkpoint" * 100)
    error = FileNotFoundError if damage == "missing" else ValueError
    with pytest.raises(error) as info:
        trainer.strategy.load_checkpoint(bad)
    message = str(info.value)
    assert str(bad) in message and "epoch=0-step=1.ckpt" in message  # names it + a way out
    if damage != "missing":
        assert "delete it" in message


def test_truncated_checkpoint_passed_to_fit_names_the_file(tmp_path) -> None:

    bad = tmp_path / "last.ckpt"
    bad.write_bytes(b"PK\x03\x04" + b"\x00" * 64)  # the start of a zip, then nothing
    trainer = _tiny_trainer(tmp_path, [AtomicModelCheckpoint(dirpath=tmp_path / "checkpoints")])
    with pytest.raises(ValueError, match=r"last\.ckpt.* is corrupt or truncated"):
        trainer.fit(BoringModel(), ckpt_path=bad)
