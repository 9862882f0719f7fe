"""All views of a batch through a timm ViT in one packed pass equal the size-by-size forward."""

from __future__ import annotations

import pytest
import torch

from lit_mllm.models import packed_vision
from lit_mllm.models.packed_vision import PackedViT, can_pack
from lit_mllm.models.vision import VisionEncoder, create_backbone

VARIANTS = [
    ({}, -1),  # CLS + learned positions, final norm
    ({}, -2),  # LLaVA's penultimate block, no norm
    ({"reg_tokens": 2, "no_embed_class": True, "qk_norm": True}, -1),  # registers, DeiT-3 style
    ({"class_token": False, "global_pool": "avg", "pre_norm": True}, 1),  # CLIP-style pre-norm
]


def _groups() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    sizes = [(2, 64, 64), (3, 48, 80), (1, 32, 112), (2, 80, 16)]
    return [torch.randn(n, 3, h, w, generator=generator) for n, h, w in sizes]


def _encoder(kwargs: dict, feature_layer: int) -> VisionEncoder:
    torch.manual_seed(0)
    model_kwargs = {"img_size": 64, "depth": 3, **kwargs}
    return VisionEncoder(
        "vit_tiny_patch16_224", model_kwargs=model_kwargs, feature_layer=feature_layer
    )


@pytest.mark.parametrize(("kwargs", "feature_layer"), VARIANTS)
def test_one_packed_pass_equals_each_size_on_its_own(kwargs: dict, feature_layer: int) -> None:
    encoder = _encoder(kwargs, feature_layer)
    assert encoder.packed is not None
    groups = _groups()
    alone = [encoder(g) for g in groups]
    packed = encoder.forward_groups(groups, pack=True)
    for (expected, grid), (got, packed_grid) in zip(alone, packed, strict=True):
        assert packed_grid == grid
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # the default on a CPU: size by size (the varlen flash kernel is CUDA-only)
    default = encoder.forward_groups(groups)
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(alone, default, strict=True))


def test_position_tables_are_resampled_once_per_grid_and_forgotten_with_new_weights() -> None:
    encoder = _encoder({}, -1)
    calls = []
    real = packed_vision.resample_abs_pos_embed

    def counting(*args, **kwargs):
        calls.append(kwargs["new_size"])
        return real(*args, **kwargs)

    groups = _groups()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(packed_vision, "resample_abs_pos_embed", counting)
        encoder.forward_groups(groups, pack=True)
        encoder.forward_groups(groups, pack=True)
        assert sorted(map(tuple, calls)) == [(2, 7), (3, 5), (4, 4), (5, 1)]  # once per grid
        state = {k: v.clone() for k, v in encoder.state_dict().items()}
        state["model.pos_embed"] = torch.randn_like(state["model.pos_embed"])
        encoder.load_state_dict(state)
        after = encoder.forward_groups(groups, pack=True)
        assert len(calls) == 8  # resampled again from the new table
    for (expected, _), (got, _) in zip((encoder(g) for g in groups), after, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_only_plain_vits_pack() -> None:
    assert can_pack(create_backbone("vit_tiny_patch16_224", {"img_size": 32, "depth": 1}))
    with torch.device("meta"):  # the real recipe's encoder, shapes only
        assert can_pack(create_backbone("vit_large_patch14_clip_quickgelu_336"))
    assert not can_pack(create_backbone("resnet18"))
    assert not can_pack(create_backbone("vit_tiny_patch16_224", {"dynamic_img_size": False}))
    with pytest.raises(ValueError, match="not a plain timm ViT"):
        PackedViT(create_backbone("resnet18"), 1, True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_packed_views_go_through_the_flash_kernel_and_match_size_by_size() -> None:
    from lit_mllm.models import attention

    calls = []
    real = attention.flash_varlen

    def counting(*args, **kwargs):
        calls.append(kwargs["causal"])
        return real(*args, **kwargs)

    encoder = _encoder({}, -2).cuda()
    encoder.model.to(torch.bfloat16)
    groups = [g.cuda() for g in _groups()]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(attention, "flash_varlen", counting)
        packed = encoder.forward_groups(groups)  # the default on CUDA in bf16: packed
    assert calls == [False, False]  # the 2 blocks up to the penultimate, one call each, full
    for (expected, _), (got, _) in zip((encoder(g) for g in groups), packed, strict=True):
        torch.testing.assert_close(got.float(), expected.float(), rtol=0.05, atol=0.05)
