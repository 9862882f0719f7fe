"""The command line of :mod:`benchmarks.stream_scale`."""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lit_mllm.data.datamodule import MLLMDataModule
from lit_mllm.data.streaming.shard import shard_synthetic
from lit_mllm.data.streaming.source import StreamSource
from lit_mllm.data.synthetic.settings import SyntheticSettings

CLIP_MEAN, CLIP_STD = (0.4815, 0.4578, 0.4082), (0.2686, 0.2613, 0.2758)


def memory_mib() -> dict[str, float]:
    """This process and its children (the loader's workers), summed, from /proc (Linux):
    ``rss`` as top shows it; ``anon``, its private heap part (what a leak grows); ``file``, the
    pages of files mapped in, which for LitData are the chunks being read (``mmap``: up to a
    few 64 MB chunks per worker, given back as reading moves on; the kernel may reclaim them)."""
    import psutil

    totals = {"rss_mib": 0.0, "anon_mib": 0.0, "file_mib": 0.0}
    keys = {"VmRSS": "rss_mib", "RssAnon": "anon_mib", "RssFile": "file_mib"}
    me = psutil.Process()
    for process in [me, *me.children(recursive=True)]:
        try:
            status = Path(f"/proc/{process.pid}/status").read_text()
        except FileNotFoundError:
            continue
        for line in status.splitlines():
            name, _, value = line.partition(":")
            if name in keys:
                totals[keys[name]] += int(value.split()[0]) / 1024  # kB
    return totals


def _loader(folder: str, size: int, workers: int, batch_size: int) -> Any:
    """The training loader a run would build for this stream (tiny tokenizer, the transform of
    a ``size`` px CLIP-style encoder)."""
    data_config = {
        "input_size": (3, size, size),
        "interpolation": "bicubic",
        "mean": CLIP_MEAN,
        "std": CLIP_STD,
        "crop_pct": 1.0,
    }
    datamodule = MLLMDataModule(
        tokenizer="tiny",
        num_image_tokens=64,
        image_data_config=data_config,
        train=StreamSource(folder),
        batch_size=batch_size,
        num_workers=workers,
        max_length=256,
    )
    datamodule.setup("fit")
    return datamodule.train_dataloader()


def shard(args: argparse.Namespace) -> dict[str, Any]:
    settings = SyntheticSettings(
        image_size=args.image_size,
        image_format=args.format,
        canvas=tuple(args.canvas) if args.canvas else None,
    )
    summary = shard_synthetic(settings, args.count, args.out, workers=args.workers,
                              overwrite=True)  # fmt: skip
    print(summary.line())
    return {
        "samples": summary.samples,
        "seconds": summary.seconds,
        "bytes_on_disk": summary.bytes_on_disk,
        "chunks": summary.chunks,
        "samples_per_s": summary.samples / summary.seconds,
        "image": f"{settings.canvas_size()[0]}x{settings.canvas_size()[1]} {args.format}",
        "workers": args.workers or os.cpu_count(),
    }


def read(args: argparse.Namespace) -> dict[str, Any]:
    loader = _loader(args.dir, args.size, args.workers, args.batch_size)
    checkpoints, rows, seen = sorted(args.checkpoints), [], 0
    start = time.perf_counter()
    while checkpoints:
        for batch in loader:  # epochs repeat until the last checkpoint
            seen += batch["batch_size"]
            if seen >= checkpoints[0]:
                row = {"samples": seen, **memory_mib(), "seconds": time.perf_counter() - start}
                print(f"{seen:>9,} samples  RSS {row['rss_mib']:7.1f} MiB (anonymous "
                      f"{row['anon_mib']:7.1f}, files {row['file_mib']:7.1f})  "
                      f"{row['seconds']:6.1f} s")  # fmt: skip
                rows.append(row)
                checkpoints.pop(0)
                if not checkpoints:
                    break
    return {"checkpoints": rows, "workers": args.workers, "size": args.size}


def speed(args: argparse.Namespace) -> dict[str, Any]:
    loader = _loader(args.dir, args.size, args.workers, args.batch_size)
    batches = iter(loader)
    next(batches)  # worker start-up and the first chunks: excluded
    seen, start = 0, time.perf_counter()
    for _ in range(args.batches):
        seen += next(batches)["batch_size"]
    seconds = time.perf_counter() - start
    rate = seen / seconds
    print(f"{seen} samples in {seconds:.1f} s: {rate:.1f} samples/s "
          f"({args.workers} workers, {args.size} px)")  # fmt: skip
    return {"samples": seen, "seconds": seconds, "samples_per_s": rate,
            "workers": args.workers, "size": args.size, "cpus": os.cpu_count()}  # fmt: skip


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.stream_scale")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("shard", help="synthetic samples straight into chunks")
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--canvas", type=int, nargs=2, default=None, metavar=("W", "H"))
    p.add_argument("--format", choices=["png", "jpg"], default="jpg")
    p.add_argument("--workers", type=int, default=None)
    for name, helptext in (("read", "loader memory over a long read"), ("speed", "loader speed")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--dir", required=True)
        p.add_argument("--size", type=int, default=64, help="encoder input side in px")
        p.add_argument("--workers", type=int, default=2)
        p.add_argument("--batch-size", type=int, default=64)
        if name == "read":
            p.add_argument(
                "--checkpoints", type=int, nargs="+", default=[10_000, 100_000, 1_000_000]
            )
        else:
            p.add_argument("--batches", type=int, default=50)
    p_out = parser.add_argument_group("output")
    p_out.add_argument("--json", default=None, help="write the result here too")
    args = parser.parse_args(argv)
    result = {"shard": shard, "read": read, "speed": speed}[args.command](args)
    result["command"] = args.command
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
