"""The training step of a preset on the CPU, one row per batching / attention variant.

Why: the tiny recipe's wall time is ~640 of these steps, and what makes them cheaper (eager
against SDPA attention, packed rows against padded ones, float32 against bf16 autocast) is
measured here on the same loader batches, without the Trainer, the loader process or
validation around it. The first losses of every variant are printed too: the variants compute
the same model on the same batches, so they agree up to rounding.

    python -m benchmarks.cpu_step --data data/synthetic --steps 10 \\
        --variant padded:eager --variant packed:lit_varlen --precision 32-true
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from lit_mllm.data.datamodule import MLLMDataModule, SyntheticData
from lit_mllm.module import MLLMModule

WARMUP_STEPS = 2


def parse_variant(text: str) -> tuple[str, str]:
    batching, sep, attention = text.partition(":")
    if not sep or batching not in ("padded", "packed") or not attention:
        raise argparse.ArgumentTypeError(
            f"--variant wants padded|packed:ATTENTION (e.g. packed:lit_varlen), got {text!r}"
        )
    return batching, attention


def time_variant(
    batching: str, attention: str, args: argparse.Namespace
) -> dict[str, float | str | list[float]]:
    """Median seconds of a forward + backward + AdamW step over ``args.steps`` loader batches."""
    torch.manual_seed(args.seed)
    module = MLLMModule(preset=args.preset, decoder={"attn_implementation": attention})
    synthetic = SyntheticData(dir=args.data, num_train=args.num_train, image_size=args.image_size)
    data = MLLMDataModule(
        **module.data_settings(),
        synthetic=synthetic,
        batch_size=args.batch_size,
        num_workers=0,
        packing=batching == "packed",
        seed=args.seed,
    )
    data.prepare_data()  # writes the synthetic set when it is missing
    data.setup("fit")
    loader = iter(data.train_dataloader())
    batches = [next(loader) for _ in range(WARMUP_STEPS + args.steps)]
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-3)
    bf16 = args.precision == "bf16-mixed"
    seconds, losses = [], []
    for batch in batches:
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss, _ = module(batch)  # MLLMModule.forward: the batch's fields into the model
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - start)
        losses.append(float(loss))
    return {
        "variant": f"{batching}:{attention}",
        "step_s": statistics.median(seconds[WARMUP_STEPS:]),
        "mean_step_s": statistics.fmean(seconds[WARMUP_STEPS:]),
        "first_losses": [round(value, 4) for value in losses[:4]],
    }


def table(rows: list[dict], args: argparse.Namespace) -> str:
    lines = [
        f"preset {args.preset}, batch {args.batch_size}, {args.precision}, "
        f"{torch.get_num_threads()} threads, {args.steps} timed steps after {WARMUP_STEPS}",
        "",
        "| variant | median step (s) | mean step (s) | first losses |",
        "|---|---|---|---|",
    ]
    for row in rows:
        losses = ", ".join(f"{value:.4f}" for value in row["first_losses"])
        lines.append(
            f"| {row['variant']} | {row['step_s']:.3f} | {row['mean_step_s']:.3f} | {losses} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="data/synthetic", help="synthetic set (written if missing)")
    p.add_argument("--num-train", type=int, default=2000)
    p.add_argument("--image-size", type=int, default=72)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--precision", choices=["32-true", "bf16-mixed"], default="32-true")
    p.add_argument("--variant", type=parse_variant, action="append", default=None)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: cores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="markdown table (and a .json beside)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = args.variant or [("padded", "eager"), ("packed", "lit_varlen")]
    rows = [time_variant(batching, attention, args) for batching, attention in variants]
    text = table(rows, args)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
        Path(args.out).with_suffix(".json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
