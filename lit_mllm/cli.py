"""`lit-mllm`: LightningCLI over MLLMModule and MLLMDataModule (fit / validate / test / predict)."""

from __future__ import annotations

import torch
from lightning.pytorch.cli import LightningCLI

from lit_mllm.data.datamodule import MLLMDataModule
from lit_mllm.module import MLLMModule


class MLLMCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # the model owns the tokenizer and the chat settings; the data side follows it
        parser.link_arguments("model.tokenizer", "data.tokenizer")
        parser.link_arguments("model.chat_template_kwargs", "data.chat_template_kwargs")


def main(args: list[str] | None = None) -> None:
    MLLMCLI(
        MLLMModule,
        MLLMDataModule,
        save_config_kwargs={"overwrite": True},
        args=args,
    )
    # a gloo/NCCL group left alive aborts the interpreter at exit ("terminate called ...")
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
