"""`lit-mllm-clip`: LightningCLI for pretraining the tiny encoder (fit / validate)."""

from __future__ import annotations

import sys

from lightning.pytorch.cli import LightningCLI

from lit_mllm.clip.data import CaptionPairDataModule
from lit_mllm.clip.module import ContrastivePretraining
from lit_mllm.console import add_precision_arguments, check_precision, run_lightning_cli
from lit_mllm.errors import DEBUG_FLAG, DEBUG_HELP, pop_debug_flag


class ClipCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        add_precision_arguments(parser)
        # the encoder decides its preprocessing; the data side takes it from the built model
        parser.link_arguments(
            "model.image_data_config", "data.image_data_config", apply_on="instantiate"
        )
        parser.link_arguments("model.tokenizer", "data.tokenizer")
        parser.link_arguments(
            "model.fact_loss_weight", "data.cell_labels", compute_fn=lambda weight: weight > 0
        )

    def before_instantiate_classes(self) -> None:
        subcommand = self.config.get("subcommand")
        check_precision(self.config[subcommand] if subcommand else self.config)


def main(args: list[str] | None = None) -> int:
    argv = sys.argv[1:] if args is None else args
    argv, debug = pop_debug_flag(argv)

    def run() -> None:
        ClipCLI(
            ContrastivePretraining,
            CaptionPairDataModule,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"epilog": f"{DEBUG_FLAG}: {DEBUG_HELP}"},
            args=argv,
        )

    return run_lightning_cli("lit-mllm-clip", run, debug=debug)


if __name__ == "__main__":
    sys.exit(main())
