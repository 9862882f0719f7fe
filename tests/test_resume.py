"""Crash-safe resume: SIGKILL mid-training, resume from last.ckpt, end bit-identical.

The training runs in subprocesses (this file is also the training script: ``python
tests/test_resume.py --data ... --root ...``). A run is killed with SIGKILL at a random step
after at least one periodic checkpoint, resumed from ``last.ckpt`` and must end with every
trainable tensor ``torch.equal`` to an uninterrupted run, having trained on the same batches
in the same order. The decoder has attention dropout, so the RNG state must be restored too
(a control run without it diverges).
"""

from __future__ import annotations

import argparse
import errno
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from micro import MICRO_DECODER_CONFIG
from micro import MICRO_ENCODER as MICRO_ENCODER_BASE

MICRO_ENCODER = MICRO_ENCODER_BASE
MICRO_DECODER = {
    # random ops in training: the RNG state must survive a resume
    "config": {**MICRO_DECODER_CONFIG, "attention_dropout": 0.1},
    "attn_implementation": "eager",
}
NUM_IMAGES, BATCH_SIZE, EPOCHS, EVERY = 6, 4, 2, 3  # 30 samples -> 8 steps/epoch, 16 steps
STEPS_PER_EPOCH = -(-NUM_IMAGES * 5 // BATCH_SIZE)
TOTAL_STEPS = EPOCHS * STEPS_PER_EPOCH
KILLED = -signal.SIGKILL


# -- the training script (runs in a subprocess) ---------------------------------------------------
def train(args: argparse.Namespace) -> None:
    import lightning as L

    from lit_mllm.checkpointing import AtomicModelCheckpoint
    from lit_mllm.data.datamodule import MLLMDataModule, SplitSource
    from lit_mllm.module import MLLMModule

    class StepLog(L.Callback):
        """Appends (step, sample ids) per batch; SIGKILLs the process after step ``kill_at``."""

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            rng = int(torch.get_rng_state().to(torch.int64).sum())  # after this step's dropout
            loss = float(outputs["loss"])
            with open(args.log, "a") as f:
                f.write(json.dumps([trainer.global_step, batch["sample_id"], rng, loss]) + "\n")
            if trainer.global_step == args.kill_at:
                os.kill(os.getpid(), signal.SIGKILL)

    torch.set_num_threads(1)
    L.seed_everything(0, workers=True)
    module = MLLMModule(
        tokenizer="tiny",
        encoder=MICRO_ENCODER,
        connector={"kind": "resampler", "num_queries": 4},
        decoder=MICRO_DECODER,
        optim={"lr": 3e-3, "warmup_steps": 3},
    )
    data = Path(args.data)
    datamodule = MLLMDataModule(
        train=SplitSource("coco", str(data / "captions_train.json"), str(data / "images/train")),
        batch_size=BATCH_SIZE,
        num_workers=args.workers,
        max_length=128,
        seed=0,
    )
    checkpoint = AtomicModelCheckpoint(
        dirpath=Path(args.root) / "checkpoints",
        every_n_train_steps=EVERY,
        save_rng_state=not args.no_rng,
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=EPOCHS,
        deterministic=True,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[StepLog(), checkpoint],
        default_root_dir=args.root,
    )
    trainer.fit(module, datamodule, ckpt_path=args.resume)
    trainable = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    torch.save(trainable, Path(args.root) / "final.pt")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True)
    parser.add_argument("--root", required=True)
    parser.add_argument("--log", required=True)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--kill-at", type=int, default=-1)
    parser.add_argument("--resume", default=None)
    parser.add_argument("--no-rng", action="store_true")
    train(parser.parse_args())


# -- helpers --------------------------------------------------------------------------------------
def _run(data: Path, root: Path, *extra: str, workers: int = 0) -> subprocess.CompletedProcess:
    cmd = [sys.executable, __file__, "--data", str(data), "--root", str(root)]
    cmd += ["--log", str(root / "steps.jsonl"), "--workers", str(workers), *extra]
    env = {**os.environ, "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def _steps(root: Path) -> list[list]:
    """Per training step: [global step, sample ids, torch RNG checksum, loss]."""
    return [json.loads(line) for line in (root / "steps.jsonl").read_text().splitlines()]


def _trained(root: Path) -> dict[str, torch.Tensor]:
    return torch.load(root / "final.pt", weights_only=True)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    from lit_mllm.data.synthetic import generate_synthetic_dataset

    out = tmp_path_factory.mktemp("synthetic")
    generate_synthetic_dataset(out, NUM_IMAGES, 2, 0, seed=0, image_size=32, workers=0)
    return out


@pytest.fixture(scope="module")
def reference(synthetic, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("reference")
    done = _run(synthetic, root)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(_steps(root)) == TOTAL_STEPS
    return root


def _kill_and_resume(synthetic: Path, root: Path, kill_at: int, workers: int, *extra: str):
    killed = _run(synthetic, root, "--kill-at", str(kill_at), *extra, workers=workers)
    assert killed.returncode == KILLED, killed.stderr[-3000:]
    last = root / "checkpoints" / "last.ckpt"
    assert last.is_file()
    saved_step = torch.load(last, weights_only=True)["global_step"]
    assert 0 < saved_step <= kill_at
    done = _run(synthetic, root, "--resume", str(last), *extra, workers=workers)
    assert done.returncode == 0, done.stderr[-3000:]
    return saved_step, done


# -- tests ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("workers", [0, 2])
def test_sigkill_then_resume_is_bit_identical(synthetic, reference, tmp_path, workers) -> None:
    kill_at = random.randint(EVERY + 1, TOTAL_STEPS - 1)  # after >= 1 periodic checkpoint
    saved_step, done = _kill_and_resume(synthetic, tmp_path, kill_at, workers)
    why = f"killed at step {kill_at}, resumed from step {saved_step}, workers={workers}"
    assert "resuming from a checkpoint that ended before the epoch ended" not in done.stderr

    # the same batches in the same order, the same losses and RNG states: the steps after the
    # checkpoint were redone exactly
    ref_steps = {record[0]: record for record in _steps(reference)}
    steps = _steps(tmp_path)
    assert [record[0] for record in steps] == list(range(1, kill_at + 1)) + list(
        range(saved_step + 1, TOTAL_STEPS + 1)
    ), why
    for record in steps:
        assert record == ref_steps[record[0]], f"{why}: step {record[0]} differs"

    expected, got = _trained(reference), _trained(tmp_path)
    assert expected.keys() == got.keys()
    different = [n for n in expected if not torch.equal(expected[n], got[n])]
    assert not different, f"{why}: {len(different)} tensors differ, e.g. {different[:3]}"


def test_resume_without_rng_state_diverges(synthetic, reference, tmp_path) -> None:
    """Control: the bit-identity above is not an accident; dropout needs the RNG state."""
    checkpoint = tmp_path / "periodic.ckpt"  # the reference's step-15 checkpoint: 1 step left
    shutil.copyfile(reference / "checkpoints" / f"epoch=1-step={TOTAL_STEPS - 1}.ckpt", checkpoint)
    done = _run(synthetic, tmp_path, "--resume", str(checkpoint), "--no-rng")
    assert done.returncode == 0, done.stderr[-3000:]
    (step, ids, _, _), (ref_step, ref_ids, _, _) = *_steps(tmp_path), _steps(reference)[-1]
    assert (step, ids) == (ref_step, ref_ids)  # the same last batch...
    expected, got = _trained(reference), _trained(tmp_path)
    assert any(not torch.equal(expected[n], got[n]) for n in expected)  # ...other dropout


# -- atomic saves ---------------------------------------------------------------------------------
def _tiny_trainer(tmp_path: Path, callbacks: list, max_steps: int = 1):
    import lightning as L
    from lightning.pytorch.demos.boring_classes import BoringModel

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
        from lit_mllm.checkpointing import load_checkpoint_file

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
    from lit_mllm.checkpointing import AtomicModelCheckpoint, load_checkpoint_file, partial_path

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
from lit_mllm.checkpointing import AtomicModelCheckpoint

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
    from lightning.pytorch.demos.boring_classes import BoringModel

    from lit_mllm.checkpointing import AtomicModelCheckpoint

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
    import torch.distributed.checkpoint as dcp

    from lit_mllm.checkpointing import AtomicModelCheckpoint
    from lit_mllm.integrity import MANIFEST, folder_problem

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
    from lit_mllm.checkpointing import clean_stale_saves

    previous = tmp_path / "last.ckpt.old"  # commit_partial moved it aside, then died
    previous.mkdir()
    (previous / "meta.pt").write_bytes(b"previous")
    (tmp_path / ".last.ckpt.partial").mkdir()
    assert sorted(clean_stale_saves(tmp_path)) == [".last.ckpt.partial", "last.ckpt.old"]
    assert (tmp_path / "last.ckpt" / "meta.pt").read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_atomic_checkpoint_writes_with_os_replace_in_the_same_folder(tmp_path, monkeypatch) -> None:
    from lit_mllm.checkpointing import AtomicModelCheckpoint

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
    from lit_mllm.checkpointing import AtomicModelCheckpoint, CheckedCheckpointIO

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
    from lightning.pytorch.demos.boring_classes import BoringModel

    from lit_mllm.checkpointing import AtomicModelCheckpoint

    bad = tmp_path / "last.ckpt"
    bad.write_bytes(b"PK\x03\x04" + b"\x00" * 64)  # the start of a zip, then nothing
    trainer = _tiny_trainer(tmp_path, [AtomicModelCheckpoint(dirpath=tmp_path / "checkpoints")])
    with pytest.raises(ValueError, match=r"last\.ckpt.* is corrupt or truncated"):
        trainer.fit(BoringModel(), ckpt_path=bad)


@pytest.mark.parametrize(
    ("yaml_text", "key"),
    [
        ("model:\n  tokenizr: tiny\n", "tokenizr"),
        ("model:\n  encoder:\n    nme: vit_tiny\n", "nme"),
        ("data:\n  batch_sze: 4\n", "batch_sze"),
        ("trainer:\n  max_epoch: 1\n", "max_epoch"),
        ("trainr:\n  max_epochs: 1\n", "trainr"),
    ],
)
def test_config_with_unknown_key_is_refused_naming_the_key(
    tmp_path, capsys, yaml_text, key
) -> None:
    from lit_mllm.cli import main as cli_main

    config = tmp_path / "bad.yaml"
    config.write_text(yaml_text)
    with pytest.raises(SystemExit) as info:
        cli_main(["fit", "--config", str(config), "--print_config"])
    assert info.value.code != 0
    assert key in capsys.readouterr().err


if __name__ == "__main__":
    main()
