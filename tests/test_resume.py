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

    from lit_mllm.checkpoints import AtomicModelCheckpoint
    from lit_mllm.data.datamodule import MLLMDataModule, SplitSource
    from lit_mllm.data.streaming.source import StreamSource
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
    train = SplitSource("coco", str(data / "captions_train.json"), str(data / "images/train"))
    if args.stream:  # the same samples, sharded and streamed with LitData
        train = StreamSource(args.stream)
    datamodule = MLLMDataModule(
        **module.data_settings(),
        train=train,
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
    parser.add_argument("--stream", default=None, help="a shard folder of the same data")
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


@pytest.fixture(scope="module")
def stream(synthetic, tmp_path_factory) -> Path:
    from lit_mllm.data.streaming.shard import shard_source

    out = tmp_path_factory.mktemp("stream")
    images = str(synthetic / "images/train")
    # small chunks: several per epoch, so a resumed epoch starts inside a chunk
    shard_source("coco", str(synthetic / "captions_train.json"), images, out, chunk_bytes="8KB")
    return out


@pytest.fixture(scope="module")
def stream_reference(synthetic, stream, tmp_path_factory):
    """Uninterrupted streamed runs, one per worker count (LitData splits the chunks over the
    workers, so the order depends on it)."""
    runs: dict[int, Path] = {}

    def reference(workers: int) -> Path:
        if workers not in runs:
            root = tmp_path_factory.mktemp(f"stream_reference_{workers}")
            done = _run(synthetic, root, "--stream", str(stream), workers=workers)
            assert done.returncode == 0, done.stderr[-3000:]
            assert len(_steps(root)) == TOTAL_STEPS
            runs[workers] = root
        return runs[workers]

    return reference


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

    _assert_redone_exactly(reference, tmp_path, kill_at, saved_step, why)


def _assert_redone_exactly(reference: Path, root: Path, kill_at: int, saved: int, why: str):
    """The same batches in the same order, the same losses and RNG states: the steps after the
    checkpoint were redone exactly, and the trained weights are bit-identical."""
    ref_steps = {record[0]: record for record in _steps(reference)}
    steps = _steps(root)
    assert [record[0] for record in steps] == list(range(1, kill_at + 1)) + list(
        range(saved + 1, TOTAL_STEPS + 1)
    ), why
    for record in steps:
        assert record == ref_steps[record[0]], f"{why}: step {record[0]} differs"
    expected, got = _trained(reference), _trained(root)
    assert expected.keys() == got.keys()
    different = [n for n in expected if not torch.equal(expected[n], got[n])]
    assert not different, f"{why}: {len(different)} tensors differ, e.g. {different[:3]}"


@pytest.mark.parametrize("workers", [0, 2])
def test_streamed_data_resumes_exactly_after_sigkill(
    synthetic, stream, stream_reference, tmp_path, workers
) -> None:
    """The same with LitData shards: the loader position comes back from the checkpoint (a
    stateful loader, saved by Lightning), so the steps after it see exactly the samples the
    uninterrupted run saw, none repeated and none lost, and the weights end bit-identical."""
    kill_at = random.randint(EVERY + 1, TOTAL_STEPS - 1)
    saved_step, _ = _kill_and_resume(synthetic, tmp_path, kill_at, workers, "--stream", str(stream))
    why = f"killed at step {kill_at}, resumed from step {saved_step}, workers={workers}"
    reference = stream_reference(workers)
    _assert_redone_exactly(reference, tmp_path, kill_at, saved_step, why)
    for epoch in range(EPOCHS):  # each epoch saw every sample exactly once
        ids = [i for step, ids, *_ in _steps(reference) for i in ids
               if (step - 1) // STEPS_PER_EPOCH == epoch]  # fmt: skip
        assert sorted(ids) == sorted(set(ids)) and len(ids) == NUM_IMAGES * 5


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


# -- settings -------------------------------------------------------------------------------------
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
