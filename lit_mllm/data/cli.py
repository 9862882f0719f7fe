"""``lit-mllm-data``: data-preparation commands (synthetic data set, tiny tokenizer, ...).

Each subcommand is registered by an ``add_<name>(subparsers)`` function that adds its parser and
sets ``handler`` (``args -> exit code``). Nothing here imports ``lit_mllm.metrics``: the synthetic
set's reference scores are printed by ``lit-mllm-score --reference``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import Field, fields
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

from lit_mllm.data.synthetic.settings import SyntheticSettings
from lit_mllm.errors import add_debug_flag, pop_debug_flag, run_reporting_errors

Subparsers = argparse._SubParsersAction


def _run_synth(args: argparse.Namespace) -> int:
    from lit_mllm.data.synthetic.writer import write_synthetic

    settings = SyntheticSettings(**{f.name: getattr(args, f.name) for f in _flag_fields()})
    summary = write_synthetic(settings, workers=args.workers)
    print(
        f"wrote {summary['images']} images {summary['counts']} to {summary['out_dir']} "
        f"in {summary['seconds']:.2f} s with {summary['workers']} worker(s)"
    )
    if settings.num_val > 1:
        val = Path(settings.dir) / "captions_val.json"
        print(
            "val leave-one-out reference scores: "
            f"lit-mllm-score --annotations {val} --reference --metrics BLEU ROUGE_L CIDEr"
        )
    print(f"manifest: {summary['manifest']}")
    return 0


def _flag_fields() -> list[Field[Any]]:
    return [f for f in fields(SyntheticSettings) if f.metadata["flag"]]


def _flag_type(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """``parse`` with its ValueError message shown by argparse as it is."""

    def read(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    return read


def add_synth(subparsers: Subparsers) -> None:
    """One flag per field of ``SyntheticSettings`` (its default, help and older spellings)."""
    p = subparsers.add_parser(
        "synth",
        help="generate the synthetic shape-captioning data set",
        description="Draw shape images with 5 reference captions each; write COCO and LLaVA JSON. "
        "The defaults are those of the DataModule's data.synthetic.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    types = get_type_hints(SyntheticSettings)
    for f in _flag_fields():
        flags = [f"--{f.name.replace('_', '-')}", *f.metadata["aliases"]]
        kind = types[f.name]
        options: dict[str, Any] = {"dest": f.name, "default": f.default, "help": f.metadata["help"]}
        if kind is bool:
            options["action"] = argparse.BooleanOptionalAction
        elif get_origin(kind) is Literal:
            options["choices"] = get_args(kind)
        elif f.metadata["parse"] is not None:  # a type argparse cannot call (--canvas 216x72)
            options["type"] = _flag_type(f.metadata["parse"])
            options["metavar"] = f.metadata["metavar"]
        else:
            options["type"] = kind
        p.add_argument(*flags, **options)
    p.add_argument("--workers", type=int, default=None, help="processes (None: all cores)")
    p.set_defaults(handler=_run_synth)


def _run_build_tokenizer(args: argparse.Namespace) -> int:
    from lit_mllm.data.tiny_tokenizer import build_tiny_tokenizer

    tok = build_tiny_tokenizer(args.out, vocab_size=args.vocab_size)
    print(f"saved tiny tokenizer ({len(tok)} tokens) to {args.out}")
    return 0


def add_build_tokenizer(subparsers: Subparsers) -> None:
    p = subparsers.add_parser(
        "build-tokenizer",
        help="train the tiny byte-level BPE tokenizer",
        description="Train the tiny tokenizer deterministically and save it in HF format.",
    )
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--vocab-size", type=int, default=1024, help="maximum vocabulary size")
    p.set_defaults(handler=_run_build_tokenizer)


def _run_shard(args: argparse.Namespace) -> int:
    from lit_mllm.data.streaming.shard import shard_source, shard_synthetic

    common = {"workers": args.workers, "chunk_bytes": args.chunk_bytes, "overwrite": args.overwrite}
    if args.source == "synthetic":
        for flag in ("file", "image_root", "split"):
            if getattr(args, flag) is not None:
                raise ValueError(f"--{flag.replace('_', '-')} is for file sources, not synthetic")
        settings = SyntheticSettings(seed=args.seed, image_size=args.image_size)
        summary = shard_synthetic(settings, args.count, args.out, **common)
    else:
        if args.file is None or args.image_root is None:
            raise ValueError(f"--source {args.source} needs --file and --image-root")
        summary = shard_source(
            args.source,
            args.file,
            args.image_root,
            args.out,
            split=args.split,
            one_sample_per_caption=args.one_sample_per_caption,
            on_bad_sample=args.on_bad_sample,
            **common,
        )
    print(summary.line())
    print(f"train on it: --data.train '{{kind: stream, dir: {summary.out}}}'")
    return 0


def add_shard(subparsers: Subparsers) -> None:
    p = subparsers.add_parser(
        "shard",
        help="write a corpus as LitData chunks for streaming",
        description="Check every record and image (the readers' checks; bad ones are an error, "
        "or skipped and counted with --on-bad-sample skip) and write the samples, with their "
        "image files as stored, as LitData chunks for data.train: {kind: stream, dir: OUT}.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--source", required=True, choices=["coco", "karpathy", "llava", "synthetic"])
    p.add_argument("--out", required=True, help="new or empty output folder")
    p.add_argument("--file", default=None, help="annotation file (coco, karpathy, llava)")
    p.add_argument("--image-root", default=None, help="folder the image paths are relative to")
    p.add_argument("--split", default=None, help="Karpathy split (train, restval, val, test)")
    p.add_argument(
        "--one-sample-per-caption",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="captions: one sample per caption (training); --no-...: one per image (evaluation)",
    )
    p.add_argument("--on-bad-sample", choices=["error", "skip"], default="error")
    p.add_argument("--count", type=int, default=10_000, help="synthetic: number of images")
    p.add_argument("--seed", type=int, default=0, help="synthetic: seed")
    p.add_argument("--image-size", type=int, default=64, help="synthetic: image side in px")
    p.add_argument("--chunk-bytes", default="64MB", help="LitData chunk size")
    p.add_argument("--workers", type=int, default=None, help="processes (None: all cores)")
    p.add_argument("--overwrite", action="store_true", help="replace shards in --out")
    p.set_defaults(handler=_run_shard)


BUILTIN_SUBCOMMANDS: tuple[Callable[[Subparsers], None], ...] = (
    add_synth,
    add_build_tokenizer,
    add_shard,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lit-mllm-data", description=__doc__.splitlines()[0])
    add_debug_flag(parser)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in BUILTIN_SUBCOMMANDS:
        add(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    # --debug is accepted before or after the subcommand
    argv, debug = pop_debug_flag(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    return run_reporting_errors(
        f"lit-mllm-data {args.command}",
        lambda: args.handler(args),
        debug=debug,
        ours_only=False,
        code=2,
    )


if __name__ == "__main__":
    sys.exit(main())
