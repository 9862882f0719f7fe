"""`lit-mllm`: LightningCLI over MLLMModule and MLLMDataModule (fit / validate / test / predict).

Before Lightning reads ``--ckpt_path`` (LightningCLI loads the file for its hyper-parameters even
before the Trainer exists), :meth:`MLLMCLI.parse_arguments` vets it with
:func:`lit_mllm.checkpoints.safe_load.check_checkpoint_path` and refuses model settings that
differ from the checkpoint's (:mod:`lit_mllm.checkpoints.resume_settings`). Errors print as one line; ``--debug`` or
``LIT_MLLM_DEBUG=1`` shows the traceback.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from jsonargparse import Namespace
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lit_mllm.checkpoints.resume_settings import model_defaults, model_differences
from lit_mllm.checkpoints.safe_load import (
    SPECIAL_CKPT_PATHS,
    check_checkpoint_path,
    refuse_remote_code,
)
from lit_mllm.config import preset_defaults
from lit_mllm.console import add_precision_arguments, check_precision, run_lightning_cli
from lit_mllm.data.datamodule import MLLMDataModule
from lit_mllm.errors import DEBUG_FLAG, DEBUG_HELP, UsageError, pop_debug_flag
from lit_mllm.module import MLLMModule


def _first_process_on_this_machine() -> bool:
    """Launchers give the other processes of a multi-GPU run a LOCAL_RANK > 0."""
    return int(os.environ.get("LOCAL_RANK", "0") or 0) == 0


class MLLMCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        add_precision_arguments(parser)
        # what the model decides and the data must agree with: taken from the built model
        for name in ("tokenizer_name", "num_image_tokens", "image_data_config"):
            target = "tokenizer" if name == "tokenizer_name" else name
            parser.link_arguments(f"model.{name}", f"data.{target}", apply_on="instantiate")
        parser.link_arguments(
            "model.tokens_per_view", "data.tokens_per_view", apply_on="instantiate"
        )
        parser.link_arguments("model.chat_template_kwargs", "data.chat_template_kwargs")
        # how images are cut is set with the data and the model is told (it stores it)
        parser.link_arguments("data.image_slicing", "model.image_slicing")

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        self._parse(parser, args)
        subcommand = self.config.get("subcommand")
        prefix = f"{subcommand}." if subcommand else ""
        preset = self.config.get(f"{prefix}model.preset")
        if preset is not None:  # the preset's settings become defaults: every field given in
            parser.set_defaults(preset_defaults(preset, f"{prefix}model."))  # YAML or on the
            self._parse(parser, args)  # command line still wins, one field at a time
        check_precision(self.config[subcommand] if subcommand else self.config)
        if subcommand:
            self._check_run_settings(subcommand, self.config[subcommand])

    def _parse(self, parser: LightningArgumentParser, args: Any) -> None:
        if isinstance(args, dict | Namespace):
            super().parse_arguments(parser, args)
        else:
            argv, _ = pop_debug_flag(sys.argv[1:] if args is None else args)
            self.config = parser.parse_args(argv)

    def _check_run_settings(self, subcommand: str, config: Namespace) -> None:
        """``weights_only=True`` for every load; a ``--ckpt_path`` checked before Lightning
        reads it, and refused when the model settings given here differ from its own."""
        if "weights_only" in config:
            if config["weights_only"] is False:
                raise UsageError(
                    "weights_only: false is not supported: lit-mllm loads checkpoints with "
                    "weights_only=True only (a checkpoint that needs more can run code)"
                )
            config["weights_only"] = True
        path = config.get("ckpt_path")
        if not path or (str(path) in SPECIAL_CKPT_PATHS and not os.path.exists(path)):
            return
        if str(path).startswith("registry:"):
            raise UsageError(
                f"--ckpt_path {path}: model registries are not supported; download the "
                "checkpoint and pass its local path"
            )
        checkpoint = check_checkpoint_path(path, verify_checksums=_first_process_on_this_machine())
        hparams = checkpoint.get("hyper_parameters") or {}
        given = config["model"].as_dict() if config.get("model") is not None else {}
        refuse_remote_code(
            hparams,
            f"checkpoint {str(path)!r}",
            allowed=(given.get("decoder") or {}).get("trust_remote_code") is True,
            how="pass --model.decoder.trust_remote_code true",
        )
        differences = model_differences(
            given, hparams, model_defaults(self.model_class or MLLMModule)
        )
        if differences:
            raise UsageError(
                f"{subcommand} --ckpt_path {path}: these model settings differ from the "
                f"checkpoint's, which its weights were trained with: {'; '.join(differences)}. "
                "Leave them out (the checkpoint's apply), or start a new run from its weights "
                "with --model.init_from"
            )


def main(args: list[str] | None = None) -> int:
    argv = sys.argv[1:] if args is None else args
    _, debug = pop_debug_flag(argv)

    def run() -> None:
        MLLMCLI(
            MLLMModule,
            MLLMDataModule,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"epilog": f"{DEBUG_FLAG}: {DEBUG_HELP}"},
            args=args,
        )

    return run_lightning_cli("lit-mllm", run, debug=debug)


if __name__ == "__main__":
    sys.exit(main())
