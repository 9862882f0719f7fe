"""``python -m benchmarks.varlen_attention``: refuses a CPU-only machine in one line; on a GPU
(``pytest -m gpu``) prints one row per kernel that can run, FA4's error against the built-in."""

from __future__ import annotations

import pytest
import torch

from benchmarks import varlen_attention

SMALL = ["--samples", "4", "--min-len", "60", "--max-len", "300", "--repeats", "2"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_a_cpu_only_machine_gets_one_line() -> None:
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        varlen_attention.main(SMALL)


def test_the_packed_row_has_the_requested_segments() -> None:
    args = varlen_attention.argparse.Namespace(
        samples=5, min_len=3, max_len=9, heads=4, kv_heads=2, head_dim=16
    )
    (q, k, v, grad_out), cu = varlen_attention.packed_inputs(args, torch.device("cpu"))
    lengths = torch.diff(cu).tolist()
    assert len(lengths) == 5 and all(3 <= n <= 9 for n in lengths)
    assert q.shape == grad_out.shape == (sum(lengths), 4, 16)
    assert k.shape == v.shape == (sum(lengths), 2, 16)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_one_row_per_kernel_and_fa4_close_to_the_builtin() -> None:
    text = varlen_attention.main(SMALL)
    rows = [line for line in text.splitlines() if line.startswith("| ") and "kernel" not in line]
    assert rows[0].startswith("| builtin FA2")
    if "FlashAttention-4 not run" in text:
        assert len(rows) == 1
        return
    assert len(rows) == 2 and rows[1].startswith("| FlashAttention-4")
    errors = [float(e) for e in rows[1].rsplit("|", 2)[1].split(",")]
    assert max(errors) < 2e-2, errors


def test_a_kernel_row_reports_times_throughput_and_errors_against_the_reference() -> None:
    from benchmarks.kernel_table import timing_row

    reference = [torch.ones(4), torch.full((2,), 2.0)]
    outputs = [torch.ones(4), torch.tensor([2.0, 2.2])]
    result = {"first_call_s": 1.25, "forward_ms": 2.0, "both_ms": 5.0, "outputs": outputs}
    row = timing_row("k", result, reference, flops=4e12, both=1e13)
    assert row == "| k | 1.2 | 2.000 | 2000 | 5.000 | 2000 | 0.0000, 0.0707 |"
