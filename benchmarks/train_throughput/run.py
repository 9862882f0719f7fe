"""One whole benchmark run: the data loader first, then every row, decoder by decoder.

The report is rewritten after every row, so a run cut short still leaves what it measured.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from benchmarks.train_throughput.loader import LoaderResult, loader_benchmark
from benchmarks.train_throughput.notes import build_notes, device_name, versions
from benchmarks.train_throughput.report import render_report, write_outputs
from benchmarks.train_throughput.rows import Choices, RowReport, placeholder_row, run_row
from benchmarks.train_throughput.sizes import BEST_ROWS, REAL, TINY, Sizes
from benchmarks.train_throughput.stream import SampleStream
from lit_mllm.flops import peak_flops


def sizes_for(args: argparse.Namespace) -> Sizes:
    """The scale of the run, with the text lengths of --text-tokens when given."""
    sizes = TINY if args.tiny else REAL
    if args.text_tokens:
        low, median, high = args.text_tokens
        sizes = replace(sizes, text_min=low, text_median=median, text_max=high)
    return sizes


def _peak(args: argparse.Namespace, device: torch.device) -> tuple[float, str]:
    """Peak dense bf16 FLOP/s for MFU, and where the number comes from."""
    cuda = device.type == "cuda"
    peak = (args.peak_tflops * 1e12) if args.peak_tflops else None
    peak = peak or (peak_flops(torch.cuda.get_device_name(device), "bf16-mixed") if cuda else None)
    note = "from --peak-tflops" if args.peak_tflops else "device table (lit_mllm.flops)"
    if peak is None:
        peak, note = 1e12, "unknown device: nominal 1 TFLOP/s, MFU not meaningful"
    return peak, note


def _budget(args: argparse.Namespace, device: torch.device) -> int | None:
    """Bytes every row's micro-batch must fit in; None on CPU without --mem-budget-gb."""
    if args.mem_budget_gb is not None:
        return int(args.mem_budget_gb * 2**30)
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    return None


def run(args: argparse.Namespace, cuda: bool, command: str) -> str:
    """Measure every requested row; return the markdown report (also printed, and --out)."""
    device = torch.device("cuda" if cuda else "cpu")
    sizes = sizes_for(args)
    torch.manual_seed(args.seed)
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    peak, peak_note = _peak(args, device)
    budget = _budget(args, device)

    vocab = min(int(sizes.decoders[d]["vocab_size"]) for d in args.decoders)
    stream = SampleStream(sizes, args.seed, (16, vocab - 16))
    header = [
        "# lit-mllm training throughput vs a transformers LLaVA baseline",
        "",
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- device: {device_name(device)}; peak dense bf16 {peak / 1e12:.0f} TFLOP/s ({peak_note})",
        f"- versions: {versions()}",
        f"- command: `{command}`",
        f"- memory budget per row: {'whole device' if budget is None else f'{budget / 2**30:.1f} GiB'}",
    ]
    started = time.perf_counter()
    reports: list[RowReport] = []
    loader: list[LoaderResult] = []
    timeline: list[str] = []

    def publish(final: bool) -> str:
        """Render and write what is measured so far: a run cut short still leaves a report."""
        notes = build_notes(args, sizes, device)
        elapsed = time.perf_counter() - started
        state = "" if final else " (run in progress: partial report)"
        notes.append(f"Wall time {elapsed:.0f}s{state}: " + ", ".join(timeline) + ".")
        text = render_report(header, reports, loader, peak, notes)
        if args.out:
            write_outputs(Path(args.out), text, header, reports, loader, peak)
        return text

    if args.loader_batches > 0:  # CPU only and short: first, so a time limit never skips it
        t0 = time.perf_counter()
        loader = loader_benchmark(args, sizes)
        timeline.append(f"loader {time.perf_counter() - t0:.0f}s")
    choices: dict[str, Choices] = {}  # per family: each tuned transformers row, and lit-mllm
    for decoder in args.decoders:
        for row in dict.fromkeys(args.rows):  # in the order given
            elapsed = time.perf_counter() - started
            done = [r.seconds for r in reports]
            expected = max(done) if done else 0.0
            if args.time_limit_s and elapsed + expected > args.time_limit_s:
                reason = f"skipped: --time-limit-s {args.time_limit_s:.0f} would be exceeded"
                reports.append(RowReport(final=placeholder_row(row, decoder, reason)))
                timeline.append(f"{decoder}/{row} skipped")
                continue
            family = choices.setdefault(row if row in BEST_ROWS else "lit", Choices())
            report = run_row(row, decoder, sizes, device, stream, args, family, budget)
            reports.append(report)
            timeline.append(f"{decoder}/{row} {report.seconds:.0f}s")
            status = report.final.status if report.final else "-"
            clock = f"[{time.perf_counter() - started:6.0f}s]"
            print(f"{clock} {decoder} {row}: {status}", file=sys.stderr)
            publish(final=False)
    text = publish(final=True)
    print(text)
    return text
