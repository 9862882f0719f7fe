"""Bicubic resizing as two matrix products equals F.interpolate on the table as an image."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lit_mllm.models.grid_resize import resize_grid

GRIDS = [((6, 6), (9, 9)), ((6, 6), (3, 4)), ((4, 7), (13, 2)), ((5, 5), (1, 1)), ((3, 8), (3, 8))]


def _interpolated(table: torch.Tensor, old, new, antialias: bool) -> torch.Tensor:
    image = table.reshape(1, *old, -1).permute(0, 3, 1, 2)
    out = F.interpolate(image, size=new, mode="bicubic", align_corners=False, antialias=antialias)
    return out.permute(0, 2, 3, 1).reshape(new[0] * new[1], -1)


@pytest.mark.parametrize(("old", "new"), GRIDS)
@pytest.mark.parametrize("antialias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_equals_interpolate(old, new, antialias: bool, dtype: torch.dtype) -> None:
    table = torch.randn(old[0] * old[1], 40, generator=torch.Generator().manual_seed(0)).to(dtype)
    got = resize_grid(table, old, new, antialias=antialias)
    assert got.dtype == dtype and got.shape == (new[0] * new[1], 40)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-12
    expected = _interpolated(table, old, new, antialias)
    torch.testing.assert_close(got, expected, rtol=tolerance, atol=tolerance)


def test_autocast_does_not_lower_the_precision() -> None:
    """Matmuls under autocast run in bf16; the resize must not (interpolate does not either)."""
    table = torch.randn(36, 16, generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = resize_grid(table, (6, 6), (5, 11))
        low = resize_grid(table.to(torch.bfloat16), (6, 6), (5, 11))
    expected = _interpolated(table, (6, 6), (5, 11), antialias=False)
    assert got.dtype == torch.float32 and low.dtype == torch.bfloat16
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
