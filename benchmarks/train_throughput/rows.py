"""One row of the table: choose attention and compile, sweep micro-batches, run the best."""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers.utils import is_flash_attn_2_available, is_flash_attn_4_available

from benchmarks.train_throughput.baseline import BaselineTrainee
from benchmarks.train_throughput.best_transformers import BestTransformersTrainee
from benchmarks.train_throughput.device import failure_status, free_memory
from benchmarks.train_throughput.generation import GenResult, measure_generation
from benchmarks.train_throughput.lit import LitTrainee
from benchmarks.train_throughput.measure import Measurement, measure
from benchmarks.train_throughput.profiling import profile_generation, profile_training
from benchmarks.train_throughput.sizes import (
    BEST_ROWS,
    Sizes,
    is_padded,
    is_sliced,
    row_connector,
)
from benchmarks.train_throughput.sliced import SlicedLitTrainee
from benchmarks.train_throughput.stream import SampleStream
from benchmarks.train_throughput.trainee import Trainee
from lit_mllm.models.attention import varlen_available
from lit_mllm.models.fa4_varlen import fa4_problem


@dataclass
class Choices:
    """Attention backend and compile choice made on a family's first row (lit-mllm, or the
    best-transformers baseline), reused by its later rows."""

    attention: str | None = None
    compiled: bool | None = None


@dataclass
class RowReport:
    """Everything measured for one row: the final run, its probes, captions, profile."""

    final: Measurement | None
    probes: list[Measurement] = field(default_factory=list)
    generation: list[GenResult] = field(default_factory=list)
    profile: str | None = None
    seconds: float = 0.0


def _best(results: Sequence[Measurement]) -> Measurement | None:
    ok = [m for m in results if m.ok]
    return max(ok, key=lambda m: m.samples_per_s) if ok else None


def probe(
    trainee: Trainee,
    stream: SampleStream,
    batch_size: int,
    args: argparse.Namespace,
    stage: str,
    budget: int | None,
    extra_warmup: int = 0,
) -> Measurement:
    """A short run that only has to rank configurations."""
    warmup = args.probe_warmup + extra_warmup
    return measure(
        trainee, stream, batch_size, warmup, args.probe_steps, stage=stage, budget_bytes=budget
    )


def attention_candidates(trainee: Trainee, args: argparse.Namespace) -> list[str]:
    """The attention backends a row may choose from (``--lit-attn`` / ``--best-attn`` pick one)."""
    device = trainee.device
    if isinstance(trainee, BestTransformersTrainee):
        names = ["sdpa"] + (["flex_attention"] if device.type == "cuda" else [])
        if device.type == "cuda" and fa4_problem(device) is None and is_flash_attn_4_available():
            names.append("flash_attention_4")  # transformers' own varlen path for packed rows
        return names if args.best_attn == "auto" else [args.best_attn]
    names = ["sdpa"]
    if varlen_available(device):
        names.append("varlen")
    if device.type == "cuda" and fa4_problem(device) is None:
        names.append("varlen-fa4")
    if device.type == "cuda" and is_flash_attn_2_available():
        names.append("flash_attention_2")
    return names if args.lit_attn == "auto" else [args.lit_attn]


def choose_config(
    trainee: LitTrainee | BestTransformersTrainee,
    stream: SampleStream,
    args: argparse.Namespace,
    choices: Choices,
    batch_size: int,
    budget: int | None,
) -> list[Measurement]:
    """Try the attention backends, then compile, at ``batch_size``; keep what is fastest."""
    probes: list[Measurement] = []
    device = trainee.device
    if choices.attention is None:
        candidates = attention_candidates(trainee, args)
        if len(candidates) == 1:
            choices.attention = candidates[0]
        else:
            for name in candidates:
                trainee.set_attention(name)
                probes.append(probe(trainee, stream, batch_size, args, "attention", budget))
            best = _best(probes)
            choices.attention = best.attention if best else "sdpa"
    trainee.set_attention(choices.attention)
    if choices.compiled is None:
        if not trainee.can_compile:
            choices.compiled = False
        elif args.compile == "auto" and device.type == "cuda":
            eager = [m for m in probes if m.attention == choices.attention and m.ok]
            if not eager:
                eager = [probe(trainee, stream, batch_size, args, "compile", budget)]
                probes.extend(eager)
            trainee.set_compiled(True)
            # two more warm-up steps: the first compiled step compiles, the next may recompile
            compiled = probe(trainee, stream, batch_size, args, "compile", budget, extra_warmup=2)
            probes.append(compiled)
            wins = compiled.ok and (
                not eager[0].ok or compiled.samples_per_s > 1.02 * eager[0].samples_per_s
            )
            choices.compiled = bool(wins)
        else:
            choices.compiled = args.compile == "on"
    trainee.set_compiled(choices.compiled)
    return probes


def _same_config(m: Measurement, trainee: Trainee) -> bool:
    return m.attention == trainee.attention and m.compiled == trainee.compiled


def sweep(
    trainee: Trainee,
    stream: SampleStream,
    sizes: Sequence[int],
    args: argparse.Namespace,
    budget: int | None,
    done: Sequence[Measurement] = (),
) -> list[Measurement]:
    """Probe micro-batch sizes in ascending order; stop at the first that does not fit."""
    probes: list[Measurement] = []
    for size in sorted(sizes):
        reuse = [m for m in done if m.batch_size == size and _same_config(m, trainee)]
        result = reuse[-1] if reuse else None
        if result is None:
            result = probe(trainee, stream, size, args, "batch", budget)
            probes.append(result)
        if not result.ok:
            break
    return probes


def placeholder_row(row: str, decoder: str, status: str) -> Measurement:
    """The table line of a row that could not be measured (build failure, time limit)."""
    return Measurement(
        row=row,
        decoder=decoder,
        connector=row_connector(row),
        image_tokens=0,
        batch_size=0,
        attention="-",
        compiled=False,
        status=status.splitlines()[0][:160],
    )


def make_trainee(
    row: str,
    decoder: str,
    sizes: Sizes,
    device: torch.device,
    layout: bool = True,
    mlp_kernel: str = "transformers",
    float8: str | None = None,
) -> Trainee:
    """The model and training loop of one row of the table (``mlp_kernel``: lit rows';
    ``float8``: lit and best-transformers rows', never the naive one's)."""
    if row == "baseline":
        return BaselineTrainee(sizes, decoder, device)
    if row in BEST_ROWS:
        liger = row.endswith("-liger")
        return BestTransformersTrainee(sizes, decoder, device, liger=liger, float8=float8)
    if is_sliced(row):
        return SlicedLitTrainee(sizes, decoder, device, is_padded(row), mlp_kernel, float8)
    return LitTrainee(
        sizes, decoder, row, device, layout=layout, mlp_kernel=mlp_kernel, float8=float8
    )


def run_row(
    row: str,
    decoder: str,
    sizes: Sizes,
    device: torch.device,
    stream: SampleStream,
    args: argparse.Namespace,
    choices: Choices,
    budget: int | None,
) -> RowReport:
    """Build the row's trainee, choose its configuration and micro-batch, run it, free it."""
    start = time.perf_counter()
    trainee: Trainee | None = None
    report = RowReport(final=None)
    try:
        layout = args.lit_layout == "on"
        float8 = None if args.float8 == "none" else args.float8
        trainee = make_trainee(row, decoder, sizes, device, layout, args.mlp_kernel, float8)
        if isinstance(trainee, LitTrainee):
            trainee.set_residual_dtype(args.residual_dtype)
        batch_sizes = args.batch_sizes[row]
        if isinstance(trainee, LitTrainee | BestTransformersTrainee):
            report.probes += choose_config(trainee, stream, args, choices, min(batch_sizes), budget)
        if len(batch_sizes) > 1:
            report.probes += sweep(trainee, stream, batch_sizes, args, budget, report.probes)
        fitting = [m for m in report.probes if m.ok and _same_config(m, trainee)]
        order = sorted(fitting, key=lambda m: -m.samples_per_s)
        candidates = [m.batch_size for m in order] or [min(batch_sizes)]
        for size in dict.fromkeys(candidates):  # best first; fall back if the long run fails
            final = measure(trainee, stream, size, args.warmup, args.steps, budget_bytes=budget)
            report.final = final
            if final.ok:
                break
        final = report.final
        if args.gen_batches > 0 and not is_sliced(row) and row not in BEST_ROWS:
            sizes_args = (stream, args.gen_batch_size, args.gen_batches, args.gen_tokens)
            dynamic, tokens = measure_generation(trainee, *sizes_args)
            report.generation.append(dynamic)
            if isinstance(trainee, LitTrainee):
                others = [c.strip() for c in args.gen_caches.split(",")]
                for cache in [c for c in others if c not in ("", "dynamic")]:
                    other, _ = measure_generation(trainee, *sizes_args, cache, tokens)
                    report.generation.append(other)
        # last: the profiler slows what runs after it in the process
        profiled = args.profile_rows is None or row in args.profile_rows.split(",")
        cuda = device.type == "cuda"
        if args.profile_steps > 0 and profiled and cuda and final is not None and final.ok:
            report.profile = profile_training(trainee, stream, final, args.profile_steps)
        if args.gen_profile and profiled and cuda and isinstance(trainee, LitTrainee):
            captions = profile_generation(
                trainee, stream, args.gen_batch_size, args.gen_tokens, args.gen_profile
            )
            texts = [report.profile, captions]
            report.profile = "\n\n".join(t for t in texts if t)
    except Exception as error:  # building the row failed: report it, go on with the others
        report.final = placeholder_row(row, decoder, failure_status(error))
    finally:
        if trainee is not None:
            trainee.close()
        del trainee
        free_memory(device)
        torch.compiler.reset()
    report.seconds = time.perf_counter() - start
    return report
