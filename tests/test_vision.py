"""VisionEncoder: shapes and grids, feature layers, freezing, dtype, offline weight loading."""

from __future__ import annotations

import time

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from lit_mllm.models.vision import VisionEncoder

TINY = {"img_size": 64, "patch_size": 8, "embed_dim": 192, "depth": 4, "num_heads": 3}
HUB_ID = "timm/vit_base_patch16_224.augreg2_in21k_ft_in1k"  # default tag of vit_base_patch16_224


@pytest.fixture(scope="module")
def encoder() -> VisionEncoder:
    torch.manual_seed(0)
    return VisionEncoder(model_kwargs=TINY)


@pytest.fixture(scope="module")
def pixels() -> torch.Tensor:
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def _tiny_state(encoder: VisionEncoder) -> dict[str, torch.Tensor]:
    return {k: v.contiguous().clone() for k, v in encoder.model.state_dict().items()}


def _manual_blocks(model: nn.Module, pixels: torch.Tensor, n_blocks: int) -> torch.Tensor:
    """Textbook ViT pass through the first ``n_blocks`` blocks, prefix tokens kept."""
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(pixels))))
    for block in model.blocks[:n_blocks]:
        x = block(x)
    return x


def test_tiny_shapes_and_attributes(encoder, pixels):
    feats, grid = encoder(pixels)
    assert grid == (8, 8)
    assert feats.shape == (2, 64, 192)
    assert feats.dtype == torch.float32
    assert encoder.embed_dim == 192
    assert encoder.num_prefix_tokens == 1
    assert encoder.default_grid == (8, 8)
    cfg = encoder.data_config
    assert cfg["input_size"] == (3, 64, 64)  # the model's img_size, not the 224 of the tag
    assert set(cfg) >= {"input_size", "interpolation", "mean", "std", "crop_pct"}


@pytest.mark.parametrize(("size", "grid"), [((48, 80), (6, 10)), ((50, 81), (7, 11))])
def test_dynamic_non_square_input(encoder, size, grid):
    feats, got = encoder(torch.randn(1, 3, *size))
    assert got == grid  # 50x81 is padded up to whole patches
    assert feats.shape == (1, grid[0] * grid[1], 192)
    assert encoder.grid_for(*size) == grid


def test_feature_layers_match_manual_block_pass(encoder):
    pixels = torch.randn(2, 3, 48, 80)
    penult = VisionEncoder(model_kwargs=TINY, feature_layer=-2)
    penult.model.load_state_dict(encoder.model.state_dict())
    second = VisionEncoder(model_kwargs=TINY, feature_layer=1)
    second.model.load_state_dict(encoder.model.state_dict())
    last, grid = encoder(pixels)
    before_last, grid2 = penult(pixels)
    after_two, _ = second(pixels)
    assert grid == grid2 == (6, 10)
    assert not torch.allclose(last, before_last, atol=1e-3)
    model = encoder.model
    with torch.no_grad():
        ref_last = model.norm(_manual_blocks(model, pixels, 4))[:, 1:]
        ref_penult = _manual_blocks(model, pixels, 3)[:, 1:]  # depth - 1 blocks
        ref_two = _manual_blocks(model, pixels, 2)[:, 1:]
    torch.testing.assert_close(last, ref_last, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(before_last, ref_penult, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(after_two, ref_two, atol=1e-5, rtol=1e-5)


def test_frozen_and_stays_in_eval(encoder, pixels):
    parent = nn.ModuleDict({"vision": encoder, "head": nn.Linear(192, 4)})
    parent.train()
    assert parent["head"].training
    assert not any(m.training for m in encoder.modules())
    assert not any(p.requires_grad for p in encoder.parameters())
    feats, _ = encoder(pixels)
    assert not feats.requires_grad
    parent["head"](feats).sum().backward()  # the trainable part downstream still learns
    assert parent["head"].weight.grad is not None
    assert all(p.grad is None for p in encoder.parameters())


def test_bfloat16_cast(encoder, pixels):
    enc = VisionEncoder(model_kwargs=TINY, dtype="bfloat16")
    enc.model.load_state_dict(encoder.model.state_dict())
    assert {p.dtype for p in enc.parameters()} == {torch.bfloat16}
    feats, grid = enc(pixels)  # float32 input is cast by the encoder
    assert feats.dtype == torch.bfloat16 and grid == (8, 8)
    ref, _ = encoder(pixels)
    torch.testing.assert_close(feats.float(), ref, atol=0.15, rtol=0.05)


@pytest.mark.parametrize(("suffix", "as_dir"), [(".safetensors", True), (".pth", False)])
def test_load_local_checkpoint(encoder, pixels, tmp_path, suffix, as_dir):
    state = _tiny_state(encoder)
    file = tmp_path / f"weights{suffix}"
    save_file(state, str(file)) if suffix == ".safetensors" else torch.save(state, file)
    torch.manual_seed(123)  # a different random init, overwritten by the file
    loaded = VisionEncoder(model_kwargs=TINY, checkpoint_path=str(tmp_path if as_dir else file))
    assert torch.equal(loaded(pixels)[0], encoder(pixels)[0])


def test_wrong_checkpoint_path_is_named(tmp_path):
    missing = tmp_path / "nope" / "model.safetensors"
    with pytest.raises(FileNotFoundError, match="nope/model.safetensors"):
        VisionEncoder(model_kwargs=TINY, checkpoint_path=str(missing))
    with pytest.raises(FileNotFoundError, match="without a weight file"):
        VisionEncoder(model_kwargs=TINY, checkpoint_path=str(tmp_path))


def test_mismatched_checkpoint_is_a_clear_value_error(encoder, tmp_path):
    shallow = VisionEncoder(model_kwargs={**TINY, "depth": 3})
    file = tmp_path / "shallow.safetensors"
    save_file(_tiny_state(shallow), str(file))
    with pytest.raises(ValueError, match=r"missing \(\d+\): \['blocks\.3\."):
        VisionEncoder(model_kwargs=TINY, checkpoint_path=str(file))
    extra = {**_tiny_state(encoder), "adapter.weight": torch.zeros(2)}
    save_file(extra, str(file))
    with pytest.raises(ValueError, match=r"unexpected \(1\): \['adapter.weight'\]"):
        VisionEncoder(model_kwargs=TINY, checkpoint_path=str(file))


def test_classifier_weights_in_checkpoint_are_ignored(encoder, pixels, tmp_path):
    state = {
        **_tiny_state(encoder),
        "head.weight": torch.zeros(10, 192),
        "head.bias": torch.zeros(10),
    }
    save_file(state, str(tmp_path / "model.safetensors"))
    loaded = VisionEncoder(model_kwargs=TINY, checkpoint_path=str(tmp_path))
    assert torch.equal(loaded(pixels)[0], encoder(pixels)[0])


@pytest.fixture()
def empty_hf_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def test_pretrained_with_empty_cache_fails_fast(empty_hf_cache):
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError) as info:
        VisionEncoder(model_kwargs=TINY, pretrained=True)
    assert time.perf_counter() - start < 5
    msg = str(info.value)
    for part in (
        "vit_base_patch16_224",
        HUB_ID,
        str(empty_hf_cache),
        "hf download",
        "checkpoint_path",
    ):
        assert part in msg


def test_pretrained_loads_from_hf_cache(encoder, pixels, empty_hf_cache):
    """A cache laid out like huggingface_hub's (refs/main -> snapshots/<commit>/file)."""
    repo = empty_hf_cache / ("models--" + HUB_ID.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    save_file(_tiny_state(encoder), str(repo / "snapshots" / commit / "model.safetensors"))
    loaded = VisionEncoder(model_kwargs=TINY, pretrained=True)
    assert torch.equal(loaded(pixels)[0], encoder(pixels)[0])


def test_bad_arguments():
    with pytest.raises(ValueError, match="Unknown timm model"):
        VisionEncoder(model_name="vit_does_not_exist")
    with pytest.raises(ValueError, match="out of range"):
        VisionEncoder(model_kwargs=TINY, feature_layer=4)


def test_sincos_position_table_for_random_encoders() -> None:
    """The random table (std 0.02) is replaced by the fixed 2D sin-cos one; prefix rows zero."""
    from lit_mllm.models.resampler import sincos_pos_embed_2d

    enc = VisionEncoder(model_kwargs=TINY, sincos_pos_embed=True)
    table = enc.model.pos_embed[0]
    assert torch.equal(table[0], torch.zeros(192))  # the class token's row
    assert torch.allclose(table[1:], sincos_pos_embed_2d(192, (8, 8)).reshape(64, 192))
    assert not enc.model.pos_embed.requires_grad
    with pytest.raises(ValueError, match="sincos_pos_embed"):
        VisionEncoder("resnet18", model_kwargs={}, sincos_pos_embed=True)
