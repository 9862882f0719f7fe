"""Variants of the tiny recipe over several seeds, in parallel: ``lit-mllm fit`` per (variant,
seed), one table of the caption reports (CIDEr ratio, fact accuracy, wall time, averages).

Why: one CPU run of the recipe takes minutes and its fact accuracy moves a few points with the
seed, so comparing recipe changes needs several seeds each; on a GPU host many small runs share
the card and the cores. The recipe's acceptance numbers still come from `make demo` on the CPU.

    python -m benchmarks.tiny_sweep --seeds 0,1,2 --parallel 6 --out sweep.md \\
        --variant base= --variant grouped="--data.length_grouping 8" \\
        -- --trainer.accelerator gpu --model.compile_blocks off
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

FACTS = ("colour", "size", "place", "kind")


def parse_variant(text: str) -> tuple[str, list[str]]:
    name, sep, flags = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"--variant wants NAME=FLAGS, got {text!r}")
    return name, shlex.split(flags)


def run_one(
    name: str, flags: list[str], seed: int, common: list[str], root: Path, config: str
) -> dict:
    """One fit; its caption report (or the tail of its log when it failed)."""
    out = root / f"{name}-s{seed}"
    out.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        "-m",
        "lit_mllm.cli",
        "fit",
        "--config",
        config,
        "--seed_everything",
        str(seed),
        "--trainer.default_root_dir",
        str(out),
        "--trainer.logger.init_args.save_dir",
        str(out),
        "--trainer.enable_progress_bar",
        "false",
        *common,
        *flags,
    ]
    start, start_wall = time.perf_counter(), time.time()
    with open(out / "log.txt", "w") as log:
        code = subprocess.call(command, stdout=log, stderr=subprocess.STDOUT)
    row = {"variant": name, "seed": seed, "wall_s": time.perf_counter() - start, "rc": code}
    # this run's report: the newest (a rerun into the same root adds version_N folders, which
    # do not sort by name past version_9)
    reports = sorted(out.rglob("caption_report.json"), key=lambda path: path.stat().st_mtime)
    if code != 0 or not reports or reports[-1].stat().st_mtime < start_wall:
        row["error"] = (out / "log.txt").read_text()[-2000:]
        return row
    report = json.loads(reports[-1].read_text())
    cider = next(m for m in report["metrics"] if m["metric"] == "CIDEr")
    row.update({"cider_ratio": cider["ratio"], "loss": report["loss"], **report["facts"]})
    return row


def table(rows: list[dict]) -> str:
    lines = [
        "| variant | seed | wall s | CIDEr / ref | colour | size | place | kind | val loss |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in dict.fromkeys(r["variant"] for r in rows):
        done = [r for r in rows if r["variant"] == name and "error" not in r]
        for r in sorted(done, key=lambda r: r["seed"]):
            facts = " | ".join(f"{100 * r[f]:.1f}" for f in FACTS)
            lines.append(
                f"| {name} | {r['seed']} | {r['wall_s']:.0f} | {r['cider_ratio']:.3f} | "
                f"{facts} | {r['loss']:.4f} |"
            )
        if len(done) > 1:
            mean = {k: statistics.mean(r[k] for r in done) for k in (*FACTS, "cider_ratio")}
            low = min(r["kind"] for r in done)
            facts = " | ".join(f"{100 * mean[f]:.1f}" for f in FACTS)
            lines.append(
                f"| **{name} mean of {len(done)}** (kind min {100 * low:.1f}) | | | "
                f"{mean['cider_ratio']:.3f} | {facts} | |"
            )
        for r in rows:
            if r["variant"] == name and "error" in r:
                lines.append(f"| {name} | {r['seed']} | failed (rc {r['rc']}) | | | | | | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    common: list[str] = []
    if "--" in argv:  # flags after `--` go to every run
        split = argv.index("--")
        argv, common = argv[:split], argv[split + 1 :]
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variant", type=parse_variant, action="append", required=True)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--parallel", type=int, default=1)
    p.add_argument("--config", default="configs/tiny.yaml")
    p.add_argument("--root", default="runs/sweep")
    p.add_argument("--out", default=None, help="markdown table (and a .json beside)")
    args = p.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    jobs = [(name, flags, seed) for name, flags in args.variant for seed in seeds]
    root = Path(args.root)
    rows: list[dict] = []
    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        futures = [
            pool.submit(run_one, name, flags, seed, common, root, args.config)
            for name, flags, seed in jobs
        ]
        for future in futures:
            rows.append(future.result())
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "error"}), flush=True)
            if args.out:  # partial results survive a time limit
                Path(args.out).write_text(table(rows) + "\n")
                Path(args.out).with_suffix(".json").write_text(json.dumps(rows, indent=1))
    print(table(rows))
    for r in rows:
        if "error" in r:
            print(f"--- {r['variant']} seed {r['seed']} failed:\n{r['error']}", file=sys.stderr)
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
