"""Dashboard callbacks: a micro fit on CPU written to TensorBoard, then read back."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest

pytest.importorskip("pycocoevalcap")  # caption metrics; not on every GPU image
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from lit_mllm.callbacks import CaptionGallery, CaptionReport, ThroughputMonitor
from lit_mllm.callbacks.gallery import caption_table, denormalize
from lit_mllm.callbacks.report import format_report
from lit_mllm.data.datamodule import MLLMDataModule, SyntheticData
from lit_mllm.data.synthetic import generate_synthetic_dataset
from lit_mllm.flops import sample_lengths, spec_from_model, step_flops, supervised_token_count
from lit_mllm.metrics.reference import reference_scores
from lit_mllm.plots import main as plot_main
from lit_mllm.plots import plot_curves, read_scalars
from tests.test_model import micro_module

PEAK = 1e12  # a made-up CPU peak so perf/mfu is logged
REFERENCE_METRICS = ["CIDEr", "Bleu_4"]  # ROUGE_L is scored for the model only
WINDOW = 2


class BatchRecorder(L.Callback):
    """Keeps the training batches so the test can recount what the monitor measured."""

    def __init__(self) -> None:
        self.batches: list[dict] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.batches.append(batch)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("fit")
    data_dir = root / "synthetic"
    generate_synthetic_dataset(data_dir, 64, 16, 0, seed=0, image_size=32, workers=1)
    module = micro_module(
        metrics=["BLEU", "ROUGE_L", "CIDEr"], generation={"max_new_tokens": 6, "num_beams": 1}
    )
    synthetic = SyntheticData(
        dir=str(data_dir), num_train=64, num_val=16, num_test=0, image_size=32
    )
    datamodule = MLLMDataModule(
        **module.data_settings(),
        synthetic=synthetic,
        batch_size=8,
        eval_batch_size=8,
        num_workers=0,
        max_length=128,
    )
    logger = TensorBoardLogger(save_dir=str(root), name="tb")
    report, recorder = CaptionReport(reference_metrics=REFERENCE_METRICS), BatchRecorder()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=6,
        val_check_interval=3,
        log_every_n_steps=1,
        logger=logger,
        callbacks=[
            ThroughputMonitor(peak_flops=PEAK, window=WINDOW),
            CaptionGallery(4),
            report,
            recorder,
        ],
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, datamodule)
    return SimpleNamespace(
        trainer=trainer, module=module, datamodule=datamodule, logdir=Path(logger.log_dir),
        report=report, batches=recorder.batches, scalars=read_scalars(logger.log_dir),
        reference=reference_scores(data_dir / "captions_val.json", REFERENCE_METRICS),
    )  # fmt: skip


def _accumulator(logdir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"images": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_scalar_tags(fitted: SimpleNamespace) -> None:
    scalars = fitted.scalars
    expected = {
        "train/loss", "train/grad_norm", "val/loss", "val/CIDEr", "val/Bleu_4", "val/ROUGE_L",
        "perf/step_time_s", "perf/samples_per_sec", "perf/tokens_per_sec",
        "perf/tokens_per_sec_per_device", "perf/supervised_tokens_per_sec",
        "perf/padding_waste_pct", "perf/model_tflops_per_device", "perf/mfu", "hp_metric",
        "perf/data_wait_pct",
    }  # fmt: skip
    assert expected <= set(scalars), expected - set(scalars)
    assert [step for step, _ in scalars["train/loss"]] == [0, 1, 2, 3, 4, 5]
    assert [step for step, _ in scalars["val/CIDEr"]] == [2, 5]  # after optimiser steps 3 and 6
    assert len(scalars["perf/tokens_per_sec"]) == 6
    assert not any(tag.startswith("perf/gpu_mem") for tag in scalars)  # CPU run
    grad_norms = [v for _, v in scalars["train/grad_norm"]]
    assert len(grad_norms) == 6 and all(math.isfinite(v) and v > 0 for v in grad_norms)
    assert scalars["hp_metric"][-1] == (
        6,
        pytest.approx(fitted.module.last_caption_scores["val/CIDEr"]),
    )


def test_perf_values_match_the_batches(fitted: SimpleNamespace) -> None:
    """Recount the last window's batches and check the logged rates against them."""
    assert len(fitted.batches) == 6
    batches = fitted.batches[-WINDOW:]
    tokens = sum(b["num_tokens"] for b in batches)
    padded = sum(b["num_padded_tokens"] for b in batches)
    supervised = sum(int(supervised_token_count(b["labels"])) for b in batches)
    spec = spec_from_model(fitted.module.model)
    flops = sum(
        step_flops(
            spec,
            num_images=len(b["pixel_values"]),
            patches_per_image=16,
            sample_lengths=sample_lengths(b),
            supervised_tokens=int(supervised_token_count(b["labels"])),
        )
        for b in batches
    )
    last = {tag: points[-1][1] for tag, points in fitted.scalars.items()}
    seconds = WINDOW * last["perf/step_time_s"]
    assert last["perf/padding_waste_pct"] == pytest.approx(100 * (padded - tokens) / padded)
    assert last["perf/tokens_per_sec"] * seconds == pytest.approx(tokens, rel=1e-5)
    assert last["perf/samples_per_sec"] * seconds == pytest.approx(16, rel=1e-5)
    assert last["perf/supervised_tokens_per_sec"] * seconds == pytest.approx(supervised, rel=1e-5)
    assert last["perf/mfu"] * PEAK * seconds == pytest.approx(flops, rel=1e-5)
    assert last["perf/model_tflops_per_device"] * 1e12 == pytest.approx(last["perf/mfu"] * PEAK)


def test_gallery_image_text_and_hparams(fitted: SimpleNamespace) -> None:
    from tensorboard.plugins.hparams import plugin_data_pb2

    acc = _accumulator(fitted.logdir)
    images = acc.Images("val/caption_gallery")
    assert [e.step for e in images] == [2, 5]  # the steps of the val/CIDEr points
    assert images[-1].encoded_image_string[:8] == b"\x89PNG\r\n\x1a\n"
    assert images[-1].width > 500 and images[-1].height > 200  # 4 images in one row + text
    text = acc.Tensors("val/captions/text_summary")
    assert [e.step for e in text] == [2, 5]
    table = text[-1].tensor_proto.string_val[0].decode()
    examples = fitted.module.last_val_examples
    assert table.startswith("| image | prediction | references |")
    assert f"| {examples['image_ids'][0]} |" in table
    assert examples["references"][0][0] in table

    content = acc.PluginTagToContent("hparams")
    starts = [
        plugin_data_pb2.HParamsPluginData.FromString(raw).session_start_info
        for tag, raw in content.items()
        if tag.endswith("session_start_info")
    ]
    assert starts and starts[-1].hparams["decoder/train"].string_value == "full"
    assert starts[-1].hparams["connector/num_queries"].number_value == 4
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"])
    metric_tags = {m.name.tag for m in experiment.experiment.metric_infos}
    assert {"hp_metric", "val/CIDEr", "val/Bleu_4"} <= metric_tags


def test_caption_report(fitted: SimpleNamespace) -> None:
    path = fitted.logdir / "caption_report.json"
    saved = json.loads(path.read_text())
    assert saved == json.loads(json.dumps(fitted.report.last_report))
    scores = fitted.module.last_caption_scores
    rows = {row["metric"]: row for row in saved["metrics"]}
    assert set(rows) == {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr"}
    assert rows["CIDEr"]["model"] == pytest.approx(scores["val/CIDEr"])
    reference = fitted.reference  # the baseline of the val file, cached next to it by the report
    assert saved["reference_scores"] == reference and 0 < reference["CIDEr"] < 10
    assert rows["CIDEr"]["ratio"] == pytest.approx(scores["val/CIDEr"] / reference["CIDEr"])
    assert rows["Bleu_4"]["reference"] == reference["Bleu_4"]
    assert rows["ROUGE_L"]["reference"] is None and rows["ROUGE_L"]["ratio"] is None
    assert saved["global_step"] == 6 and saved["stage"] == "fit"
    assert 0 < saved["wall_seconds"] < 600
    text = format_report(saved)
    assert f"{100 * rows['CIDEr']['ratio']:.1f}%" in text
    assert "wall time 0:0" in text and "6 steps" in text


def test_plots(fitted: SimpleNamespace, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = plot_curves(fitted.logdir.parent, tmp_path / "curves.png")  # parent: finds version_0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    plot_main(["--logdir", str(fitted.logdir), "--list"])
    listed = capsys.readouterr().out
    assert "val/CIDEr\t2 points" in listed and "train/loss\t6 points" in listed
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_scalars(tmp_path / "missing")


def test_grad_norm_is_the_total_l2_norm() -> None:
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(1))
    unused = torch.nn.Parameter(torch.zeros(3))  # grad None: skipped
    a.grad, b.grad = torch.tensor([3.0, 4.0]), torch.tensor([12.0])
    optimizer = torch.optim.SGD([a, b, unused], lr=0.1)
    logged: dict[str, float] = {}
    module = SimpleNamespace(log=lambda name, value, **_: logged.__setitem__(name, float(value)))
    ThroughputMonitor().on_before_optimizer_step(None, module, optimizer)
    assert logged == {"train/grad_norm": 13.0}


def test_gradient_accumulation_and_world_size() -> None:
    """Micro-batches add up until the optimiser steps; rates count every rank."""
    logged: dict[str, float] = {}
    module = SimpleNamespace(
        device=torch.device("cpu"),
        log=lambda name, value, **_: logged.__setitem__(name, float(value)),
    )
    trainer = SimpleNamespace(global_step=0, world_size=2)
    monitor = ThroughputMonitor(window=1)

    def batch(real: list[int], width: int) -> dict:
        mask = torch.tensor([[1] * n + [0] * (width - n) for n in real])
        labels = torch.where(mask.bool(), 1, -100)
        return {
            "input_ids": torch.zeros_like(mask), "labels": labels, "attention_mask": mask,
            "batch_size": len(real), "num_tokens": sum(real), "num_padded_tokens": mask.numel(),
        }  # fmt: skip

    monitor.on_train_batch_start(trainer, module, None, 0)
    monitor.on_train_batch_end(trainer, module, None, batch([3, 5], 5), 0)
    assert logged == {}  # still accumulating
    trainer.global_step = 1
    monitor.on_train_batch_end(trainer, module, None, batch([2], 4), 1)
    seconds = logged["perf/step_time_s"]
    assert logged["perf/samples_per_sec"] * seconds == pytest.approx(2 * 3)
    assert logged["perf/tokens_per_sec"] * seconds == pytest.approx(2 * 10)
    assert logged["perf/tokens_per_sec_per_device"] * seconds == pytest.approx(10)
    assert logged["perf/supervised_tokens_per_sec"] * seconds == pytest.approx(2 * (2 + 4 + 1))
    assert logged["perf/padding_waste_pct"] == pytest.approx(100 * (14 - 10) / 14)
    assert "perf/mfu" not in logged and "perf/model_tflops_per_device" not in logged


def test_gallery_is_a_no_op_without_tensorboard(tmp_path: Path) -> None:
    trainer = SimpleNamespace(
        loggers=[CSVLogger(str(tmp_path))], sanity_checking=False, global_step=1
    )
    module = SimpleNamespace(
        last_val_examples={
            "pixel_values": torch.zeros(1, 3, 8, 8),
            "predictions": ["a"],
            "references": [["b"]],
            "image_ids": [1],
        },
        last_caption_scores={"val/CIDEr": 1.0},
        image_data_config={},
    )
    gallery = CaptionGallery()
    gallery.on_validation_epoch_end(trainer, module)
    gallery.on_fit_end(trainer, module)
    assert list(tmp_path.iterdir()) == []


def test_denormalize_and_table() -> None:
    cfg = {"mean": (0.5, 0.4, 0.3), "std": (0.2, 0.25, 0.5)}
    images = torch.rand(2, 3, 4, 4)
    mean, std = (
        torch.tensor(cfg["mean"]).view(1, 3, 1, 1),
        torch.tensor(cfg["std"]).view(1, 3, 1, 1),
    )
    assert torch.allclose(denormalize((images - mean) / std, cfg), images, atol=1e-6)
    table = caption_table(["a | b"], [["r1", "r2", "r3"]], [7])
    assert table.splitlines()[2] == "| 7 | a \\| b | r1<br>r2 |"


def test_data_wait_is_the_share_of_the_step_spent_between_batches() -> None:
    """Half of every step waits for the next batch (a slow loader), half computes: the
    monitor reports ~50 % data wait."""
    logged: dict[str, float] = {}
    module = SimpleNamespace(
        device=torch.device("cpu"),
        log=lambda name, value, **kwargs: logged.__setitem__(name, value),
    )
    trainer = SimpleNamespace(global_step=0, world_size=1)
    monitor = ThroughputMonitor(window=3, prog_bar=False)
    for _ in range(4):
        time.sleep(0.06)  # the loader
        monitor.on_train_batch_start(trainer, module, {}, 0)
        time.sleep(0.06)  # forward, backward, optimiser step
        trainer.global_step += 1
        monitor.on_train_batch_end(trainer, module, None, {}, 0)
    assert 35 < logged["perf/data_wait_pct"] < 65, logged
