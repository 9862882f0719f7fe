"""The command line: ``python -m benchmarks.train_throughput [options]`` (``--help`` lists them)."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Sequence

import torch

from benchmarks import train_throughput
from benchmarks.train_throughput.run import run
from benchmarks.train_throughput.sizes import (
    ALL_ROWS,
    DEFAULT_BATCH_SIZES,
    REAL,
    ROWS,
    TINY_BATCH_SIZES,
)

PROG = "python -m benchmarks.train_throughput"


def parse_batch_sizes(text: str | None, tiny: bool) -> dict[str, list[int]]:
    """``8,16,32`` for every row, or ``baseline=2,4;mlp=8,16;resampler=16,32`` per row."""
    sizes = {k: list(v) for k, v in (TINY_BATCH_SIZES if tiny else DEFAULT_BATCH_SIZES).items()}
    if not text:
        return sizes
    if "=" not in text:
        values = [int(v) for v in text.split(",") if v.strip()]
        return {row: list(values) for row in ALL_ROWS}
    for part in text.split(";"):
        if not part.strip():
            continue
        row, _, values = part.partition("=")
        row = row.strip()
        if row not in ALL_ROWS:
            raise ValueError(f"--batch-sizes: unknown row {row!r}; expected one of {ALL_ROWS}")
        sizes[row] = [int(v) for v in values.split(",") if v.strip()]
    return sizes


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def build_parser() -> argparse.ArgumentParser:
    summary = (train_throughput.__doc__ or "").split("\n\n")[0]
    p = argparse.ArgumentParser(prog=PROG, description=summary)
    p.add_argument("--decoders", default="0.5b,1.5b", help="comma list of 0.5b, 1.5b")
    p.add_argument(
        "--rows",
        default=",".join(ROWS),
        help="comma list of baseline,mlp,resampler (the default) and the sliced-image rows "
        "resampler-sliced,resampler-sliced-padded",
    )
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 20; tiny 2)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 10; tiny 1)")
    p.add_argument("--batch-sizes", default=None, help="'8,16,32' or 'baseline=2,4;mlp=8,16;...'")
    p.add_argument("--mem-budget-gb", type=float, default=None, help="default: the whole GPU")
    p.add_argument("--probe-steps", type=int, default=None, help="timed steps per probe (3)")
    p.add_argument("--probe-warmup", type=int, default=None, help="warm-up steps per probe (2)")
    p.add_argument(
        "--lit-attn",
        default="auto",
        choices=["auto", "sdpa", "varlen", "varlen-fa4"],
        help="lit rows' attention (varlen-fa4: attn_implementation lit_varlen_fa4, "
        "FlashAttention-4; auto probes sdpa, varlen and, where it can run, varlen-fa4)",
    )
    p.add_argument(
        "--best-attn",
        default="auto",
        choices=["auto", "sdpa", "flex_attention", "flash_attention_4"],
        help="best-transformers rows' attention (auto: the fastest of sdpa, flex_attention and, "
        "where flash-attn-4 runs, transformers' flash_attention_4)",
    )
    p.add_argument(
        "--lit-layout",
        default="on",
        choices=["on", "off"],
        help="lit rows: the collator's TokenLayout (a forward without host syncs)",
    )
    p.add_argument("--compile", default="auto", choices=["auto", "on", "off"])
    p.add_argument(
        "--residual-dtype",
        default="float32",
        choices=["float32", "autocast"],
        help="lit rows: the decoder's residual stream dtype (model.residual_dtype)",
    )
    p.add_argument(
        "--mlp-kernel",
        default="transformers",
        choices=["transformers", "quack"],
        help="lit rows: model.decoder.mlp_kernel (quack: SwiGLU in the GEMM epilogues)",
    )
    p.add_argument(
        "--float8",
        default="none",
        choices=["none", "tensorwise", "rowwise"],
        help="lit and best-transformers rows: the decoder layers' linear layers in float8 "
        "(torchao; model.decoder.float8); the naive row stays bf16",
    )
    p.add_argument("--peak-tflops", type=float, default=None, help="override the device peak")
    p.add_argument("--gen-batch-size", type=int, default=None, help="captions per batch (32)")
    p.add_argument("--gen-batches", type=int, default=None, help="timed batches (3; 0 = skip)")
    p.add_argument("--gen-tokens", type=int, default=32)
    p.add_argument(
        "--gen-caches",
        default="dynamic,static,cuda_graph",
        help="lit rows, comma list of model.generation.cache values (dynamic always runs "
        "first: the others' token agreement is measured against it); cuda_graph_eager: "
        "cuda_graph with compile_step false",
    )
    p.add_argument("--loader-workers", default=None, help="comma list (default: min(8, cores))")
    p.add_argument("--loader-batch-size", type=int, default=None)
    p.add_argument("--loader-batches", type=int, default=None, help="timed batches (0 = skip)")
    p.add_argument("--loader-image-size", type=int, default=None, help="JPEG side (512)")
    p.add_argument("--loader-dir", default=None, help="where to write the JPEG set (temp dir)")
    p.add_argument(
        "--time-limit-s",
        type=float,
        default=None,
        help="skip rows that would end after this many seconds (GPU default 540; 0 = none)",
    )
    p.add_argument(
        "--profile-steps",
        type=int,
        default=0,
        help="after each row's final run, profile this many steps (CUDA; 0 = off)",
    )
    p.add_argument(
        "--gen-profile",
        default=None,
        help="lit rows (those of --profile-rows): profile one caption batch with this "
        "model.generation.cache value (CUDA)",
    )
    p.add_argument(
        "--profile-rows",
        default=None,
        help="comma list: profile only these rows (default: all); the profiler slows the rows "
        "measured after it in the same process, so put these rows last",
    )
    p.add_argument(
        "--text-tokens",
        default=None,
        help="text length distribution as MIN,MEDIAN,MAX (default 64,200,1024; tiny 8,20,64), "
        "e.g. 20,34,71 to match the synthetic captions of `lit-mllm fit`",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="micro sizes, CPU-friendly smoke run")
    p.add_argument("--out", default=None, help="write the markdown here (and a .json beside)")
    return p


def resolve_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse and check the options; fill the defaults that depend on --tiny."""
    args = build_parser().parse_args(argv)
    tiny = args.tiny
    defaults = {
        "steps": 2 if tiny else 20,
        "warmup": 1 if tiny else 10,
        "probe_steps": 1 if tiny else 3,
        "probe_warmup": 1 if tiny else 2,
        "gen_batch_size": 2 if tiny else 32,
        "gen_batches": 1 if tiny else 3,
        "loader_batch_size": 4 if tiny else 32,
        "loader_batches": 2 if tiny else 20,
        "loader_image_size": 64 if tiny else 512,
        "time_limit_s": 0 if tiny else 540,
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.loader_workers is None:
        args.loader_workers = "0" if tiny else str(min(8, os.cpu_count() or 1))
    args.loader_workers = [int(w) for w in _csv(args.loader_workers)]
    args.decoders = _csv(args.decoders)
    args.rows = _csv(args.rows)
    for row in args.rows:
        if row not in ALL_ROWS:
            raise ValueError(f"--rows: unknown row {row!r}; expected some of {ALL_ROWS}")
    for dec in args.decoders:
        if dec not in REAL.decoders:
            raise ValueError(f"--decoders: unknown decoder {dec!r}; expected {list(REAL.decoders)}")
    args.batch_sizes = parse_batch_sizes(args.batch_sizes, tiny)
    if args.text_tokens:
        lengths = tuple(int(v) for v in _csv(args.text_tokens))
        if len(lengths) != 3 or not 0 < lengths[0] <= lengths[1] <= lengths[2]:
            raise ValueError(
                f"--text-tokens: need MIN,MEDIAN,MAX with 0 < MIN <= MEDIAN <= MAX, got {args.text_tokens}"
            )
        args.text_tokens = lengths
    if args.steps < 1 or args.probe_steps < 1:
        raise ValueError("--steps and --probe-steps must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> str:
    """Run the benchmark; return the markdown report (also printed and written to --out)."""
    args = resolve_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.tiny:
        raise SystemExit(
            "No CUDA device: the real sizes need a GPU. Use --tiny for a CPU smoke run."
        )
    given = list(sys.argv[1:] if argv is None else argv)
    command = " ".join(shlex.quote(a) for a in [*PROG.split(), *given])
    threads = torch.get_num_threads()
    if not cuda:  # micro models gain nothing from threads, and lose a lot on a busy machine
        torch.set_num_threads(1)
    try:
        return run(args, cuda, command)
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    main()
