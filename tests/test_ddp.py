"""2-process DDP (gloo, CPU) trains like 1 process with the doubled batch, also when the ranks'
data differ: text-only on one rank and images on the other, a non-finite loss or an empty
micro-batch on one rank (tests/ddp_worker.py runs those)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from micro import MICRO_MODEL

from lit_mllm.data.synthetic import generate_synthetic_dataset

STEPS = 4


def micro_config(data_dir: Path, root: Path) -> dict:
    return {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "max_steps": STEPS,
            "limit_val_batches": 0,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "logger": False,
            "default_root_dir": str(root),
            "callbacks": [
                {
                    "class_path": "lit_mllm.checkpoints.AtomicModelCheckpoint",
                    "init_args": {
                        "dirpath": str(root / "ckpt"),
                        "every_n_train_steps": STEPS,
                        "save_top_k": 0,
                        "save_last": True,
                    },
                }
            ],
        },
        "model": {
            **MICRO_MODEL,
            "optim": {"lr": 3e-3, "warmup_steps": 1},
        },
        "data": {
            "synthetic": {
                # the set the test writes first: same settings, so prepare_data keeps it
                "dir": str(data_dir),
                **{"num_train": 64, "num_val": 8, "num_test": 0, "seed": 1, "image_size": 32},
            },
            "num_workers": 0,
            "one_sample_per_caption": False,
        },
    }


def run_fit(config: dict, path: Path, *extra: str) -> dict[str, torch.Tensor]:
    path.write_text(yaml.safe_dump(config))
    command = [sys.executable, "-m", "lit_mllm.cli", "fit", "--config", str(path), *extra]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = torch.load(
        Path(config["trainer"]["default_root_dir"]) / "ckpt" / "last.ckpt", weights_only=True
    )
    return checkpoint["state_dict"]


@pytest.mark.slow
def test_two_process_ddp_matches_one_process_with_double_batch(tmp_path: Path) -> None:
    data = tmp_path / "synthetic"
    generate_synthetic_dataset(data, 64, 8, 0, seed=1, image_size=32, workers=1)
    one = micro_config(data, tmp_path / "one")
    one["data"]["batch_size"] = 8
    two = micro_config(data, tmp_path / "two")
    two["data"]["batch_size"] = 4
    single = run_fit(one, tmp_path / "one.yaml", "--trainer.devices", "1")
    ddp = run_fit(two, tmp_path / "two.yaml", "--trainer.devices", "2", "--trainer.strategy", "ddp")
    import lightning as L

    from lit_mllm.module import MLLMModule

    L.seed_everything(0)
    initial = MLLMModule(**one["model"]).state_dict()
    assert single.keys() == ddp.keys()
    names = [n for n in single if n.startswith("model.") and n in initial]
    names = [n for n in names if not torch.equal(single[n], initial[n])]  # trained tensors
    update = torch.cat([(single[n] - initial[n]).flatten() for n in names]).norm()
    apart = torch.cat([(single[n] - ddp[n]).flatten() for n in names]).norm()
    # same samples per step; the loss is the mean over all supervised tokens of the global
    # batch in both (MLLMModule weights each rank by its token share): equal up to float sums
    print(f"relative distance of DDP vs single-process weights: {float(apart / update):.4f}")
    assert 0 < float(apart / update) < 0.01, float(apart / update)


@pytest.mark.slow
def test_ddp_fit_on_a_stream_ends_its_epoch_and_counts_what_it_leaves_out(tmp_path: Path) -> None:
    """LitData splits a 13-sample stream over 2 ranks: 6 each (3 steps of 2), 1 left out so that
    neither rank waits for the other at the end of the epoch; the run ends and says so."""
    from lit_mllm.data.streaming.shard import shard_source

    data = tmp_path / "synthetic"
    generate_synthetic_dataset(data, 13, 8, 0, seed=1, image_size=32, workers=1)
    stream = tmp_path / "stream"
    shard_source("coco", str(data / "captions_train.json"), str(data / "images/train"), stream,
                 one_sample_per_caption=False, chunk_bytes="4KB", workers=1)  # fmt: skip
    config = micro_config(data, tmp_path / "run")
    config["trainer"].update(max_steps=-1, max_epochs=1)
    config["trainer"]["callbacks"][0]["init_args"]["every_n_train_steps"] = 1
    config["data"].update(train={"kind": "stream", "dir": str(stream)}, batch_size=2)
    state = run_fit(config, tmp_path / "stream.yaml", "--trainer.devices", "2",
                    "--trainer.strategy", "ddp")  # fmt: skip
    checkpoint = torch.load(tmp_path / "run" / "ckpt" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 3 and state
    report = yaml.safe_load((tmp_path / "run" / "skipped_train.json").read_text())
    assert report["skipped_at_load"] == {"left_out_for_equal_ranks_per_epoch": 1}


WORKER = Path(__file__).resolve().parent / "ddp_worker.py"


def _two_processes(
    scenario: str, out: Path, strategy: str = "ddp", timeout: float = 240
) -> list[dict]:
    """Both ranks' results. A hang (a rank waiting in a collective) fails at the timeout, and
    the run's process group (rank 0 and the rank 1 it launched) is killed."""
    command = [sys.executable, str(WORKER), scenario, str(out), "2", strategy]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        _, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        pytest.fail(f"{scenario}: the 2-process run hung (no result in {timeout} s)")
    assert process.returncode == 0, stderr[-3000:]
    return [torch.load(out / f"rank{rank}.pt", weights_only=True) for rank in (0, 1)]


def _one_process(scenario: str, out: Path, accelerator: str = "cpu") -> dict:
    import ddp_worker

    batches = ddp_worker.reference_batches(ddp_worker.build_module(), scenario)
    return ddp_worker.run(scenario, out, devices=1, batches=batches, accelerator=accelerator)


def _assert_same(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(actual[name], value, rtol=0, atol=1e-12, msg=name)


@pytest.mark.parametrize("scenario", ["mixed", "nan", "empty"])
def test_ranks_with_different_data_train_like_one_process(scenario: str, tmp_path: Path) -> None:
    """mixed: a text-only rank next to a rank with images (each way round) completes, and each
    step's gradients equal one process's on the concatenated batch (float64, 1e-12).
    nan: a non-finite loss on rank 1 only makes both ranks skip step 0 (no gradients, weights
    untouched) and train step 1 like one process. empty: a micro-batch with every sample
    dropped on rank 0 neither hangs nor skips: the step is the mean over rank 1's tokens."""
    ranks = _two_processes(scenario, tmp_path / "two")
    single = _one_process(scenario, tmp_path / "one")
    for rank in ranks:
        assert rank["global_step"] == 2
        _assert_same(rank["weights"], ranks[0]["weights"])  # replicas stay identical
    skipped = 1 if scenario == "nan" else 0
    assert [rank["skipped_steps"] for rank in ranks] == [skipped, skipped]
    assert ranks[0]["empty_batches"] == (1 if scenario == "empty" else 0)
    steps = sorted(ranks[0]["grads"])
    assert steps == [0, 1]
    trained = [step for step in steps if ranks[0]["grads"][step]]
    assert trained == ([1] if scenario == "nan" else [0, 1])  # a skipped step has no gradients
    for step, reference in zip(trained, sorted(single["grads"]), strict=True):
        for rank in ranks:
            _assert_same(rank["grads"][step], single["grads"][reference])
    _assert_same(ranks[0]["weights"], single["weights"])


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="FSDP on 2 ranks needs 2 CUDA devices")
@pytest.mark.parametrize("scenario", ["mixed", "nan", "empty"])
def test_fsdp_ranks_with_different_data_train_like_one_gpu(scenario: str, tmp_path: Path) -> None:
    """The same scenarios under FSDP (FULL_SHARD, float32): a text-only rank still runs the
    encoder units (placeholder image), a NaN on one rank skips the step on both, the logged
    gradient norm is global; the gathered weights equal one GPU's on the concatenated data."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    ranks = _two_processes(scenario, tmp_path / "two", strategy="fsdp", timeout=400)
    single = _one_process(scenario, tmp_path / "one", accelerator="cuda")
    skipped = 1 if scenario == "nan" else 0
    assert [rank["skipped_steps"] for rank in ranks] == [skipped, skipped]
    assert ranks[0]["trained_steps"] == ranks[1]["trained_steps"] == single["trained_steps"]
    for step in single["trained_steps"]:
        assert ranks[0]["norms"][step] == ranks[1]["norms"][step]  # one global norm
        assert ranks[0]["norms"][step] == pytest.approx(single["norms"][step], rel=1e-4)
    for name, value in single["weights"].items():
        torch.testing.assert_close(ranks[0]["weights"][name], value, rtol=1e-4, atol=1e-6)
