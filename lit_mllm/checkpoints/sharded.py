"""Read sharded (FSDP, ``torch.distributed.checkpoint``) checkpoint folders without running code.

DCP's ``FileSystemReader`` unpickles ``.metadata`` with plain ``pickle.load``, and its
``DefaultLoadPlanner`` loads every non-tensor value (BYTE_IO items: optimizer ``param_groups``,
a module's extra state) with ``torch.load(weights_only=False)``: a crafted folder runs code on
load. Here ``.metadata`` is unpickled with an allow-list of the DCP metadata classes (and the
torch types they hold), and BYTE_IO values with ``weights_only=True``.

Lightning's FSDPStrategy writes such a folder as ``meta.pt`` (``torch.save`` of everything but
the weights and optimizer states) beside the DCP files of ``{"model": ..., "optimizer_0": ...}``.
:func:`check_sharded_folder` vets all of it before Lightning (which uses the unsafe readers)
touches the folder; :func:`load_sharded_weights` reads the weights through DCP's public
``load`` with the safe reader and planner.
"""

from __future__ import annotations

import io
import pickle
import warnings
from pathlib import Path, PurePath
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import (
    BytesStorageMetadata,
    CheckpointException,
    DefaultLoadPlanner,
    FileSystemReader,
    Metadata,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.metadata import StorageMeta

LIGHTNING_META = "meta.pt"
DCP_METADATA = ".metadata"
MODEL_KEY = "model"
_DCP = "torch.distributed.checkpoint"
_ALLOWED = {
    (f"{_DCP}.metadata", name)
    for name in (
        "Metadata",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "TensorProperties",
        "MetadataIndex",
        "StorageMeta",
        "_MEM_FORMAT_ENCODING",
    )
} | {
    (f"{_DCP}.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # looks up torch.strided & co by name, nothing else
    ("pathlib", "PosixPath"),  # StorageMeta.checkpoint_id
    ("pathlib", "PurePosixPath"),
    ("pathlib", "PureWindowsPath"),
}
_PATH_ALIASES = {"WindowsPath": "PureWindowsPath"}  # a path written on Windows, read elsewhere
_DTYPES = {name for name in dir(torch) if isinstance(getattr(torch, name), torch.dtype)}


class UnsafeCheckpointError(ValueError):
    """A checkpoint holds something that loading would execute or that lit-mllm never writes."""


class _MetadataUnpickler(pickle.Unpickler):
    """Resolves only the classes a DCP ``Metadata`` is made of; anything else is refused."""

    def find_class(self, module: str, name: str) -> Any:
        if module in ("pathlib._local", "pathlib"):  # Python 3.13 moved the classes
            module, name = "pathlib", _PATH_ALIASES.get(name, name)
        if (module, name) in _ALLOWED or (module == "torch" and name in _DTYPES):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it refers to {module}.{name}")


def read_dcp_metadata(path: str | Path) -> Metadata:
    """Unpickle a DCP ``.metadata`` file with the allow-list; check where it points."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError) as error:
        raise UnsafeCheckpointError(
            f"{str(path)!r} is not DCP checkpoint metadata that can be read safely ({error}); "
            "refusing the checkpoint folder: re-create it, or use one you wrote yourself"
        ) from None
    except (ValueError, TypeError, IndexError, KeyError) as error:
        raise UnsafeCheckpointError(f"{str(path)!r} is damaged ({error})") from None
    if not isinstance(metadata, Metadata):
        raise UnsafeCheckpointError(
            f"{str(path)!r} holds a {type(metadata).__name__}, not DCP checkpoint metadata"
        )
    for info in (metadata.storage_data or {}).values():
        relative = getattr(info, "relative_path", None)
        if (
            not isinstance(relative, str)
            or PurePath(relative).name != relative
            or relative
            in {
                "",
                ".",
                "..",
            }
        ):
            raise UnsafeCheckpointError(
                f"{str(path)!r} points at {relative!r}, outside its checkpoint folder"
            )
    return metadata


class SafeFileSystemReader(FileSystemReader):
    """``FileSystemReader`` whose metadata is read by :func:`read_dcp_metadata`."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        rank = kwargs.get("rank")
        name = DCP_METADATA if rank is None else f"__{rank}{DCP_METADATA}"
        metadata = read_dcp_metadata(Path(self.path) / name)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class WeightsOnlyLoadPlanner(DefaultLoadPlanner):
    """Loads BYTE_IO values with ``weights_only=True`` (the default planner does not).

    Use it with a flat state dict keyed by the metadata's names (``flatten_state_dict=False``).
    """

    def __init__(self) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        name = read_item.dest_index.fqn
        try:
            self.state_dict[name] = torch.load(value, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            raise UnsafeCheckpointError(
                f"the value {name!r} holds objects other than tensors and plain Python values "
                f"({str(error).splitlines()[0][:200]}); refusing the checkpoint folder"
            ) from None


class DamagedShardError(ValueError):
    """DCP could not read a shard (a short file, a bad record)."""


def _load(folder: Path, template: dict[str, Any]) -> dict[str, Any]:
    """``dcp.load`` in this process alone, with the safe reader and planner; DCP's wrapped
    per-rank exception becomes ours again."""
    if not template:
        return template
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(
                template,
                storage_reader=SafeFileSystemReader(folder),
                planner=WeightsOnlyLoadPlanner(),
                no_dist=True,
            )
    except CheckpointException as wrapped:
        errors = [failure[0] for failure in wrapped.failures.values()]
        unsafe = [e for e in errors if isinstance(e, UnsafeCheckpointError)]
        if unsafe:
            raise unsafe[0] from None
        first = errors[0] if errors else wrapped
        raise DamagedShardError(
            f"its shards cannot be read ({type(first).__name__}: {str(first)[:300]})"
        ) from None
    return template


def check_byte_values(folder: str | Path, metadata: Metadata) -> None:
    """Load every non-tensor value of the folder with ``weights_only=True`` (they are small);
    raises :class:`UnsafeCheckpointError` on the first that needs more."""
    template = {
        name: None
        for name, md in metadata.state_dict_metadata.items()
        if isinstance(md, BytesStorageMetadata)
    }
    _load(Path(folder), template)


def load_sharded_weights(folder: str | Path, metadata: Metadata) -> dict[str, Any]:
    """The model's full (unsharded) state dict from a Lightning FSDP folder, on the CPU."""
    planner_data = metadata.planner_data or {}
    template: dict[str, Any] = {}
    keys: dict[str, str] = {}
    for name, md in metadata.state_dict_metadata.items():
        path = planner_data.get(name)
        if isinstance(path, tuple) and len(path) == 2 and path[0] == MODEL_KEY:
            keys[name] = str(path[1])
        elif path is None and name.startswith(MODEL_KEY + "."):
            keys[name] = name[len(MODEL_KEY) + 1 :]
        else:
            continue
        if isinstance(md, TensorStorageMetadata):
            template[name] = torch.empty(tuple(md.size), dtype=md.properties.dtype)
        else:
            template[name] = None
    loaded = _load(Path(folder), template)
    return {keys[name]: value for name, value in loaded.items()}


def check_sharded_folder(folder: str | Path) -> Metadata:
    """Every pickle in the folder read safely: ``.metadata`` files and BYTE_IO values.

    (``meta.pt`` is a ``torch.save`` file: load it with ``weights_only=True``.)
    """
    folder = Path(folder)
    if not (folder / DCP_METADATA).is_file():
        raise FileNotFoundError(
            f"checkpoint folder {str(folder)!r} has no {DCP_METADATA}: its save did not finish"
        )
    for extra in sorted(folder.glob(f"__*{DCP_METADATA}")):  # per-rank metadata, if any
        read_dcp_metadata(extra)
    metadata = read_dcp_metadata(folder / DCP_METADATA)
    missing = sorted(
        {info.relative_path for info in metadata.storage_data.values()}
        - {p.name for p in folder.iterdir()}
    )
    if missing:
        raise FileNotFoundError(
            f"checkpoint folder {str(folder)!r} is incomplete: {', '.join(missing[:3])} missing"
        )
    check_byte_values(folder, metadata)
    return metadata
