"""All views of a batch through a timm ViT in one packed pass equal the size-by-size forward."""

from __future__ import annotations

import pytest
import torch
from timm.layers import resample_abs_pos_embed

from lit_mllm.models import attention
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


@pytest.mark.parametrize("kwargs", [{}, {"reg_tokens": 2, "no_embed_class": True}])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_position_tables_equal_timms_bicubic_resampling(kwargs: dict, dtype: torch.dtype) -> None:
    model = create_backbone("vit_tiny_patch16_224", {"img_size": 96, "depth": 1, **kwargs})
    with torch.no_grad():
        model.pos_embed.normal_()
    model.to(dtype)
    packed = PackedViT(model, 1, True)
    prefix = 0 if model.no_embed_class else model.num_prefix_tokens
    for grid in [(6, 6), (1, 1), (2, 9), (9, 2), (13, 4), (12, 12), (3, 17)]:  # 6x6 trained
        expected = resample_abs_pos_embed(
            model.pos_embed, new_size=list(grid), old_size=[6, 6], num_prefix_tokens=prefix
        )
        with torch.autocast("cpu", dtype=torch.bfloat16):  # as in training: still float32 math
            got = packed._table(grid)
        assert got.dtype == dtype and got.shape == expected.shape
        tolerance = 1e-5 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(got, expected, rtol=tolerance, atol=tolerance)


def test_under_autocast_the_kernel_follows_the_dtype_of_q_not_of_the_normed_stream() -> None:
    """CUDA autocast runs LayerNorm in float32, so the stream between blocks is float32 while q
    is bf16: the flash kernel must still be chosen (it was not, and an H200 ran one float32
    SDPA per view). CPU autocast keeps LayerNorm in bf16, so float32 weights stand in here."""
    encoder = _encoder({"class_token": False, "global_pool": "avg", "pre_norm": True}, -2)
    groups = _groups()
    chosen = []

    def recording_flash(q, k, v, cu, max_len, scale, causal=True):
        chosen.append(q.dtype)
        return attention.reference_varlen(q, k, v, cu, max_len, scale, causal=causal)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(attention, "varlen_available", lambda device: True)
        patch.setattr(attention, "flash_varlen", recording_flash)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            packed = encoder.forward_groups(groups, pack=True)
    assert chosen == [torch.bfloat16, torch.bfloat16]  # both blocks up to the penultimate
    # numbers: the float32 tests above, and the GPU test below under CUDA autocast (CPU bf16
    # autocast of this random ViT is too coarse to compare two summation orders)
    assert [tuple(t.shape) for t, _ in packed] == [
        (2, 16, 192),
        (3, 15, 192),
        (1, 14, 192),
        (2, 5, 192),
    ]


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
    calls = []
    real = attention.flash_varlen

    def counting(*args, **kwargs):
        calls.append(kwargs["causal"])
        return real(*args, **kwargs)

    # CLIP-style pre-norm under autocast, as a training step runs it (LayerNorms in float32)
    encoder = _encoder({"class_token": False, "global_pool": "avg", "pre_norm": True}, -2).cuda()
    encoder.model.to(torch.bfloat16)
    groups = [g.cuda() for g in _groups()]
    with pytest.MonkeyPatch.context() as patch, torch.autocast("cuda", dtype=torch.bfloat16):
        patch.setattr(attention, "flash_varlen", counting)
        packed = encoder.forward_groups(groups)  # the default on CUDA in bf16: packed
        alone = [encoder(g) for g in groups]
    assert calls == [False, False]  # the 2 blocks up to the penultimate, one call each, full
    for (expected, _), (got, _) in zip(alone, packed, strict=True):
        torch.testing.assert_close(got.float(), expected.float(), rtol=0.05, atol=0.05)
