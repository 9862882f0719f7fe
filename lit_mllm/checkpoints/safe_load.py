"""Every checkpoint lit-mllm reads comes through here: local only, checksums first, no code run.

A checkpoint is a ``.ckpt`` file (``torch.save`` zip archive) or a sharded FSDP folder. Before
any of it is unpickled: a URL is refused (download it first), the file's CRC32s (or the folder's
checksum manifest) must match, pickles are read with ``weights_only=True`` (folders: the
allow-listed reader of :mod:`lit_mllm.checkpoints.sharded`). Each failure is one
:class:`CheckpointError` that names the file and the newest checkpoint next to it that is intact.
"""

from __future__ import annotations

import logging
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
from fsspec.utils import get_protocol

from lit_mllm.checkpoints.integrity import (
    MANIFEST,
    checkpoint_problem,
    has_manifest,
    is_sharded_folder,
    last_good_checkpoint,
)
from lit_mllm.checkpoints.sharded import (
    DCP_METADATA,
    LIGHTNING_META,
    DamagedShardError,
    UnsafeCheckpointError,
    check_sharded_folder,
    load_sharded_weights,
    read_dcp_metadata,
)

log = logging.getLogger(__name__)

WHAT_IS_A_CHECKPOINT = (
    "a checkpoint is a .ckpt file written by `lit-mllm fit`, or a sharded (FSDP) checkpoint "
    f"folder holding {LIGHTNING_META} and .metadata"
)
SPECIAL_CKPT_PATHS = ("last", "best", "hpc")  # Lightning resolves these names itself


class CheckpointError(ValueError):
    """A checkpoint cannot be used; the message names it and says what to do instead."""


def is_remote(path: str | Path) -> bool:
    return "://" in str(path) and get_protocol(str(path)) not in ("file", "local")


def refuse_remote(path: str | Path) -> None:
    """Lightning loads URLs with ``weights_only=False``; lit-mllm loads local files only."""
    if is_remote(path):
        raise CheckpointError(
            f"checkpoint {str(path)!r} is a URL; lit-mllm loads only local checkpoints "
            "(a remote one would be unpickled before anything could check it): download it "
            "first, e.g. `curl -fLo model.ckpt URL`, and pass the local path"
        )


def refuse_remote_code(hparams: dict[str, Any], source: str, *, allowed: bool, how: str) -> None:
    """A checkpoint's hyper-parameters rebuild the model: ``decoder.trust_remote_code: true``
    in them would run the Python code that comes with the decoder named there."""
    decoder = hparams.get("decoder") if isinstance(hparams, dict) else None
    if isinstance(decoder, dict) and decoder.get("trust_remote_code") is True and not allowed:
        raise UnsafeCheckpointError(
            f"{source} sets model.decoder.trust_remote_code: true, which runs the Python code of "
            f"decoder {decoder.get('name_or_path')!r} when the model is built; {how} if you "
            "trust that code"
        )


def _neighbours(path: Path) -> list[str]:
    if not path.parent.is_dir():
        return []
    return sorted(
        p.name
        for p in path.parent.iterdir()
        if p != path
        and (p.suffix == ".ckpt" or is_sharded_folder(p))
        and not p.name.startswith(".")
    )


def broken(path: str | Path, what: str) -> CheckpointError:
    """The error for a damaged checkpoint: what is wrong, and the last good one to use."""
    path = Path(path)
    good = last_good_checkpoint(path)
    if good is not None:
        hint = f"resume from {str(good)!r}, the newest intact checkpoint next to it"
    elif _neighbours(path):
        hint = (
            f"no other checkpoint next to it passes its checksums ({', '.join(_neighbours(path))})"
            "; start the run again without --ckpt_path"
        )
    else:
        hint = "start the run again without --ckpt_path"
    return CheckpointError(f"checkpoint {str(path)!r} {what}; delete it and {hint}")


def _missing(path: Path) -> FileNotFoundError:
    others = _neighbours(path)
    where = f"; checkpoints next to it: {', '.join(others)}" if others else ""
    return FileNotFoundError(f"checkpoint {str(path)!r} not found{where}")


def _not_a_checkpoint_folder(path: Path) -> CheckpointError:
    inside = sorted(
        {p.name for p in path.glob("*.ckpt")}
        | {p.name for p in path.iterdir() if is_sharded_folder(p)}
    )
    where = f"; checkpoints in it: {', '.join(inside)}" if inside else ""
    return CheckpointError(
        f"{str(path)!r} is a folder but not a checkpoint ({WHAT_IS_A_CHECKPOINT}){where}"
    )


def _refused_pickle(path: Path, error: Exception) -> UnsafeCheckpointError:
    """torch's weights_only refusal, without its advice to load with weights_only=False."""
    text = str(error)
    found = re.search(r"GLOBAL ([\w.]+)", text) or re.search(r"(Unsupported operand \S+)", text)
    reason = f"it refers to {found.group(1)}" if found else "it holds unsupported pickle data"
    return UnsafeCheckpointError(
        f"checkpoint {str(path)!r} holds objects other than tensors and plain Python values "
        f"({reason}); lit-mllm never writes such objects and does not load them: the file was "
        "not written by lit-mllm or was tampered with, so use a checkpoint you trust"
    )


def load_checkpoint_file(
    path: str | Path,
    *,
    map_location: Any = "cpu",
    require_state_dict: bool = True,
    mmap: bool = False,
) -> dict[str, Any]:
    """``torch.load(weights_only=True)`` of a ``.ckpt`` file whose checksums passed; every way
    it can fail is one clear error naming the file."""
    refuse_remote(path)
    path = Path(path)
    if path.is_dir():
        if is_sharded_folder(path):
            raise CheckpointError(
                f"{str(path)!r} is a sharded (FSDP) checkpoint folder, not a file: resume it with "
                "the FSDP strategy, or read it with lit_mllm.checkpoints.safe_load.read_checkpoint"
            )
        raise _not_a_checkpoint_folder(path)
    if not path.is_file():
        raise _missing(path)
    problem = checkpoint_problem(path)
    if problem is not None:
        raise broken(path, problem)
    try:
        try:
            checkpoint = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
        except RuntimeError:
            if not mmap:
                raise
            # archives from torch < 2.1 lack the alignment mmap needs: read them whole
            checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        raise _refused_pickle(path, error) from None
    except (RuntimeError, EOFError, ValueError, OSError, KeyError, zipfile.BadZipFile) as error:
        first = str(error).splitlines()[0][:200] if str(error) else ""
        raise broken(path, f"cannot be read ({type(error).__name__}: {first})") from None
    if require_state_dict and (not isinstance(checkpoint, dict) or "state_dict" not in checkpoint):
        raise broken(path, "is not a Lightning checkpoint (no 'state_dict' in it)")
    return checkpoint


def check_folder(path: str | Path, *, verify_checksums: bool = True) -> dict[str, Any]:
    """Vet a sharded folder (checksums, every pickle in it) and return its ``meta.pt``."""
    path = Path(path)
    if verify_checksums:
        if has_manifest(path):
            problem = checkpoint_problem(path)
            if problem is not None:
                raise broken(path, problem)
        else:
            log.warning(
                "checkpoint folder %s has no %s (not written by lit-mllm's "
                "AtomicModelCheckpoint): its shards cannot be checked for damage",
                path,
                MANIFEST,
            )
    try:
        check_sharded_folder(path)
    except UnsafeCheckpointError as error:
        message = str(error)
        if str(path) not in message:
            message = f"checkpoint folder {str(path)!r}: {message}"
        raise UnsafeCheckpointError(message) from None
    except DamagedShardError as error:
        raise broken(path, str(error)) from None
    return load_checkpoint_file(path / LIGHTNING_META, require_state_dict=False)


def check_checkpoint_path(path: str | Path, *, verify_checksums: bool = True) -> dict[str, Any]:
    """What the CLI runs on ``--ckpt_path`` before Lightning reads it: the checkpoint's contents
    without its tensors (memory-mapped), so ``hyper_parameters`` can be compared.

    ``verify_checksums=False`` skips a folder's manifest (only one process per machine needs to
    read every shard); a file's CRCs are checked in every process that loads it.
    """
    refuse_remote(path)
    path = Path(path)
    if path.is_dir():
        if not is_sharded_folder(path):
            raise _not_a_checkpoint_folder(path)
        return check_folder(path, verify_checksums=verify_checksums)
    return load_checkpoint_file(path, mmap=True)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """A whole checkpoint on the CPU, ``state_dict`` included: a ``.ckpt`` file or the folder
    of a sharded (FSDP) checkpoint, whose weights are gathered into one state dict."""
    refuse_remote(path)
    path = Path(path)
    if not path.is_dir():
        return load_checkpoint_file(path)
    checkpoint = check_checkpoint_path(path)
    try:
        weights = load_sharded_weights(path, read_dcp_metadata(path / DCP_METADATA))
    except DamagedShardError as error:
        raise broken(path, str(error)) from None
    checkpoint["state_dict"] = weights
    return checkpoint
