"""Every view of a batch through a timm ViT in one pass, as one packed sequence (NaViT-style).

Sliced images give a batch many view sizes (26 distinct ones in a step of 32 COCO-like images).
Run size by size, the encoder launches its ~300 kernels once per size, which left an H200 idle
for half of a training step. Here the patch embeddings of all views are laid end to end and
every block runs once over them; attention stays inside each view through the varlen flash
kernel on CUDA (``reference_varlen`` elsewhere). Each view's position table is timm's resampling
(``grid_resize``: no interpolation kernel per grid). The result equals running each size on its
own through timm, which the tests check.

Only plain timm ViTs (``VisionTransformer`` made of ``Block`` / ``Attention``: CLIP, SigLIP,
DINOv2-style, the tiny encoder) qualify; any other model runs size by size.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from timm.layers import Attention
from timm.models.vision_transformer import Block, VisionTransformer
from torch import Tensor, nn

from lit_mllm.models import attention
from lit_mllm.models.grid_resize import resize_grid

__all__ = ["PackedViT", "can_pack"]


def can_pack(model: nn.Module) -> bool:
    """A timm ViT whose blocks are the standard ones, with a learned position table."""
    if type(model) is not VisionTransformer or not isinstance(model.pos_embed, nn.Parameter):
        return False
    if not getattr(model, "dynamic_img_size", False) or model.pos_embed.ndim != 3:
        return False
    return all(type(b) is Block and type(b.attn) is Attention for b in model.blocks)


class PackedViT:
    """Runs ``model`` (frozen, eval) over views of several sizes at once.

    ``stop``: the number of blocks to run; ``final_norm``: apply the model's last norm (the
    ``forward_features`` output) or not (a block's raw output, as ``forward_intermediates``).
    """

    def __init__(self, model: VisionTransformer, stop: int, final_norm: bool) -> None:
        if not can_pack(model):
            raise ValueError(f"{type(model).__name__} is not a plain timm ViT; it cannot pack")
        self.model, self.stop, self.final_norm = model, stop, final_norm

    def _table(self, grid: tuple[int, int]) -> Tensor:
        """The position table at ``grid`` as timm's ``resample_abs_pos_embed`` gives it
        (antialiased bicubic in float32, prefix rows kept)."""
        table = self.model.pos_embed
        old = tuple(int(s) for s in self.model.patch_embed.grid_size)
        if tuple(grid) == old:
            return table
        prefix = 0 if self.model.no_embed_class else self.model.num_prefix_tokens
        resampled = resize_grid(table[0, prefix:], old, tuple(grid), antialias=True)
        return torch.cat([table[:, :prefix], resampled.unsqueeze(0)], dim=1)

    def _embed(self, pixels: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """(n, 3, h, w) -> (n, prefix + gh*gw, C) block inputs, as timm's ``_pos_embed`` makes them."""
        model = self.model
        x = model.patch_embed(pixels)  # (n, gh, gw, C): dynamic_img_size gives NHWC
        n, gh, gw, channels = x.shape
        x = x.reshape(n, gh * gw, channels)
        prefix = [t.expand(n, -1, -1) for t in (model.cls_token, model.reg_token) if t is not None]
        table = self._table((gh, gw))
        if model.no_embed_class:
            x = torch.cat([*prefix, x + table], dim=1)
        else:
            x = torch.cat([*prefix, x], dim=1) + table
        return model.norm_pre(model.patch_drop(model.pos_drop(x))), (int(gh), int(gw))

    @staticmethod
    def _attention(attn: Attention, x: Tensor, cu: Tensor, max_len: int) -> Tensor:
        """timm's ``Attention.forward`` on packed (T, C) tokens, each view attending to itself
        (the decoder's varlen kernels of ``models/attention.py``, not causal here).

        The kernel follows the dtype of q, as timm's SDPA call does: under CUDA autocast the
        block's LayerNorm hands float32 to ``qkv``, whose output is bf16 again."""
        tokens = x.shape[0]
        gate = attn.gate(x).sigmoid() if attn.gate is not None else None
        q, k, v = attn.qkv(x).reshape(tokens, 3, attn.num_heads, attn.head_dim).unbind(1)
        q, k = attn.q_norm(q), attn.k_norm(k)
        flash = q.dtype in (torch.bfloat16, torch.float16) and attention.varlen_available(q.device)
        kernel = attention.flash_varlen if flash else attention.reference_varlen
        out = kernel(q, k, v, cu, max_len, attn.scale, causal=False)
        out = attn.norm(out.reshape(tokens, attn.attn_dim))
        if gate is not None:
            out = out * gate
        return attn.proj_drop(attn.proj(out))

    def __call__(self, groups: Sequence[Tensor]) -> list[tuple[Tensor, tuple[int, int]]]:
        """Groups of equal-size views (n_g, 3, h_g, w_g) -> per group (n_g, T_g, C) tokens (prefix
        tokens included) and its patch grid, as the model gives them size by size."""
        if not groups:
            return []
        embedded = [self._embed(pixels) for pixels in groups]
        lengths = [t.shape[1] for t, _ in embedded for _ in range(t.shape[0])]
        x = torch.cat([t.flatten(0, 1) for t, _ in embedded])
        cu = torch.tensor([0, *lengths], device=x.device).cumsum(0).to(torch.int32)
        max_len = max(lengths)
        for block in self.model.blocks[: self.stop]:
            x = x + block.ls1(self._attention(block.attn, block.norm1(x), cu, max_len))
            x = x + block.ls2(block.mlp(block.norm2(x)))
        if self.final_norm:
            x = self.model.norm(x)
        out, start = [], 0
        for tokens, grid in embedded:
            size = tokens.shape[0] * tokens.shape[1]
            out.append(
                (x[start : start + size].reshape(tokens.shape[0], tokens.shape[1], -1), grid)
            )
            start += size
        return out
