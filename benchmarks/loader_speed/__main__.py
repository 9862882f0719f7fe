"""The command line: caption and instruct batches, padded and packed, timed one after another."""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

from benchmarks import loader_speed
from lit_mllm.data.collate import padding_waste
from lit_mllm.data.datamodule import MLLMDataModule, SyntheticData
from lit_mllm.module import MLLMModule

PROG = "python -m benchmarks.loader_speed"


def main(argv: Sequence[str] | None = None) -> None:
    """Print samples/s and padding waste for every task and packing choice."""
    summary = (loader_speed.__doc__ or "").split("\n\n")[0]
    parser = argparse.ArgumentParser(prog=PROG, description=summary)
    parser.add_argument("--dir", default="data/synthetic")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=40)
    args = parser.parse_args(argv)
    model = MLLMModule(preset="tiny")
    for task in ("caption", "instruct"):
        for packing in (False, True):
            dm = MLLMDataModule(
                synthetic=SyntheticData(dir=args.dir, task=task),
                tokenizer=model.tokenizer_name,
                num_image_tokens=model.num_image_tokens,
                image_data_config=model.image_data_config,
                num_workers=args.workers,
                batch_size=args.batch_size,
                packing=packing,
            )
            dm.setup("fit")
            batches = iter(dm.train_dataloader())
            next(batches)  # worker start-up
            start = time.perf_counter()
            timed = [next(batches) for _ in range(args.batches)]
            seconds = time.perf_counter() - start
            samples = sum(b["batch_size"] for b in timed)
            print(
                f"{task:8s} packing={packing!s:5s} {samples / seconds:8.1f} samples/s  "
                f"padding waste {padding_waste(timed):5.2f} %"
            )


if __name__ == "__main__":
    main()
