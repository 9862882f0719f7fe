"""MLP projector and connector factory, plus an encoder -> connector shape check."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lit_mllm.models.connector import build_connector, num_image_tokens
from lit_mllm.models.projector import MLPProjector
from lit_mllm.models.resampler import Resampler


def test_mlp_projector_is_linear_gelu_linear():
    torch.manual_seed(0)
    proj = MLPProjector(24, 40)
    x = torch.randn(2, 12, 24)
    out = proj(x, (3, 4))
    assert out.shape == (2, 12, 40)
    w1, b1 = proj.fc1.weight, proj.fc1.bias
    w2, b2 = proj.fc2.weight, proj.fc2.bias
    expected = F.gelu(x @ w1.T + b1) @ w2.T + b2  # exact (erf) GELU, as in LLaVA-1.5
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)
    assert sum(p.numel() for p in proj.parameters()) == 24 * 40 + 40 + 40 * 40 + 40


def test_mlp_projector_rejects_wrong_shapes():
    proj = MLPProjector(8, 16)
    with pytest.raises(ValueError, match="grid"):
        proj(torch.randn(1, 5, 8), (2, 3))
    with pytest.raises(ValueError, match="8"):
        proj(torch.randn(1, 6, 9), (2, 3))


def test_build_connector_kinds():
    res = build_connector("resampler", kv_dim=192, embed_dim=256, kv_grid=(8, 8), num_queries=16)
    assert isinstance(res, Resampler)
    assert (res.num_queries, res.embed_dim, res.kv_dim, res.kv_grid) == (16, 256, 192, (8, 8))
    mlp = build_connector("mlp", kv_dim=192, embed_dim=256, kv_grid=(8, 8))
    assert isinstance(mlp, MLPProjector) and (mlp.in_dim, mlp.out_dim) == (192, 256)
    with pytest.raises(ValueError, match="Unknown connector kind"):
        build_connector("qformer", kv_dim=8, embed_dim=8, kv_grid=(2, 2))


def test_num_image_tokens():
    assert num_image_tokens("resampler", (16, 16), 64) == 64
    assert num_image_tokens("mlp", (24, 24), 64) == 576  # LLaVA-1.5 at 336 px, patch 14
    assert num_image_tokens("mlp", (6, 10)) == 60
    with pytest.raises(ValueError, match="Unknown connector kind"):
        num_image_tokens("pool", (2, 2))


@pytest.mark.parametrize("kind", ["resampler", "mlp"])
def test_encoder_to_connector_token_count(kind):
    from lit_mllm.models.vision import VisionEncoder

    enc = VisionEncoder(
        model_kwargs={"img_size": 64, "patch_size": 8, "embed_dim": 192, "depth": 1, "num_heads": 3}
    )
    conn = build_connector(
        kind, kv_dim=enc.embed_dim, embed_dim=128, kv_grid=enc.default_grid, num_queries=16
    )
    feats, grid = enc(torch.randn(2, 3, 64, 64))
    out = conn(feats, grid)
    assert out.shape == (2, num_image_tokens(kind, enc.default_grid, 16), 128)
