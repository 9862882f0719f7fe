"""Resampler: parity with the textbook OmniLMM formulation, sin-cos tables, buffers, init."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lit_mllm.models.resampler import Resampler, sincos_pos_embed_2d

# OmniLMM's resampler state dict minus its fixed ``pos_embed``.
OMNILMM_KEYS = {
    "query",
    "kv_proj.weight",
    "attn.in_proj_weight",
    "attn.in_proj_bias",
    "attn.out_proj.weight",
    "attn.out_proj.bias",
    "ln_q.weight",
    "ln_q.bias",
    "ln_kv.weight",
    "ln_kv.bias",
    "ln_post.weight",
    "ln_post.bias",
    "proj",
}


def _direct_sincos(dim: int, gh: int, gw: int) -> torch.Tensor:
    """Element-by-element formula: [sin(w*om) | cos(w*om) | sin(h*om) | cos(h*om)].

    Returned in float64 but rounded to float32 like the module's stored tables.
    """
    quarter = dim // 4
    table = torch.empty(gh * gw, dim, dtype=torch.float64)
    for h in range(gh):
        for w in range(gw):
            for i in range(quarter):
                omega = 1.0 / 10000 ** (2 * i / (dim // 2))
                row = table[h * gw + w]
                row[i], row[quarter + i] = math.sin(w * omega), math.cos(w * omega)
                row[2 * quarter + i] = math.sin(h * omega)
                row[3 * quarter + i] = math.cos(h * omega)
    return table.float().double()


class TextbookResampler(nn.Module):
    """OmniLMM's formulation: sequence-first nn.MultiheadAttention, repeated queries."""

    def __init__(self, num_queries: int, embed_dim: int, kv_dim: int, num_heads: int) -> None:
        super().__init__()
        side = math.isqrt(num_queries)
        self.pos_embed = nn.Parameter(_direct_sincos(embed_dim, side, side), requires_grad=False)
        self.query = nn.Parameter(torch.zeros(num_queries, embed_dim))
        self.kv_proj = nn.Linear(kv_dim, embed_dim, bias=False) if kv_dim != embed_dim else None
        self.attn = nn.MultiheadAttention(embed_dim, num_heads)
        self.ln_q = nn.LayerNorm(embed_dim, eps=1e-6)
        self.ln_kv = nn.LayerNorm(embed_dim, eps=1e-6)
        self.ln_post = nn.LayerNorm(embed_dim, eps=1e-6)
        self.proj = nn.Parameter(torch.zeros(embed_dim, embed_dim))

    def forward(self, x, key_pos, key_padding_mask=None):
        if self.kv_proj is not None:
            x = self.kv_proj(x)
        x = self.ln_kv(x).permute(1, 0, 2)  # (P, B, E)
        n = x.shape[1]
        q = self.ln_q(self.query).unsqueeze(1).repeat(1, n, 1)
        out = self.attn(
            q + self.pos_embed.unsqueeze(1),
            x + key_pos.unsqueeze(1),
            x,
            key_padding_mask=key_padding_mask,
        )[0]
        return self.ln_post(out.permute(1, 0, 2)) @ self.proj


def _bicubic(table: torch.Tensor, src: tuple[int, int], dst: tuple[int, int]) -> torch.Tensor:
    """OmniLMM get_abs_pos, generalised to rectangles."""
    if src == dst:
        return table
    img = table.reshape(1, *src, -1).permute(0, 3, 1, 2)
    img = F.interpolate(img, size=dst, mode="bicubic", align_corners=False)
    return img.permute(0, 2, 3, 1).flatten(0, 2)


def _pair(key_pos_grid="kv_grid", embed_dim=32, kv_dim=24, num_heads=4, kv_grid=(4, 4)):
    torch.manual_seed(0)
    ours = Resampler(9, embed_dim, kv_dim, kv_grid, num_heads=num_heads, key_pos_grid=key_pos_grid)
    ref = TextbookResampler(9, embed_dim, kv_dim, num_heads)
    missing, unexpected = ref.load_state_dict(ours.state_dict(), strict=False)
    assert missing == ["pos_embed"] and unexpected == []  # same names as OmniLMM otherwise
    with torch.no_grad():  # non-trivial LayerNorm/bias values so every term is exercised
        for module in (ours, ref):
            torch.manual_seed(1)
            for name, p in module.named_parameters():
                if name.startswith(("ln_", "attn.in_proj_bias", "attn.out_proj.bias")):
                    p.add_(0.1 * torch.randn_like(p))
    return ours.double(), ref.double()


@pytest.mark.parametrize(
    ("kv_grid", "grid"), [((4, 4), (4, 4)), ((4, 4), (3, 5)), ((4, 6), (4, 6)), ((4, 6), (5, 3))]
)
def test_matches_textbook_multihead_attention(kv_grid, grid):
    ours, ref = _pair(kv_grid=kv_grid)
    x = torch.randn(3, grid[0] * grid[1], 24, dtype=torch.float64)
    key_pos = _bicubic(_direct_sincos(32, *kv_grid), kv_grid, grid)
    out = ours(x, grid)
    assert out.shape == (3, 9, 32)
    torch.testing.assert_close(out, ref(x, key_pos), atol=1e-10, rtol=1e-10)


def test_query_grid_mode_is_omnilmm_get_abs_pos():
    ours, ref = _pair(key_pos_grid="query_grid", kv_grid=(5, 5))
    x = torch.randn(2, 25, 24, dtype=torch.float64)
    key_pos = _bicubic(_direct_sincos(32, 3, 3), (3, 3), (5, 5))  # 3x3 query table -> 5x5 patches
    torch.testing.assert_close(ours(x, (5, 5)), ref(x, key_pos), atol=1e-10, rtol=1e-10)


def test_key_padding_mask_matches_reference():
    ours, ref = _pair()
    x = torch.randn(2, 16, 24, dtype=torch.float64)
    pad = torch.zeros(2, 16, dtype=torch.bool)
    pad[1, 10:] = True
    key_pos = _direct_sincos(32, 4, 4)
    out = ours(x, (4, 4), key_padding_mask=pad)
    torch.testing.assert_close(out, ref(x, key_pos, key_padding_mask=pad), atol=1e-10, rtol=1e-10)
    # padded patches have no influence
    x2 = x.clone()
    x2[1, 10:] = 100.0
    torch.testing.assert_close(ours(x2, (4, 4), key_padding_mask=pad), out, atol=1e-10, rtol=0)


def test_float32_parity_and_identity_kv_proj():
    torch.manual_seed(0)
    ours = Resampler(4, 64, 64, 3)  # kv_dim == embed_dim -> no projection; 64 // 128 -> 1 head
    assert isinstance(ours.kv_proj, nn.Identity) and ours.num_heads == 1
    ref = TextbookResampler(4, 64, 64, 1).float()
    ref.load_state_dict(ours.state_dict(), strict=False)
    x = torch.randn(2, 9, 64)
    torch.testing.assert_close(
        ours(x), ref(x, _direct_sincos(64, 3, 3).float()), atol=1e-5, rtol=1e-5
    )


def test_sincos_formula_on_tiny_grid():
    table = sincos_pos_embed_2d(8, (2, 3))
    assert table.dtype == torch.float32 and table.shape == (6, 8)
    torch.testing.assert_close(table, _direct_sincos(8, 2, 3).float(), atol=1e-7, rtol=0)
    # row 0, col 1: w-part carries the position, h-part is sin(0)=0 / cos(0)=1
    expected = [math.sin(1), math.sin(1e-2), math.cos(1), math.cos(1e-2), 0, 0, 1, 1]
    torch.testing.assert_close(table[1], torch.tensor(expected), atol=1e-7, rtol=0)
    assert torch.equal(sincos_pos_embed_2d(8, 3), sincos_pos_embed_2d(8, (3, 3)))


def test_buffers_fixed_and_not_in_state_dict():
    model = Resampler(16, 256, 96, (6, 8))
    assert model.num_heads == 2
    names = {n for n, _ in model.named_parameters()}
    assert "query_pos" not in names and "key_pos" not in names
    assert set(model.state_dict()) == names == OMNILMM_KEYS
    assert not model.query_pos.requires_grad and not model.key_pos.requires_grad
    assert model.query_pos.shape == (16, 256) and model.key_pos.shape == (48, 256)
    torch.testing.assert_close(model.key_pos, _direct_sincos(256, 6, 8).float(), atol=1e-6, rtol=0)
    model.to(torch.bfloat16)  # buffers follow dtype casts
    assert model.key_pos.dtype == torch.bfloat16
    out = model(torch.randn(2, 48, 96, dtype=torch.bfloat16), (6, 8))
    assert out.dtype == torch.bfloat16 and out.shape == (2, 16, 256)


def test_init_statistics():
    torch.manual_seed(0)
    e = 512
    model = Resampler(64, e, 1024, 16)
    assert model.num_heads == 4
    for w in (model.query, model.kv_proj.weight, model.attn.out_proj.weight):
        assert abs(w.std().item() - 0.02) < 0.001 and abs(w.mean().item()) < 1e-3
    assert abs(model.proj.std().item() - e**-0.5) < 0.002
    bound = math.sqrt(6 / (e + 3 * e))  # nn.MultiheadAttention's xavier_uniform in-projection
    assert model.attn.in_proj_weight.abs().max().item() <= bound
    assert model.attn.in_proj_weight.abs().max().item() > 0.99 * bound
    assert not model.attn.in_proj_bias.any() and not model.attn.out_proj.bias.any()
    for ln in (model.ln_q, model.ln_kv, model.ln_post):
        assert ln.eps == 1e-6 and (ln.weight == 1).all() and not ln.bias.any()


def test_gradients_reach_every_parameter():
    model = Resampler(4, 32, 48, (2, 3), num_heads=2)
    x = torch.randn(2, 12, 48, requires_grad=True)
    model(x, (3, 4)).square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_argument_errors():
    with pytest.raises(ValueError, match="perfect square"):
        Resampler(10, 32, 32, 4)
    with pytest.raises(ValueError, match="divisible by 4"):
        Resampler(4, 30, 30, 4, num_heads=1)
    with pytest.raises(ValueError, match="num_heads"):
        Resampler(4, 32, 32, 4, num_heads=3)
    model = Resampler(4, 32, 48, (2, 3))
    with pytest.raises(ValueError, match="grid"):
        model(torch.randn(1, 7, 48), (2, 3))
