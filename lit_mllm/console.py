"""What both LightningCLI console scripts (`lit-mllm`, `lit-mllm-clip`) do around the parser:
refuse a precision Lightning would silently replace, train in float32 where bf16 would be
emulated, report user errors as one line, and leave no process group behind."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from jsonargparse import Namespace
from lightning.fabric.utilities.exceptions import MisconfigurationException

from lit_mllm.errors import UsageError, run_reporting_errors
from lit_mllm.precision import fall_back_from_slow_bf16, runs_on_cpu


def add_precision_arguments(parser: Any) -> None:
    parser.add_argument(
        "--cpu_bf16_fallback",
        type=bool,
        default=True,
        help="train in 32-true instead of a bf16 precision on a CPU without native bf16 "
        "(measured at start-up: emulated bf16 can be ~80x slower than float32)",
    )


def check_precision(config: Namespace) -> None:
    """A run's precision, checked (fp16 on a CPU) and adjusted (emulated bf16) before the
    Trainer is built; ``config`` is the subcommand's section (or the whole config)."""
    trainer = config.get("trainer")
    refuse_fp16_on_cpu(trainer)
    fall_back_from_slow_bf16(trainer, enabled=config.get("cpu_bf16_fallback", True) is not False)


def refuse_fp16_on_cpu(trainer: Namespace | None) -> None:
    """Lightning swaps ``16-mixed`` for ``bf16-mixed`` on a CPU with only a warning: a run that
    asked for fp16 and a grad scaler would train in another precision without saying so."""
    if trainer is None or str(trainer.get("precision")) not in ("16-mixed", "16"):
        return
    if runs_on_cpu(trainer):
        raise UsageError(
            f"trainer.precision {trainer.get('precision')} (fp16 autocast + grad scaler) needs a "
            "CUDA GPU; this run would train on the CPU, where Lightning replaces it with "
            "bf16-mixed. Pass --trainer.precision bf16-mixed (or 32-true) for a CPU run"
        )


def run_lightning_cli(prog: str, run: Callable[[], Any], *, debug: bool) -> int:
    """``run`` builds the CLI; user errors print as ``prog: error: ...`` (see ``errors.py``).

    Lightning's ``MisconfigurationException`` is a user error wherever it is raised (trainer
    flags that contradict each other, a callback that needs a logger the run turned off)."""

    def run_with_lightning_checks() -> Any:
        try:
            return run()
        except MisconfigurationException as error:
            raise UsageError(f"Lightning refused the configuration: {error}") from error

    try:
        return run_reporting_errors(prog, run_with_lightning_checks, debug=debug)
    finally:
        # a gloo/NCCL group left alive aborts the interpreter at exit ("terminate called ...")
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
