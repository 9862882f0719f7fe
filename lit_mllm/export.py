"""`lit-mllm-export`: a training checkpoint -> a folder other tools (or lit-mllm) load directly.

Two formats (the format logic is in :mod:`lit_mllm.checkpoints.native` and
:mod:`lit_mllm.checkpoints.llava`; this file joins it to :class:`MLLMModule`):

* ``native`` (any connector): ``config.json``, ``model.safetensors`` (every weight, frozen ones
  included unless asked otherwise) and the tokenizer files. :func:`load_pretrained` rebuilds
  the module from the folder alone.
* ``llava`` (MLP connector over a CLIP-style timm ViT): a transformers
  ``LlavaForConditionalGeneration`` folder with a ``LlavaProcessor``, usable without lit-mllm.

Training checkpoints only hold trainable weights, so the frozen parts are rebuilt from the
sources named in the checkpoint's hyper-parameters (they must be available where this runs).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from lit_mllm.checkpoints.frozen import trainable_names
from lit_mllm.checkpoints.llava import to_llava
from lit_mllm.checkpoints.native import (
    DTYPES,
    DType,
    load_native_weights,
    read_native,
    write_native,
)
from lit_mllm.checkpoints.safe_load import read_checkpoint, refuse_remote_code
from lit_mllm.errors import add_debug_flag, run_reporting_errors
from lit_mllm.module import MLLMModule

__all__ = ["load_checkpoint", "save_pretrained", "load_pretrained", "main"]


def load_checkpoint(path: str | Path, *, trust_remote_code: bool = False) -> MLLMModule:
    """Rebuild the module a training checkpoint was written for and load its weights.

    ``path``: a ``.ckpt`` file or a sharded (FSDP) checkpoint folder, read by
    :func:`lit_mllm.checkpoints.safe_load.read_checkpoint` (checksums first, nothing unpickled
    unsafely). ``trust_remote_code``: allow a checkpoint whose decoder setting runs remote code.
    """
    checkpoint = read_checkpoint(path)
    if "hyper_parameters" not in checkpoint or "state_dict" not in checkpoint:
        raise ValueError(
            f"{str(path)!r} is not a lit-mllm training checkpoint (needs 'hyper_parameters' "
            "and 'state_dict')"
        )
    hparams = dict(checkpoint["hyper_parameters"])
    refuse_remote_code(
        hparams,
        f"checkpoint {str(path)!r}",
        allowed=trust_remote_code,
        how="pass --trust-remote-code (trust_remote_code=True)",
    )
    hparams["init_from"] = None  # the checkpoint itself holds the trained weights
    module = MLLMModule(**hparams)
    module.on_load_checkpoint(checkpoint)  # raises when trainable weights are missing
    result = module.load_state_dict(checkpoint["state_dict"], strict=False)
    if result.unexpected_keys:
        raise ValueError(
            f"checkpoint {str(path)!r} holds weights this model lacks, e.g. "
            f"{result.unexpected_keys[:3]}: its hyper-parameters do not match its weights"
        )
    return module.eval()


def save_pretrained(
    module: MLLMModule,
    out_dir: str | Path,
    *,
    include_frozen: bool = True,
    dtype: DType | None = None,
) -> Path:
    """Write the module as a native folder (:func:`lit_mllm.checkpoints.native.write_native`).

    ``include_frozen=False`` leaves out the frozen encoder/decoder weights; loading then rebuilds
    them from the sources in the config (refused when those are random-init).
    """
    decoder = module.model.decoder
    base = decoder.get_base_model() if hasattr(decoder, "get_base_model") else decoder
    return write_native(
        out_dir,
        module.state_dict(),
        trainable=trainable_names(module),
        hyper_parameters=module.hparams,
        decoder_config=base.config.to_dict(),
        tokenizer=module.tokenizer,
        num_image_tokens=module.num_image_tokens,
        include_frozen=include_frozen,
        dtype=dtype,
    )


def load_pretrained(
    directory: str | Path,
    map_location: str | torch.device = "cpu",
    *,
    trust_remote_code: bool = False,
) -> MLLMModule:
    """Rebuild an :class:`MLLMModule` from a folder written by :func:`save_pretrained`.

    ``trust_remote_code``: allow a folder whose decoder setting runs remote code.
    """
    folder = read_native(directory, map_location, trust_remote_code=trust_remote_code)
    module = MLLMModule(**folder.hyper_parameters)
    load_native_weights(module, folder)
    return module.to(map_location).eval()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="lit-mllm-export",
        description="Export a lit-mllm training checkpoint to a native or transformers LLaVA folder.",
    )
    parser.add_argument("--ckpt", required=True, help="Lightning .ckpt file or sharded folder")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--format", choices=("native", "llava"), default="native")
    parser.add_argument(
        "--trainable-only",
        action="store_true",
        help="native: leave frozen pretrained weights out (rebuilt from their sources on load)",
    )
    parser.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="cast weights")
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow a checkpoint whose decoder setting runs the decoder's own Python code",
    )
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    if args.format == "llava" and args.trainable_only:
        parser.error("--trainable-only applies to --format native only")

    def export() -> None:
        module = load_checkpoint(args.ckpt, trust_remote_code=args.trust_remote_code)
        if args.format == "llava":
            out = to_llava(
                module.model,
                args.out,
                tokenizer=module.tokenizer,
                num_image_tokens=module.num_image_tokens,
                image_data_config=module.image_data_config,
                dtype=args.dtype,
            )
        else:
            out = save_pretrained(
                module, args.out, include_frozen=not args.trainable_only, dtype=args.dtype
            )
        print(f"wrote {args.format} export to {out}")

    return run_reporting_errors("lit-mllm-export", export, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
