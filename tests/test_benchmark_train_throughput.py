"""The training-throughput benchmark: a tiny CPU run end to end, and its moving parts."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from benchmarks.train_throughput.__main__ import main, parse_batch_sizes, resolve_args
from benchmarks.train_throughput.baseline import BaselineTrainee
from benchmarks.train_throughput.best_transformers import BestTransformersTrainee
from benchmarks.train_throughput.lit import LitTrainee
from benchmarks.train_throughput.notes import build_notes
from benchmarks.train_throughput.rows import sweep
from benchmarks.train_throughput.run import sizes_for
from benchmarks.train_throughput.sizes import ALL_ROWS, REAL, ROWS, TINY
from benchmarks.train_throughput.sliced import SlicedLitTrainee
from benchmarks.train_throughput.stream import Sample, SampleStream, batch_stats, render
from benchmarks.train_throughput.trainee import Trainee
from lit_mllm.data.collate import pack
from lit_mllm.data.slicing import plan_slices
from lit_mllm.flops import FlopsSpec
from lit_mllm.models.attention import VARLEN_ATTENTION
from lit_mllm.models.views import group_views
from lit_mllm.tokens import IGNORE_INDEX

ROOT = Path(__file__).resolve().parents[1]
# the report's table headers, as documented in benchmarks/README.md and read by RESULTS.md
TRAIN_COLUMNS = [
    "row",
    "decoder",
    "connector",
    "image tok",
    "micro-batch",
    "attention",
    "compile",
    "step (ms)",
    "samples/s",
    "sup tok/s",
    "real tok/s",
    "peak mem (GiB)",
    "padding %",
    "TFLOP/step",
    "MFU %",
    "MFU % (PaLM)",
    "real tok/s vs naive",
    "vs best transformers",
    "status",
]
GEN_COLUMNS = [
    "row",
    "decoder",
    "batch",
    "new tokens",
    "cache",
    "captions/s",
    "vs baseline",
    "tokens as dynamic cache",
    "status",
]
LOADER_COLUMNS = ["workers", "batch", "image px", "samples/s", "best lit train samples/s", "ratio"]
SLICED_COLUMNS = [
    "row",
    "decoder",
    "micro-batch",
    "attention",
    "compile",
    "step (ms)",
    "samples/s",
    "real tok/s",
    "MFU %",
    "padding %",
    "views/image",
    "image tok/sample",
    "view sizes/step",
    "TFLOP/step",
    "peak mem (GiB)",
    "status",
]


def _tables(text: str) -> dict[str, list[list[str]]]:
    """Markdown tables by their '## ' section title: header row first, separator dropped."""
    tables: dict[str, list[list[str]]] = {}
    title = None
    for line in text.splitlines():
        if line.startswith("## "):
            title = line[3:]
        elif line.startswith("|") and title is not None and not line.startswith("|---"):
            tables.setdefault(title, []).append([c.strip() for c in line.strip("|").split("|")])
    return tables


def _number(cell: str) -> float:
    return float(cell.replace(",", "").rstrip("x"))


def test_tiny_run_reports_every_row_with_finite_numbers(tmp_path: Path) -> None:
    out = tmp_path / "results.md"
    argv = ["--tiny", "--decoders", "0.5b", "--out", str(out), "--loader-dir", str(tmp_path / "d")]
    text = main(argv)
    assert out.read_text() == text
    for key in ("- date: ", "- device: CPU", "- versions: python"):
        assert key in text
    command = f"- command: `python -m benchmarks.train_throughput {' '.join(argv)}`"
    assert command in text  # the command line is recorded as given

    tables = _tables(text)
    train = tables["Training throughput (best micro-batch per row)"]
    assert train[0] == TRAIN_COLUMNS
    rows = {r[0]: dict(zip(train[0], r, strict=True)) for r in train[1:]}
    assert list(rows) == [
        "naive transformers LLaVA",
        "best transformers LLaVA (compiled)",
        "best transformers LLaVA (liger)",
        "lit-mllm mlp",
        "lit-mllm resampler",
    ]
    numeric = [
        c
        for c in TRAIN_COLUMNS
        if c not in ("row", "decoder", "connector", "attention", "compile", "status")
    ]
    for label, row in rows.items():
        assert row["status"] == "ok", (label, row["status"])
        for column in numeric:
            assert math.isfinite(_number(row[column])), (label, column, row[column])
        assert _number(row["samples/s"]) > 0 and _number(row["step (ms)"]) > 0
        assert _number(row["sup tok/s"]) < _number(row["real tok/s"])
    # every row's timed steps are listed, so a launch-bound row's spread can be read
    step_times = text.split("## Step times (ms, timed steps of each row)")[1].split("##")[0]
    for row in ("baseline", "best-transformers", "best-transformers-liger", "mlp", "resampler"):
        assert f"- 0.5b {row}: min " in step_times
    assert "(1.00x the naive row's)" in step_times.split("- 0.5b best-transformers:")[0]
    assert re.search(r"- device: CPU \(.+, \d+ cores\)", text)
    base, compiled, liger, mlp, res = rows.values()
    # the bar is the faster tuned transformers variant (on a CPU both run eager, no liger)
    best = max((compiled, liger), key=lambda r: _number(r["real tok/s"]))
    assert base["real tok/s vs naive"] == best["vs best transformers"] == "1.00x"
    assert compiled["compile"] == liger["compile"] == "no"
    ratio = _number(mlp["real tok/s"]) / _number(best["real tok/s"])
    assert _number(mlp["vs best transformers"]) == pytest.approx(ratio, abs=0.01)
    assert _number(base["padding %"]) > 0  # right padding of variable lengths
    assert {_number(r["padding %"]) for r in (compiled, liger, mlp, res)} == {0}  # packing
    assert [r["image tok"] for r in rows.values()] == ["16", "16", "16", "16", "4"]
    assert mlp["compile"] == "no" and mlp["attention"] == "sdpa"  # CPU: no compile, no varlen

    gen = tables["Validation captioning speed (batched greedy decoding)"]
    assert gen[0] == GEN_COLUMNS and len(gen) == 8
    caches = [(row[0], row[4]) for row in gen[1:]]
    assert caches == [
        ("naive transformers LLaVA", "dynamic"),
        ("lit-mllm mlp", "dynamic"),
        ("lit-mllm mlp", "static"),
        ("lit-mllm mlp", "cuda_graph"),
        ("lit-mllm resampler", "dynamic"),
        ("lit-mllm resampler", "static"),
        ("lit-mllm resampler", "cuda_graph"),
    ]
    for row in gen[1:]:
        assert row[-1] == "ok" and row[3] == "32" and _number(row[5]) > 0
        # float32 on the CPU: the other caches decode exactly the dynamic cache's tokens
        assert row[7] == ("-" if row[4] == "dynamic" else "100.0 %")

    loader = tables["Data loader (MLLMDataModule, JPEG decode + transform + tokenise)"]
    assert loader[0] == LOADER_COLUMNS and len(loader) == 2
    assert _number(loader[1][3]) > 0 and math.isfinite(_number(loader[1][5]))
    assert any((tmp_path / "d" / "images" / "train").glob("*.jpg"))

    raw = json.loads(out.with_suffix(".json").read_text())
    assert [r["row"] for r in raw["rows"]] == [
        "baseline",
        "best-transformers",
        "best-transformers-liger",
        "mlp",
        "resampler",
    ]
    assert all(r["steps"] == 2 for r in raw["rows"])
    # the head on every token costs more than on the supervised ones only: MFU (PaLM) > MFU,
    # compared unrounded (on a loaded 2-core CPU both print as 0.2 in the table)
    assert all(r["palm_flops"] > r["flops"] > 0 for r in raw["rows"])


def test_runs_as_a_module_from_the_repository_root() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.train_throughput", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.startswith("usage: python -m benchmarks.train_throughput [-h]")
    assert "Training throughput: a plain transformers LLaVA loop vs lit-mllm" in result.stdout
    for option in ("--tiny", "--decoders", "--batch-sizes", "--text-tokens", "--profile-steps"):
        assert option in result.stdout


def test_sample_stream_is_shared_long_tailed_and_30_percent_supervised() -> None:
    vocab = (16, 1000)
    first, second = SampleStream(REAL, 0, vocab), SampleStream(REAL, 0, vocab)
    assert torch.equal(first.get(5).text, second.get(5).text)
    assert torch.equal(first.batch(1, 4, warmup=False)[0].text, second.get(4).text)
    samples = [first.get(i) for i in range(2000)]
    lengths = torch.tensor([len(s.text) for s in samples], dtype=torch.float)
    assert lengths.min() >= 64 and lengths.max() <= 1024
    assert lengths.mean() > lengths.median()  # long right tail
    share = sum(int(s.supervised.sum()) for s in samples) / float(lengths.sum())
    assert 0.27 < share < 0.33
    assert all(int(s.text.min()) >= 16 and int(s.text.max()) < 1000 for s in samples)


def test_render_puts_the_image_block_in_and_never_supervises_it() -> None:
    sample = Sample(
        text=torch.arange(100, 110),
        supervised=torch.tensor([0, 0, 0, 0, 1, 1, 0, 1, 1, 1], dtype=torch.bool),
        image_at=3,
    )
    block = torch.tensor([4, 5, 5, 5, 6])
    ids, labels = render(sample, block)
    assert ids.tolist() == [100, 101, 102, 4, 5, 5, 5, 6, 103, 104, 105, 106, 107, 108, 109]
    ignore = IGNORE_INDEX
    assert labels.tolist() == [ignore] * 9 + [104, 105, ignore, 107, 108, 109]


def _tiny_lit_mlp() -> tuple[LitTrainee, dict, dict]:
    """The tiny lit-mllm MLP row, a collated 3-sample batch and the module's batch from it."""
    torch.manual_seed(0)
    trainee = LitTrainee(TINY, "0.5b", "mlp", torch.device("cpu"))
    stream = SampleStream(TINY, 0, (16, 1000))
    batch = trainee.collate(stream.batch(0, 3, warmup=False))
    model_batch = {
        "input_ids": batch["input_ids"],
        "labels": batch["labels"],
        "position_ids": batch["position_ids"],
        "attention_mask": None,
        "pixel_values": torch.randn(3, 3, 32, 32),
    }
    trainee.module.eval()
    return trainee, batch, model_batch


def test_set_attention_switches_the_decoder_and_keeps_the_loss() -> None:
    """The lit-mllm rows' attention choice reaches the decoder; packed rows train alike."""
    trainee, _, model_batch = _tiny_lit_mlp()
    losses = {}
    for name in ("sdpa", "varlen"):
        trainee.set_attention(name)
        assert trainee.module.model.decoder.config._attn_implementation == (
            VARLEN_ATTENTION if name == "varlen" else "sdpa"
        )
        losses[name] = trainee.module(model_batch)[0]
    torch.testing.assert_close(losses["varlen"], losses["sdpa"], rtol=1e-5, atol=1e-5)


def test_best_transformers_row_packs_without_padding_and_trains_the_naive_rows_loss() -> None:
    """DataCollatorWithFlattening's packed row (position ids restarting per sample, the first
    label of every sample ignored) gives the padded naive row's loss: same targets, and
    attention never crosses samples (with ``use_cache=False``: a cache turns transformers'
    packed-sequence detection off)."""
    cpu = torch.device("cpu")
    torch.manual_seed(0)
    naive = BaselineTrainee(TINY, "0.5b", cpu)
    best = BestTransformersTrainee(TINY, "0.5b", cpu, liger=True)
    assert not best.liger  # liger-kernel is CUDA-only: off on a CPU
    assert best.row == "best-transformers-liger" and not best.can_compile
    best.model.load_state_dict(naive.model.state_dict())
    samples = SampleStream(TINY, 0, (16, 1000)).batch(0, 4, warmup=False)
    padded, packed = naive.collate(samples), best.collate(samples)
    assert packed["input_ids"].shape == (1, packed["num_tokens"]) == (1, sum(packed["lengths"]))
    assert packed["position_ids"][0].eq(0).sum() == 4
    assert "cu_seq_lens_q" not in packed  # SDPA / flex read the position ids only
    best.attention = "flash_attention_4"  # the segments FlashAttention reads, from the CPU
    flash = best.collate(samples)
    best.attention = "sdpa"
    bounds = [0, *torch.tensor(packed["lengths"]).cumsum(0).tolist()]
    assert flash["cu_seq_lens_q"].tolist() == flash["cu_seq_lens_k"].tolist() == bounds
    assert flash["max_length_q"] == flash["max_length_k"] == max(packed["lengths"])
    assert torch.equal(flash["input_ids"], packed["input_ids"])
    pixels = torch.randn(4, 3, TINY.image_size, TINY.image_size)
    losses = []
    for trainee, batch in ((naive, padded), (best, packed)):
        trainee.model.eval()
        keys = ("input_ids", "labels", "attention_mask", "position_ids")
        inputs = {k: batch[k] for k in keys if batch.get(k) is not None}
        if trainee is best:
            inputs.pop("attention_mask", None)
        with torch.no_grad():
            losses.append(trainee.model(pixel_values=pixels, use_cache=False, **inputs).loss)
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-5)
    # the fused-loss path (liger on CUDA) shifts hidden states and labels like LLaVA does:
    # checked with plain cross-entropy in its place
    best.pixels = lambda n: pixels[:n]
    best.fused_loss = lambda weight, hidden, target: torch.nn.functional.cross_entropy(
        hidden @ weight.T, target
    )
    with torch.no_grad():
        torch.testing.assert_close(best.loss(packed), losses[0], rtol=1e-5, atol=1e-5)


def test_lit_row_with_and_without_the_collators_layout_trains_alike() -> None:
    trainee, batch, model_batch = _tiny_lit_mlp()
    assert batch["layout"].num_supervised == batch["supervised"]
    without = trainee.module(model_batch)[0]
    with_layout = trainee.module({**model_batch, "layout": batch["layout"]})[0]
    torch.testing.assert_close(with_layout, without, rtol=1e-6, atol=1e-6)


class _FakeTrainee(Trainee):
    """Steps succeed below ``limit`` samples per batch and raise CUDA OOM from there on."""

    row = connector = "mlp"
    image_tokens = 16

    def __init__(self, limit: int) -> None:
        super().__init__(TINY, "0.5b", torch.device("cpu"))
        self.limit = limit
        self.spec = FlopsSpec(1, 1, 1, 0, 1, 0, 1, 1, 1, 1, 1)
        self.zeroed = 0

    def collate(self, samples: Sequence[Sample]) -> dict:
        sequences = [render(s, torch.tensor([5] * 16)) for s in samples]
        batch = pack(sequences, 0)
        batch.update(batch_stats(sequences))
        return batch

    def step(self, batch: dict) -> None:
        if batch["num_samples"] >= self.limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    def generate(self, samples: Sequence[Sample], new_tokens: int) -> torch.Tensor:
        return torch.zeros(len(samples), new_tokens, dtype=torch.long)

    def zero_grad(self) -> None:
        self.zeroed += 1


def test_out_of_memory_is_recorded_and_the_sweep_stops_there() -> None:
    args = resolve_args(["--tiny"])
    trainee = _FakeTrainee(limit=4)
    stream = SampleStream(TINY, 0, (16, 1000))
    probes = sweep(trainee, stream, [8, 2, 4], args, budget=None)
    assert [(p.batch_size, p.status) for p in probes] == [(2, "ok"), (4, "OOM")]
    assert trainee.zeroed == 1  # gradients of the failed step are dropped
    assert math.isnan(probes[1].samples_per_s) and probes[0].samples_per_s > 0
    over = sweep(_FakeTrainee(limit=99), stream, [2, 4], args, budget=1)
    assert [p.status for p in over] == ["over budget"]  # peak RSS > 1 byte: first one stops


def test_batch_size_option_for_all_rows_or_per_row() -> None:
    assert parse_batch_sizes("4,8", tiny=False) == {r: [4, 8] for r in ALL_ROWS}
    per_row = parse_batch_sizes("baseline=2;resampler=64,128;resampler-sliced=16", tiny=False)
    assert per_row == {
        "baseline": [2],
        "best-transformers": [8, 16, 32, 48],
        "best-transformers-liger": [8, 16, 32, 48],
        "mlp": [16, 32, 48, 64],
        "resampler": [64, 128],
        "resampler-sliced": [16],
        "resampler-sliced-padded": [8, 16, 32, 64],
    }
    assert resolve_args([]).rows == list(ROWS)  # the sliced rows only when asked for
    with pytest.raises(ValueError, match="unknown row 'sliced'"):
        resolve_args(["--rows", "resampler,sliced"])
    with pytest.raises(ValueError, match="unknown row 'llava'"):
        parse_batch_sizes("llava=2", tiny=False)


def test_real_rows_have_the_same_sizes_and_576_image_tokens() -> None:
    """Built on the meta device: no memory, but every parameter count the FLOPs use."""
    meta = torch.device("meta")
    base = BaselineTrainee(REAL, "0.5b", meta)
    lit = LitTrainee(REAL, "0.5b", "mlp", meta)
    assert base.image_tokens == lit.image_tokens == 576
    assert base.spec == lit.spec  # encoder, projector, decoder body, head: identical sizes
    assert lit.spec.decoder_head_params == 151936 * 896
    # ViT-L/14 at 336 px without a head: patch embedding (no bias), CLS, 577 positions, pre-
    # and final LayerNorm, and 24 blocks of two LayerNorms, qkv, proj and a 4096-wide MLP
    width, mlp = 1024, 4096
    block = 2 * 2 * width + 3 * width * width + 3 * width + width * width + width
    block += width * mlp + mlp + mlp * width + width
    vit_l = 3 * 14 * 14 * width + width + 577 * width + 2 * 2 * width + 24 * block
    assert lit.spec.encoder_params == vit_l == 303_507_456
    # LLaVA's projector: Linear(1024, 896) and Linear(896, 896), both with bias
    assert lit.spec.connector_params == (1024 * 896 + 896) + (896 * 896 + 896)
    # Qwen2-0.5B: q (896 -> 14 x 64, bias), k and v (896 -> 2 x 64, bias), o (no bias), SwiGLU
    # MLP (3 matrices 896 x 4864), 2 RMSNorms per layer, 24 layers and a final RMSNorm
    layer = (896 * 896 + 896) + 2 * (896 * 128 + 128) + 896 * 896 + 3 * 896 * 4864 + 2 * 896
    assert lit.spec.decoder_body_params == 24 * layer + 896
    assert lit.spec.decoder_layers == 24 and lit.spec.decoder_attn_dim == 896
    resampler = LitTrainee(REAL, "1.5b", "resampler", meta)
    assert resampler.image_tokens == 64 and len(resampler.image_block) == 66
    assert resampler.spec.decoder_layers == 28 and resampler.spec.decoder_attn_dim == 1536


def test_rows_that_would_overrun_the_time_limit_are_skipped_and_reported() -> None:
    argv = ["--tiny", "--decoders", "0.5b", "--rows", "baseline,mlp", "--time-limit-s", "1e-6"]
    text = main([*argv, "--gen-batches", "0", "--loader-batches", "0"])
    train = _tables(text)["Training throughput (best micro-batch per row)"]
    assert [r[0] for r in train[1:]] == ["naive transformers LLaVA", "lit-mllm mlp"]
    for row in train[1:]:
        assert row[-1] == "skipped: --time-limit-s 0 would be exceeded"
        assert row[TRAIN_COLUMNS.index("samples/s")] == "-"


def test_notes_name_the_real_encoder_also_with_other_text_lengths() -> None:
    args = resolve_args(["--text-tokens", "20,34,71"])
    sizes = sizes_for(args)
    assert (sizes.text_min, sizes.text_median, sizes.text_max) == (20, 34, 71)
    notes = "\n".join(build_notes(args, sizes, torch.device("cuda")))
    assert "LlavaConfig(CLIP ViT-L/14-336, " in notes and "a micro CLIP" not in notes
    assert "lognormal(median 34, sigma 0.8) clipped to [20, 71] tokens" in notes
    tiny_notes = "\n".join(build_notes(resolve_args(["--tiny"]), TINY, torch.device("cpu")))
    assert "a micro CLIP ({'image_size': 32," in tiny_notes


# -- sliced images ---------------------------------------------------------------------------


def _view_flops(spec: FlopsSpec, patches: int) -> int:
    """Encoder forward + resampler fwd/bwd of one view of ``patches`` patches (the README)."""
    t = patches + spec.encoder_prefix_tokens
    encoder = 2 * spec.encoder_params * t + 4 * spec.encoder_layers * spec.encoder_width * t * t
    connector = 6 * spec.connector_params * patches
    return encoder + connector + 12 * spec.connector_queries * patches * spec.connector_width


def _decoder_flops(spec: FlopsSpec, lengths: list[int], supervised: int) -> int:
    body = 6 * spec.decoder_body_params * sum(lengths)
    attention = 12 * spec.decoder_layers * spec.decoder_attn_dim * sum(n * n for n in lengths)
    return body + attention + 6 * spec.decoder_head_params * supervised


def test_tiny_sliced_rows_report_packed_vs_padded(tmp_path: Path) -> None:
    """The sliced rows end to end on CPU: their table, the two ratios, the views histogram."""
    out = tmp_path / "sliced.md"
    rows = "resampler,resampler-sliced,resampler-sliced-padded"
    argv = ["--tiny", "--decoders", "0.5b", "--rows", rows, "--out", str(out)]
    text = main([*argv, "--gen-batches", "0", "--loader-batches", "0", "--batch-sizes", "4"])
    tables = _tables(text)
    train = tables["Training throughput (best micro-batch per row)"]
    labels = [r[0] for r in train[1:]]
    assert labels == [f"lit-mllm {r}" for r in rows.split(",")]
    assert [r[TRAIN_COLUMNS.index("image tok")] for r in train[1:]] == ["4", "4/view", "4/view"]

    sliced = tables["Sliced images (thumbnail + slices per image, packed vs padded)"]
    assert sliced[0] == SLICED_COLUMNS
    table = {r[0]: dict(zip(sliced[0], r, strict=True)) for r in sliced[1:]}
    assert list(table) == labels
    plain, packed, padded = table.values()
    for row in (plain, packed, padded):
        assert row["status"] == "ok" and row["micro-batch"] == "4"
        for column in ("real tok/s", "MFU %", "views/image", "image tok/sample"):
            assert math.isfinite(_number(row[column])) and _number(row[column]) > 0
    assert _number(plain["views/image"]) == 1 and _number(plain["image tok/sample"]) == 4
    assert _number(plain["view sizes/step"]) == 1  # one image size: one encoder call
    assert 1 < _number(packed["view sizes/step"]) <= 4 * TINY.max_views
    # the same samples in both sliced rows: same views, more of them than one per image
    assert packed["views/image"] == padded["views/image"]
    assert 1 < _number(packed["views/image"]) <= TINY.max_views
    assert _number(packed["image tok/sample"]) == pytest.approx(
        4 * _number(packed["views/image"]), abs=0.1
    )
    assert _number(packed["padding %"]) == 0 < _number(padded["padding %"])
    assert "- 0.5b: packed / padded = " in text and "real tok/s = **" in text
    assert "- 0.5b: MFU sliced packed / unsliced resampler = " in text
    assert "- 0.5b resampler-sliced: views per image over its 8 timed images" in text
    assert "- 0.5b resampler-sliced: min " in text and "; in order: " in text
    assert re.search(r"; host: [\d, ]+; GC passes \d+ \(\d+ ms; full: ", text)
    assert "Sliced rows: the resampler row's model with image_slicing(max_slices=9" in text

    raw = json.loads(out.with_suffix(".json").read_text())
    by_row = {r["row"]: r for r in raw["rows"]}
    assert by_row["resampler"]["views"] == by_row["resampler"]["images"] == 8
    for row in by_row.values():  # one time per timed step, adding up to the row's wall time
        assert len(row["step_times_ms"]) == len(row["step_host_ms"]) == row["steps"]
        assert sum(row["step_times_ms"]) == pytest.approx(1000 * row["seconds"], rel=0.05)
    hist = by_row["resampler-sliced"]["view_hist"]
    assert sum(hist.values()) == 8 and by_row["resampler-sliced"]["views"] == sum(
        int(views) * count for views, count in hist.items()
    )
    assert by_row["resampler-sliced"]["image_slots"] == 4 * by_row["resampler-sliced"]["views"]
    # the same samples, so the same model FLOPs: padding is not counted
    assert by_row["resampler-sliced"]["flops"] == by_row["resampler-sliced-padded"]["flops"]
    assert by_row["resampler-sliced"]["flops"] > by_row["resampler"]["flops"] > 0


def test_sliced_batches_have_one_feature_row_per_image_token_packed_or_padded() -> None:
    torch.manual_seed(0)
    cpu = torch.device("cpu")
    packed_trainee = SlicedLitTrainee(TINY, "0.5b", cpu, padded=False)
    stream = SampleStream(TINY, 0, (16, 1000))
    sizes = [(32, 32), (96, 32), (20, 90), (64, 64)]  # 1 view, then 1 + 3, 1 + 3, 1 + 4
    samples = [
        Sample(s.text, s.supervised, s.image_at, size)
        for s, size in zip(stream.batch(0, 4, warmup=False), sizes, strict=True)
    ]
    plans = [plan_slices(w, h, TINY.slicing) for w, h in sizes]
    assert [len(p.view_sizes) for p in plans] == [1, 4, 4, 5]
    batch = packed_trainee.collate(samples)
    ids = packed_trainee.module.model.image_token_ids
    slots = int((batch["input_ids"] == ids.patch).sum())
    assert batch["views_per_image"] == [1, 4, 4, 5] and slots == batch["image_slots"] == 4 * 14
    assert int((batch["input_ids"] == ids.start).sum()) == 4  # one thumbnail each
    assert int((batch["input_ids"] == ids.slice_start).sum()) == 3 + 3 + 4
    # the views are grouped as the library's collator groups them, in text order
    views = [torch.zeros(3, h, w) for p in plans for w, h in p.view_sizes]
    reference = group_views(views)
    pixels = packed_trainee.batch_pixels(batch)
    assert pixels.positions == reference.positions
    assert [g.shape for g in pixels.groups] == [g.shape for g in reference.groups]
    assert batch["view_patches"] == [
        (len(pos), (g.shape[-2] // 8) * (g.shape[-1] // 8))
        for g, pos in zip(reference.groups, reference.positions, strict=True)
    ]
    model = packed_trainee.module.model
    with torch.no_grad():
        assert model.image_features(pixels).shape[0] == slots

    padded_trainee = SlicedLitTrainee(TINY, "0.5b", cpu, padded=True)
    padded_trainee.module.load_state_dict(packed_trainee.module.state_dict())
    padded = padded_trainee.collate(samples)
    assert padded["input_ids"].shape[0] == 4 and padded["attention_mask"] is not None
    assert padded["num_padded_tokens"] > padded["num_tokens"] == batch["num_tokens"]
    assert int((padded["input_ids"] == ids.patch).sum()) == slots
    losses = []
    for trainee, b in ((packed_trainee, batch), (padded_trainee, padded)):
        trainee.module.eval()
        model_batch = {
            "input_ids": b["input_ids"],
            "labels": b["labels"],
            "position_ids": b["position_ids"],
            "attention_mask": b.get("attention_mask"),
            "pixel_values": pixels,
        }
        with torch.no_grad():
            losses.append(trainee.module(model_batch)[0])
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-5)


def test_sliced_flops_add_the_encoder_and_resampler_work_of_every_view() -> None:
    torch.manual_seed(0)
    trainee = SlicedLitTrainee(TINY, "0.5b", torch.device("cpu"), padded=False)
    spec = trainee.spec
    sample = SampleStream(TINY, 0, (16, 1000)).get(0)

    def one(size: tuple[int, int]) -> tuple[float, dict]:
        batch = trainee.collate([Sample(sample.text, sample.supervised, sample.image_at, size)])
        return trainee.flops(batch), batch

    single, single_batch = one((32, 32))
    sliced, sliced_batch = one((96, 32))  # thumbnail 56x16 (7x2 patches) + 3 slices of 32x32
    assert single_batch["view_patches"] == [(1, 16)]
    assert sliced_batch["view_patches"] == [(1, 14), (3, 16)]
    assert single == _decoder_flops(spec, single_batch["lengths"], single_batch["supervised"]) + (
        _view_flops(spec, 16)
    )
    extra_tokens = sliced_batch["lengths"][0] - single_batch["lengths"][0]
    assert extra_tokens == 3 * (4 + 2) + 1  # 3 slices of 4 slots and 2 delimiters, one newline
    decoder_extra = _decoder_flops(
        spec, sliced_batch["lengths"], sliced_batch["supervised"]
    ) - _decoder_flops(spec, single_batch["lengths"], single_batch["supervised"])
    views_extra = 3 * _view_flops(spec, 16) + _view_flops(spec, 14) - _view_flops(spec, 16)
    assert sliced - single == pytest.approx(decoder_extra + views_extra, rel=1e-12)
    assert views_extra > 2 * _view_flops(spec, 16)  # the extra views' encoder and resampler

    # the unsliced resampler row counts exactly one 16-patch view per sample, as before
    plain = LitTrainee(TINY, "0.5b", "resampler", torch.device("cpu"))
    batch = plain.collate([sample])
    expected = _decoder_flops(plain.spec, batch["lengths"], batch["supervised"])
    assert plain.flops(batch) == pytest.approx(expected + _view_flops(plain.spec, 16), rel=1e-12)


def test_image_sizes_of_the_stream_give_1_to_9_views_without_changing_the_text() -> None:
    stream = SampleStream(REAL, 0, (16, 1000))
    views = []
    for index in range(600):
        sample = stream.get(index)
        width, height = sample.image_size
        assert 1 / 3.1 < width / height < 3.1
        views.append(len(plan_slices(width, height, REAL.slicing).view_sizes))
    assert min(views) == 1 and max(views) == 9
    assert {1, 3, 4, 5, 7, 9} <= set(views)  # never 2 (a grid has at least 2 slices)
    assert 4 < sum(views) / len(views) < 6.5
    plain = Sample(stream.get(3).text, stream.get(3).supervised, stream.get(3).image_at)
    assert plain.image_size is None  # the unsliced rows' square image
    tiny = [
        len(
            plan_slices(
                *SampleStream(TINY, 0, (16, 1000)).get(i).image_size, TINY.slicing
            ).view_sizes
        )
        for i in range(200)
    ]
    assert max(tiny) <= TINY.max_views


def test_real_sliced_rows_are_the_resampler_model_with_64_tokens_per_view() -> None:
    """Built on the meta device: the same sizes as the resampler row, CLIP-L/336 views."""
    meta = torch.device("meta")
    sliced = SlicedLitTrainee(REAL, "1.5b", meta, padded=True)
    plain = LitTrainee(REAL, "1.5b", "resampler", meta)
    assert sliced.spec == plain.spec and sliced.row == "resampler-sliced-padded"
    assert sliced.tokens_per_view == sliced.image_tokens == 64
    assert sliced.patches(336, 336) == REAL.patches == 576
    one = sliced.sliced_image((336, 336))
    assert one.num_views == 1 and torch.equal(one.ids, plain.image_block)
    wide = sliced.sliced_image((1008, 336))  # thumbnail + 3x1 slices of 336x336
    assert wide.plan.grid == (3, 1) and wide.num_views == 4
    assert len(wide.ids) == 4 * (64 + 2) + 1  # one newline after the row of slices


def test_profiled_kernels_fall_into_the_groups_of_the_results_tables() -> None:
    """Kernel names as the H200 profiles listed them (RESULTS.md, round 3)."""
    from benchmarks.train_throughput.profiling import is_annotation, kernel_group, kernel_summary

    names = {
        "nvjet_sm90_tst_192x192_64x3_2x1_v_bz_coopB_NTN": "matmul (GEMM)",
        "void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<Flash_bwd_kernel": (
            "attention (flash / SDPA)"
        ),
        "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7": (
            "attention (flash / SDPA)"
        ),
        "triton_poi_fused__unsafe_view_mul_silu_silu_backward_view_2": (
            "compiled fused elementwise (triton)"
        ),
        "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<at::native::": (
            "optimizer (AdamW)"
        ),
        "void at::native::(anonymous namespace)::CatArrayBatchedCopy<at::native::": (
            "copies / casts"
        ),
        "void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, MeanOps": "other",
    }
    assert {name: kernel_group(name) for name in names} == names
    annotations = ["ProfilerStep#3", "Optimizer.step#AdamW.step", "lit_mllm/decode_steps"]
    assert all(is_annotation(name) for name in annotations)
    assert not any(is_annotation(name) for name in names)
    # on a CPU the profile finds no GPU kernel: the summary says so instead of failing
    text = kernel_summary(torch.device("cpu"), lambda: torch.ones(8) @ torch.ones(8), 1, "t", "x")
    assert text.startswith("t: wall ") and "GPU kernels 0.0 ms/x (**GPU busy 0.0 %**" in text


def test_caption_profile_lists_the_models_phases_with_their_host_time() -> None:
    """The model's ``lit_mllm/...`` ranges (embed, prefill, decode_steps) get a table of their
    own, one line per phase and per-unit counts; other ranges stay out of it."""
    from torch.profiler import record_function

    from benchmarks.train_throughput.profiling import kernel_summary

    def run() -> None:
        for _ in range(2):
            with record_function("lit_mllm/prefill"):
                torch.ones(64, 64) @ torch.ones(64, 64)
            with record_function("lit_mllm/decode_steps"):
                torch.ones(8) + 1
            with record_function("someone_else"):
                torch.ones(8) * 2

    text = kernel_summary(torch.device("cpu"), run, 2, "t", "batch")
    rows = [line for line in text.splitlines() if line.startswith("| lit_mllm/")]
    assert [row.split(" | ")[0] for row in rows] == [
        "| lit_mllm/prefill",
        "| lit_mllm/decode_steps",
    ]
    assert all(row.endswith("| 1 |") for row in rows)  # two calls over two batches
    assert "| phase (host wall) | ms/batch | calls/batch |" in text
    assert "someone_else" not in text.split("| phase (host wall)")[1].split("| top kernels")[0]


def test_flash_attention_of_the_tuned_row_is_for_the_text_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """LLaVA passes the text's cu_seq_lens on to its vision tower: a FlashAttention backend
    is set for the text config only (CLIP keeps SDPA); other backends for the whole model."""
    best = BestTransformersTrainee(TINY, "0.5b", torch.device("cpu"), liger=False)
    asked: list[object] = []
    monkeypatch.setattr(best.model, "set_attn_implementation", asked.append)
    monkeypatch.setattr(
        "benchmarks.train_throughput.best_transformers.keep_flash_attention_4_out_of_graphs",
        lambda: asked.append("kept out of graphs"),
    )
    best.set_attention("flash_attention_4")
    best.set_attention("sdpa")
    assert asked == [
        "kept out of graphs",
        {"text_config": "flash_attention_4", "vision_config": "sdpa"},
        "sdpa",
    ]


def test_flash_attention_4_of_the_tuned_row_stays_out_of_compiled_graphs() -> None:
    """Dynamo does not trace flash-attn-4's Python interface (it breaks the graph inside it):
    the row re-registers transformers' own function behind torch.compiler.disable, and only
    that name changes."""
    from transformers import AttentionInterface
    from transformers.integrations.flash_attention import flash_attention_forward

    from benchmarks.train_throughput.best_transformers import keep_flash_attention_4_out_of_graphs

    functions = AttentionInterface()
    before = {name: functions[name] for name in functions}
    try:
        keep_flash_attention_4_out_of_graphs()
        keep_flash_attention_4_out_of_graphs()  # again: still one wrapper around the original
        wrapped = AttentionInterface()["flash_attention_4"]
        assert wrapped is not flash_attention_forward
        assert wrapped.__wrapped__ is flash_attention_forward
        after = AttentionInterface()
        assert {n: after[n] for n in after if n != "flash_attention_4"} == {
            n: f for n, f in before.items() if n != "flash_attention_4"
        }
    finally:
        AttentionInterface.register("flash_attention_4", before["flash_attention_4"])


def test_steady_rate_leaves_out_steps_over_twice_the_median() -> None:
    """One stalled step weighs on 20 steps' mean; the steady rate leaves it out and says so."""
    from benchmarks.train_throughput.measure import Measurement

    m = Measurement("baseline", "1.5b", "mlp", 576, 12, "sdpa", False)
    m.steps, m.seconds = 4, 0.8
    m.step_times_ms = [100.0, 120.0, 480.0, 100.0]
    m.step_real_tokens = [1000, 1200, 1000, 1000]
    rate, stalls = m.steady()
    assert stalls == 1 and rate == pytest.approx(3200 / 0.32)
    m.step_times_ms[2] = 200.0  # within 2x the median (120): nothing left out
    assert m.steady() == (pytest.approx(4200 / 0.52), 0)
    m.status = "OOM"
    assert math.isnan(m.steady()[0])


def test_gc_passes_while_timed_are_logged_with_their_step_and_generation() -> None:
    """A stalled step can be told from a Python GC pass: each pass, its step and generation."""
    import gc

    from benchmarks.train_throughput.measure import GcPauses
    from benchmarks.train_throughput.report import _gc_summary

    with GcPauses() as log:
        log.step = 3
        gc.collect()
    assert log.on_gc not in gc.callbacks
    step, generation, ms = log.pauses[-1]
    assert (step, generation) == (3, 2) and ms >= 0
    gc.collect()  # after the block: not logged
    assert log.pauses[-1] == (step, generation, ms)
    summary = _gc_summary([(0, 0, 1.2), (4, 2, 250.4)])
    assert summary == "GC passes 2 (252 ms; full: step 5 250 ms)"
