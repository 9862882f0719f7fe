"""Checkpoints from elsewhere: damaged, foreign, crafted or remote ones are refused with one clear
message, before anything in them is unpickled unsafely; genuine ones (files and sharded FSDP
folders) still load. Crafted pickles here would create a marker file if they ever ran."""

from __future__ import annotations

import functools
import http.server
import os
import pickle
import shutil
import struct
import threading
import zipfile
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.distributed.checkpoint as dcp
from micro import MICRO_MODEL

from lit_mllm.checkpoints.integrity import MANIFEST, crc32_of, files_to_check, write_manifest
from lit_mllm.checkpoints.safe_load import (
    CheckpointError,
    check_checkpoint_path,
    load_checkpoint_file,
    read_checkpoint,
)
from lit_mllm.checkpoints.sharded import UnsafeCheckpointError
from lit_mllm.export import load_checkpoint, main
from lit_mllm.module import MLLMModule

GOOD, LAST = "epoch=0-step=1.ckpt", "last.ckpt"


class RunsCode:
    """Pickles as ``os.system("touch <marker>")``: whoever unpickles it runs a command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def micro_module() -> MLLMModule:
    torch.manual_seed(0)
    return MLLMModule(**MICRO_MODEL)


def write_checkpoint(module: MLLMModule, path: Path) -> None:
    trainer = L.Trainer(
        logger=False, enable_checkpointing=False, max_steps=0, accelerator="cpu", devices=1
    )
    trainer.strategy.connect(module)
    trainer.save_checkpoint(path)


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> tuple[MLLMModule, Path]:
    """A micro model and a folder with two genuine checkpoints of it (``last.ckpt`` newest)."""
    folder = tmp_path_factory.mktemp("written")
    module = micro_module()
    write_checkpoint(module, folder / GOOD)
    write_checkpoint(module, folder / LAST)
    return module, folder


@pytest.fixture
def run_dir(written, tmp_path) -> Path:
    shutil.copytree(written[1], tmp_path / "ckpt")
    os.utime(tmp_path / "ckpt" / GOOD, (1, 1))  # older than last.ckpt
    return tmp_path / "ckpt"


def flip_tensor_bytes(path: Path, count: int = 450) -> None:
    """XOR ``count`` bytes inside the largest tensor record of a torch.save zip archive."""
    with zipfile.ZipFile(path) as archive:
        info = max(
            (i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size
        )
    raw = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack(
        "<HH", raw[info.header_offset + 26 : info.header_offset + 30]
    )
    start = info.header_offset + 30 + name_len + extra_len
    for i in range(start, start + min(count, info.file_size)):
        raw[i] ^= 0x55
    path.write_bytes(bytes(raw))


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- item 5: damaged bytes ------------------------------------------------------------------------
def test_flipped_tensor_bytes_are_caught_and_the_last_good_checkpoint_named(run_dir) -> None:
    last = run_dir / LAST
    intact = load_checkpoint_file(last)["state_dict"]
    flip_tensor_bytes(last)
    # what happened before: the damage loads silently as other weights
    damaged = torch.load(last, map_location="cpu", weights_only=True)["state_dict"]
    assert not same_weights(intact, damaged)

    with pytest.raises(CheckpointError) as info:
        load_checkpoint_file(last)
    message = str(info.value)
    assert str(last) in message and "CRC32" in message
    assert str(run_dir / GOOD) in message  # the intact one to resume from
    assert same_weights(load_checkpoint_file(run_dir / GOOD)["state_dict"], intact)


def test_every_load_path_checks_the_checksums(run_dir, tmp_path, capsys) -> None:
    from lit_mllm.checkpoints.atomic import CheckedCheckpointIO

    last = run_dir / LAST
    flip_tensor_bytes(last)
    with pytest.raises(CheckpointError, match="CRC32"):
        CheckedCheckpointIO().load_checkpoint(last)  # fit / validate / test / predict
    with pytest.raises(CheckpointError, match="CRC32"):
        load_checkpoint(last)  # lit-mllm-export
    with pytest.raises(ValueError, match="init_from.*CRC32"):
        MLLMModule(**MICRO_MODEL, init_from=str(last))
    assert main(["--ckpt", str(last), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "CRC32" in err and GOOD in err and "Traceback" not in err


# -- items 12 and 13: files and folders that are not checkpoints ----------------------------------
def _bad_file(kind: str, good: Path, path: Path) -> None:
    if kind == "garbage":
        path.write_bytes(bytes(range(256)) * 8)
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("model:\n  tokenizer: tiny\n")
    elif kind == "truncated":
        path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    elif kind == "bare-pickle":
        path.write_bytes(pickle.dumps({"state_dict": {}}))


@pytest.mark.parametrize("kind", ["garbage", "empty", "text", "truncated", "bare-pickle"])
def test_export_of_a_file_that_is_not_a_checkpoint_says_so_in_one_line(
    run_dir, tmp_path, capsys, kind
) -> None:
    bad = run_dir / "bad.ckpt"
    _bad_file(kind, run_dir / GOOD, bad)
    assert main(["--ckpt", str(bad), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"lit-mllm-export: error: checkpoint {str(bad)!r}")
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "weights_only" not in err
    with pytest.raises(CheckpointError, match="delete it"):
        load_checkpoint_file(bad)


def test_a_checkpoint_with_code_in_it_is_refused_without_torchs_advice(run_dir, tmp_path) -> None:
    marker = tmp_path / "ran"
    evil = run_dir / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": RunsCode(marker)}, evil)
    for load in (load_checkpoint_file, load_checkpoint, check_checkpoint_path):
        with pytest.raises(UnsafeCheckpointError) as info:
            load(evil)
        message = str(info.value)
        assert "posix.system" in message or "nt.system" in message
        assert "weights_only=False" not in message and "Weights only load failed" not in message
    assert not marker.exists()


def test_a_folder_that_is_not_a_checkpoint_is_called_that(tmp_path) -> None:
    folder = tmp_path / "runs"
    folder.mkdir()
    (folder / "last.ckpt").write_bytes(b"")
    for load in (load_checkpoint_file, check_checkpoint_path, read_checkpoint):
        with pytest.raises(CheckpointError) as info:
            load(folder)
        message = str(info.value)
        assert "is a folder but not a checkpoint" in message and "a checkpoint is" in message
        assert "not found" not in message and "last.ckpt" in message


# -- item 2: URLs ----------------------------------------------------------------------------------
@pytest.fixture
def served(tmp_path):
    """An HTTP server on 127.0.0.1 serving ``tmp_path/www`` (a crafted checkpoint in it)."""
    www = tmp_path / "www"
    www.mkdir()
    marker = tmp_path / "ran"
    torch.save({"state_dict": {}, "x": RunsCode(marker)}, www / "evil.ckpt")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(www))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/evil.ckpt", marker
    server.shutdown()
    server.server_close()


def test_a_url_is_refused_with_how_to_download_it(served) -> None:
    from lit_mllm.checkpoints.atomic import CheckedCheckpointIO

    url, marker = served
    for load in (CheckedCheckpointIO().load_checkpoint, load_checkpoint, check_checkpoint_path):
        with pytest.raises(CheckpointError, match="download it"):
            load(url)
    assert not marker.exists()


# -- item 1: sharded (FSDP) folders ---------------------------------------------------------------
def write_sharded(checkpoint_file: Path, folder: Path, module: MLLMModule, **extra_optim) -> None:
    """Lightning FSDPStrategy's layout: DCP files of {"model", "optimizer_0"} + ``meta.pt``."""
    checkpoint = torch.load(checkpoint_file, map_location="cpu", weights_only=True)
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-3)
    optim_state = optimizer.state_dict()
    optim_state["param_groups"][0].update(extra_optim)
    state = {"model": checkpoint.pop("state_dict"), "optimizer_0": optim_state}
    dcp.save(state, checkpoint_id=folder, no_dist=True)
    torch.save(checkpoint, folder / "meta.pt")


def with_manifest(folder: Path) -> Path:
    write_manifest(folder, {name: crc32_of(folder / name) for name in files_to_check(folder)})
    return folder


@pytest.fixture
def sharded(written, tmp_path) -> tuple[MLLMModule, Path]:
    module, folder = written
    out = tmp_path / "ckpt" / "last.ckpt"
    out.parent.mkdir()
    write_sharded(folder / LAST, out, module)
    return module, out


def test_a_genuine_sharded_folder_loads(sharded, written) -> None:
    module, folder = sharded
    reloaded = load_checkpoint(folder)  # no manifest: loads, with a warning
    assert same_weights(module.state_dict(), reloaded.state_dict())
    with_manifest(folder)
    assert check_checkpoint_path(folder)["hyper_parameters"]["connector"]["kind"] == "resampler"
    saved = load_checkpoint_file(written[1] / LAST)["state_dict"]
    assert same_weights(read_checkpoint(folder)["state_dict"], saved)


def test_crafted_sharded_metadata_never_runs(sharded, tmp_path, capsys) -> None:
    _, folder = sharded
    marker = tmp_path / "ran"
    (folder / ".metadata").write_bytes(pickle.dumps(RunsCode(marker)))
    with pytest.raises(UnsafeCheckpointError, match="posix.system|nt.system"):
        load_checkpoint(folder)
    with pytest.raises(UnsafeCheckpointError):
        check_checkpoint_path(folder)
    assert main(["--ckpt", str(folder), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("lit-mllm-export: error:") and ".metadata" in err
    assert not marker.exists()


def test_crafted_non_tensor_value_in_a_shard_never_runs(written, tmp_path) -> None:
    """DCP loads non-tensor values (BYTE_IO items: optimizer param_groups) with
    weights_only=False; here every one is loaded with weights_only=True first."""
    module, folder = written
    marker = tmp_path / "ran"
    out = tmp_path / "last.ckpt"
    write_sharded(folder / LAST, out, module, lr=RunsCode(marker))
    with pytest.raises(UnsafeCheckpointError, match="optimizer_0.param_groups.0.lr"):
        load_checkpoint(out)
    with pytest.raises(UnsafeCheckpointError):
        check_checkpoint_path(out)
    assert not marker.exists()


def test_sharded_metadata_pointing_outside_its_folder_is_refused(sharded) -> None:
    from lit_mllm.checkpoints.sharded import read_dcp_metadata

    _, folder = sharded
    metadata = read_dcp_metadata(folder / ".metadata")
    for info in metadata.storage_data.values():
        info.relative_path = "../../etc/passwd"
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(UnsafeCheckpointError, match="outside its checkpoint folder"):
        check_checkpoint_path(folder)


def test_a_damaged_shard_is_caught_by_the_manifest(sharded) -> None:
    folder = with_manifest(sharded[1])
    good = folder.parent / "epoch=0-step=1.ckpt"
    shutil.copytree(folder, good)
    os.utime(good, (1, 1))
    shard = next(folder.glob("*.distcp"))
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    shard.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError) as info:
        check_checkpoint_path(folder)
    message = str(info.value)
    assert f"{shard.name} fails its CRC32 checksum" in message and str(good) in message
    assert (folder / MANIFEST).is_file()


# -- hyper-parameters that would run code --------------------------------------------------------
@pytest.fixture(scope="module")
def remote_code_ckpt(tmp_path_factory) -> Path:
    """A checkpoint whose hyper-parameters turn on the decoder's trust_remote_code."""
    torch.manual_seed(0)
    decoder = {**MICRO_MODEL["decoder"], "trust_remote_code": True}
    path = tmp_path_factory.mktemp("remote") / "last.ckpt"
    write_checkpoint(MLLMModule(**{**MICRO_MODEL, "decoder": decoder}), path)
    return path


def test_a_checkpoint_turning_on_remote_code_needs_consent(remote_code_ckpt, tmp_path) -> None:
    from lit_mllm.export import load_pretrained, save_pretrained

    with pytest.raises(UnsafeCheckpointError, match="trust_remote_code: true.*--trust-remote-code"):
        load_checkpoint(remote_code_ckpt)
    module = load_checkpoint(remote_code_ckpt, trust_remote_code=True)
    save_pretrained(module, tmp_path / "native")
    with pytest.raises(UnsafeCheckpointError, match="config.json sets model.decoder"):
        load_pretrained(tmp_path / "native")
    assert load_pretrained(
        tmp_path / "native", trust_remote_code=True
    ).decoder_cfg.trust_remote_code
