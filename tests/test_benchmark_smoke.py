"""The training-throughput benchmark: a tiny CPU run end to end, and its moving parts."""

from __future__ import annotations

import importlib.util
import inspect
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from lit_mllm.data.special_tokens import IGNORE_INDEX
from lit_mllm.models import attention

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "train_throughput.py"
_spec = importlib.util.spec_from_file_location("train_throughput", BENCH)
tt = importlib.util.module_from_spec(_spec)
sys.modules["train_throughput"] = tt
_spec.loader.exec_module(tt)


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
    text = tt.main(argv)
    assert out.read_text() == text
    for key in ("- date: ", "- device: CPU", "- versions: python", "- command: `python bench"):
        assert key in text
    assert "--loader-dir" in text  # the command line is recorded as given

    tables = _tables(text)
    train = tables["Training throughput (best micro-batch per row)"]
    assert tuple(train[0]) == tt.TRAIN_COLUMNS
    rows = {r[0]: dict(zip(train[0], r, strict=True)) for r in train[1:]}
    assert list(rows) == ["baseline (HF LLaVA)", "lit-mllm mlp", "lit-mllm resampler"]
    numeric = [
        c
        for c in tt.TRAIN_COLUMNS
        if c not in ("row", "decoder", "connector", "attention", "compile", "status")
    ]
    for label, row in rows.items():
        assert row["status"] == "ok", (label, row["status"])
        for column in numeric:
            assert math.isfinite(_number(row[column])), (label, column, row[column])
        assert _number(row["samples/s"]) > 0 and _number(row["step (ms)"]) > 0
        assert _number(row["sup tok/s"]) < _number(row["real tok/s"])
    base, mlp, res = rows.values()
    assert base["vs baseline"] == "1.00x"
    assert _number(base["padding %"]) > 0  # right padding of variable lengths
    assert _number(mlp["padding %"]) == 0 and _number(res["padding %"]) == 0  # packing
    assert (base["image tok"], mlp["image tok"], res["image tok"]) == ("16", "16", "4")
    assert mlp["compile"] == "no" and mlp["attention"] == "sdpa"  # CPU: no compile, no varlen

    gen = tables["Validation captioning speed (batched greedy decoding)"]
    assert tuple(gen[0]) == tt.GEN_COLUMNS and len(gen) == 4
    for row in gen[1:]:
        assert row[-1] == "ok" and row[3] == "32" and _number(row[4]) > 0

    loader = tables["Data loader (MLLMDataModule, JPEG decode + transform + tokenise)"]
    assert tuple(loader[0]) == tt.LOADER_COLUMNS and len(loader) == 2
    assert _number(loader[1][3]) > 0 and math.isfinite(_number(loader[1][5]))
    assert any((tmp_path / "d" / "images" / "train").glob("*.jpg"))

    raw = json.loads(out.with_suffix(".json").read_text())
    assert [r["row"] for r in raw["rows"]] == ["baseline", "mlp", "resampler"]
    assert all(r["steps"] == 2 for r in raw["rows"])


def test_sample_stream_is_shared_long_tailed_and_30_percent_supervised() -> None:
    vocab = (16, 1000)
    first, second = tt.SampleStream(tt.REAL, 0, vocab), tt.SampleStream(tt.REAL, 0, vocab)
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
    sample = tt.Sample(
        text=torch.arange(100, 110),
        supervised=torch.tensor([0, 0, 0, 0, 1, 1, 0, 1, 1, 1], dtype=torch.bool),
        image_at=3,
    )
    block = torch.tensor([4, 5, 5, 5, 6])
    ids, labels = tt.render(sample, block)
    assert ids.tolist() == [100, 101, 102, 4, 5, 5, 5, 6, 103, 104, 105, 106, 107, 108, 109]
    ignore = IGNORE_INDEX
    assert labels.tolist() == [ignore] * 9 + [104, 105, ignore, 107, 108, 109]


def test_packed_segments_are_exact_and_computed_once_per_forward() -> None:
    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])
    cu, longest = attention.packed_segments(positions)
    assert cu.tolist() == [0, 3, 5, 9] and cu.dtype == torch.int32 and longest == 4
    assert attention.packed_segments(positions)[0] is cu  # cached for the same tensor object
    other = torch.tensor([[0, 1, 0, 1, 2, 3, 4, 0, 1]])
    assert attention.packed_segments(other)[0].tolist() == [0, 2, 7, 9]


def test_varlen_attention_gives_the_block_diagonal_sdpa_loss() -> None:
    torch.manual_seed(0)
    trainee = tt.LitTrainee(tt.TINY, "0.5b", "mlp", torch.device("cpu"))
    stream = tt.SampleStream(tt.TINY, 0, (16, 1000))
    batch = trainee.collate(stream.batch(0, 3, warmup=False))
    model_batch = {
        "input_ids": batch["input_ids"],
        "labels": batch["labels"],
        "position_ids": batch["position_ids"],
        "attention_mask": None,
        "pixel_values": torch.randn(3, 3, 32, 32),
    }
    trainee.module.eval()
    losses = {}
    for name in ("sdpa", "varlen"):
        trainee.set_attention(name)
        assert trainee.module.model.decoder.config._attn_implementation == (
            attention.VARLEN_ATTENTION if name == "varlen" else "sdpa"
        )
        losses[name] = trainee.module(model_batch)[0]
    torch.testing.assert_close(losses["varlen"], losses["sdpa"], rtol=1e-5, atol=1e-5)
    # and attention really is per sample: one sample alone gives the same hidden states
    trainee.set_attention("varlen")
    first = int(batch["cu_seqlens"][1])
    alone = {k: (v[:, :first] if torch.is_tensor(v) else v) for k, v in model_batch.items()}
    alone["pixel_values"] = model_batch["pixel_values"][:1]
    model = trainee.module.model
    with torch.no_grad():
        full = model.hidden_states(
            model.embed(model_batch["input_ids"], model_batch["pixel_values"]),
            None,
            model_batch["position_ids"],
        )
        single = model.hidden_states(
            model.embed(alone["input_ids"], alone["pixel_values"]), None, alone["position_ids"]
        )
    torch.testing.assert_close(full[:, :first], single, rtol=1e-5, atol=1e-5)


def test_reference_varlen_matches_per_sample_sdpa_with_gqa() -> None:
    torch.manual_seed(0)
    q, k, v = torch.randn(9, 4, 8), torch.randn(9, 2, 8), torch.randn(9, 2, 8)
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    out = attention.reference_varlen(q, k, v, cu, 5, 8**-0.5)
    for a, b in ((0, 4), (4, 9)):
        qs = q[a:b].transpose(0, 1)
        ks = k[a:b].transpose(0, 1).repeat_interleave(2, dim=0)
        vs = v[a:b].transpose(0, 1).repeat_interleave(2, dim=0)
        scores = (qs @ ks.transpose(-1, -2)) * 8**-0.5
        causal = torch.ones(b - a, b - a, dtype=torch.bool).tril()
        expected = scores.masked_fill(~causal, float("-inf")).softmax(-1) @ vs
        torch.testing.assert_close(out[a:b], expected.transpose(0, 1), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(attention._torch_varlen() is None, reason="torch without nn.attention.varlen")
def test_flash_varlen_passes_arguments_the_torch_kernel_accepts(monkeypatch) -> None:
    real = attention._torch_varlen()
    seen = {}

    def fake(*args, **kwargs):
        inspect.signature(real).bind(*args, **kwargs)  # raises on an unknown/missing argument
        seen.update(kwargs)
        return args[0]

    fake.__signature__ = inspect.signature(real)  # what flash_varlen reads to pick arguments
    monkeypatch.setattr(attention, "_torch_varlen", lambda: fake)
    attention._varlen_options.cache_clear()
    q, kv = torch.zeros(6, 4, 8), torch.zeros(6, 2, 8)
    attention.flash_varlen(q, kv, kv, torch.tensor([0, 6], dtype=torch.int32), 6, 0.5)
    attention._varlen_options.cache_clear()
    assert seen["scale"] == 0.5
    assert seen.get("window_size") == (-1, 0) or seen.get("is_causal") is True


class _FakeTrainee(tt.Trainee):
    """Steps succeed below ``limit`` samples per batch and raise CUDA OOM from there on."""

    row = connector = "mlp"
    image_tokens = 16

    def __init__(self, limit: int) -> None:
        super().__init__(tt.TINY, "0.5b", torch.device("cpu"))
        self.limit = limit
        self.spec = tt.FlopsSpec(1, 1, 1, 0, 1, 0, 1, 1, 1, 1, 1)
        self.zeroed = 0

    def collate(self, samples):
        sequences = [tt.render(s, torch.tensor([5] * 16)) for s in samples]
        batch = tt.pack(sequences, 0)
        batch.update(tt.batch_stats(sequences))
        return batch

    def step(self, batch) -> None:
        if batch["num_samples"] >= self.limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    def zero_grad(self) -> None:
        self.zeroed += 1


def test_out_of_memory_is_recorded_and_the_sweep_stops_there() -> None:
    args = tt.resolve_args(["--tiny"])
    trainee = _FakeTrainee(limit=4)
    stream = tt.SampleStream(tt.TINY, 0, (16, 1000))
    probes = tt.sweep(trainee, stream, [8, 2, 4], args, budget=None)
    assert [(p.batch_size, p.status) for p in probes] == [(2, "ok"), (4, "OOM")]
    assert trainee.zeroed == 1  # gradients of the failed step are dropped
    assert math.isnan(probes[1].samples_per_s) and probes[0].samples_per_s > 0
    over = tt.sweep(_FakeTrainee(limit=99), stream, [2, 4], args, budget=1)
    assert [p.status for p in over] == ["over budget"]  # peak RSS > 1 byte: first one stops


def test_batch_size_option_for_all_rows_or_per_row() -> None:
    assert tt.parse_batch_sizes("4,8", tiny=False) == {r: [4, 8] for r in tt.ROWS}
    per_row = tt.parse_batch_sizes("baseline=2;resampler=64,128", tiny=False)
    assert per_row == {"baseline": [2], "mlp": [8, 16, 32, 64], "resampler": [64, 128]}
    with pytest.raises(ValueError, match="unknown row 'llava'"):
        tt.parse_batch_sizes("llava=2", tiny=False)


def test_real_rows_have_the_same_sizes_and_576_image_tokens() -> None:
    """Built on the meta device: no memory, but every parameter count the FLOPs use."""
    meta = torch.device("meta")
    base = tt.BaselineTrainee(tt.REAL, "0.5b", meta)
    lit = tt.LitTrainee(tt.REAL, "0.5b", "mlp", meta)
    assert base.image_tokens == lit.image_tokens == 576
    assert base.spec == lit.spec  # encoder, projector, decoder body, head: identical sizes
    assert lit.spec.decoder_head_params == 151936 * 896
    assert lit.spec.encoder_params == 303_507_456
    resampler = tt.LitTrainee(tt.REAL, "1.5b", "resampler", meta)
    assert resampler.image_tokens == 64 and len(resampler.image_block) == 66
    assert resampler.spec.decoder_layers == 28 and resampler.spec.decoder_attn_dim == 1536


def test_rows_that_would_overrun_the_time_limit_are_skipped_and_reported() -> None:
    argv = ["--tiny", "--decoders", "0.5b", "--rows", "baseline,mlp", "--time-limit-s", "1e-6"]
    text = tt.main([*argv, "--gen-batches", "0", "--loader-batches", "0"])
    train = _tables(text)["Training throughput (best micro-batch per row)"]
    assert [r[0] for r in train[1:]] == ["baseline (HF LLaVA)", "lit-mllm mlp"]
    for row in train[1:]:
        assert row[-1] == "skipped: --time-limit-s 0 would be exceeded"
        assert row[tt.TRAIN_COLUMNS.index("samples/s")] == "-"
