"""`lit-mllm-clip`: LightningCLI for pretraining the tiny encoder (fit / validate)."""

from __future__ import annotations

from lightning.pytorch.cli import LightningCLI

from lit_mllm.clip.data import CaptionPairDataModule
from lit_mllm.clip.module import ContrastivePretraining


class ClipCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # the encoder decides its preprocessing; the data side takes it from the built model
        parser.link_arguments(
            "model.image_data_config", "data.image_data_config", apply_on="instantiate"
        )
        parser.link_arguments("model.tokenizer", "data.tokenizer")
        parser.link_arguments(
            "model.fact_loss_weight", "data.cell_labels", compute_fn=lambda weight: weight > 0
        )


def main(args: list[str] | None = None) -> None:
    ClipCLI(
        ContrastivePretraining,
        CaptionPairDataModule,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


if __name__ == "__main__":
    main()
