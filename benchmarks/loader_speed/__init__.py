"""DataLoader throughput and padding waste of the tiny default on this machine's CPUs.

    python -m benchmarks.loader_speed --dir data/synthetic --workers 2 --batches 40

Uses the synthetic set written by `make demo` (or `lit-mllm-data synth --out DIR ...`).
"""
