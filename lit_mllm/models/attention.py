"""Packed rows without a quadratic mask: PyTorch's flash-attention varlen kernel for transformers.

``attn_implementation: lit_varlen`` (registered on import) sends packed rows (one row, no
attention mask, position ids restarting per sample) to ``torch.nn.attention.varlen`` on CUDA
and to one batched attention over the row's segments elsewhere (a loop over very uneven
ones); padded batches and KV-cache decoding use the stock SDPA path. With plain SDPA, packing
needs a dense (T x T) block-diagonal mask instead.

Two registrations make this work: the attention function (``AttentionInterface``) and a mask
function (``AttentionMaskInterface``). transformers builds no mask at all for an attention name
without a mask function, so left-padded generation prompts would attend to their pad tokens;
``varlen_mask`` builds SDPA's mask whenever there is padding (or a cache, a sliding window, a
custom mask) and returns ``None`` only for a single unpadded row, the case the varlen kernel
handles from the position ids.

``attn_implementation: lit_varlen_fa4`` is the same path with FlashAttention-4's varlen kernels
on CUDA (``lit_mllm.models.fa4_varlen``; Hopper/Blackwell, the flash-attn-4 package).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from lit_mllm.models.fa4_varlen import fa4_varlen

VARLEN_ATTENTION = "lit_varlen"
VARLEN_FA4_ATTENTION = "lit_varlen_fa4"  # the same with FlashAttention-4's kernels (fa4_varlen)
VARLEN_ATTENTIONS = (VARLEN_ATTENTION, VARLEN_FA4_ATTENTION)
_SEGMENTS: list[Any] = [None, None]  # (position_ids object, (cu_seqlens, max_len))


def packed_segments(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """cu_seqlens (int32) and the longest segment of a packed row whose positions restart at 0.

    Computed once per forward (the decoder passes the same tensor object to every layer), so
    the one host sync it needs is paid once per step, not once per layer.
    """
    if _SEGMENTS[0] is position_ids:
        return _SEGMENTS[1]
    starts = position_ids[0] == 0
    starts[0] = True
    index = starts.nonzero().flatten()
    end = torch.tensor([position_ids.shape[1]], device=index.device, dtype=index.dtype)
    cu = torch.cat([index, end]).to(torch.int32)
    value = (cu, int((cu[1:] - cu[:-1]).max()))
    _SEGMENTS[0], _SEGMENTS[1] = position_ids, value
    return value


# the batched CPU path pads every segment to the longest: used while that costs at most this
# many times the attention work of the segments alone (sum of squared lengths; the tiny
# recipe's caption batches: 1.5-2.0)
PADDED_ATTENTION_LIMIT = 3.0


def reference_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu: torch.Tensor,
    max_len: int,
    scale: float,
    causal: bool = True,
) -> torch.Tensor:
    """Attention per segment on (T, H, D) tensors, GQA by head repetition: the CPU path.
    Causal for the decoder's packed rows; ``causal=False`` for the encoder's packed views.

    Segments of similar lengths (a packed micro-batch of captions) go through one batched
    attention; a Python loop over them cost what packing saved. Very uneven ones (a long view
    beside short ones) go one by one, where padding them all to the longest would waste more."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    lengths = (cu[1:] - cu[:-1]).tolist()
    if len(lengths) * max_len**2 <= PADDED_ATTENTION_LIMIT * sum(n * n for n in lengths):
        return batched_segment_attention(q, k, v, cu, max_len, scale, causal)
    return looped_segment_attention(q, k, v, cu, scale, causal)


def looped_segment_attention(
    q: Tensor, k: Tensor, v: Tensor, cu: Tensor, scale: float, causal: bool
) -> Tensor:
    """One SDPA call per segment (heads already repeated for GQA)."""
    out = torch.empty_like(q)
    bounds = cu.tolist()
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        seg = [t[a:b].transpose(0, 1) for t in (q, k, v)]
        out[a:b] = F.scaled_dot_product_attention(*seg, is_causal=causal, scale=scale).transpose(
            0, 1
        )
    return out


def batched_segment_attention(
    q: Tensor, k: Tensor, v: Tensor, cu: Tensor, max_len: int, scale: float, causal: bool
) -> Tensor:
    """The segments scattered into a padded (segments, H, max_len, D) batch for one batched
    product, then gathered back: only attention sees padding, every other layer of a packed
    row runs on real tokens alone (heads already repeated for GQA)."""
    lengths = (cu[1:] - cu[:-1]).long()
    count, total = lengths.numel(), q.shape[0]
    starts = cu[:-1].long().repeat_interleave(lengths, output_size=total)
    segment = torch.arange(count, device=q.device).repeat_interleave(lengths, output_size=total)
    slot = segment * max_len + torch.arange(total, device=q.device) - starts

    def padded(t: Tensor) -> Tensor:
        grid = t.new_zeros(count * max_len, *t.shape[1:]).index_copy(0, slot, t)
        return grid.unflatten(0, (count, max_len)).transpose(1, 2)  # (segments, H, L, D)

    keys = torch.arange(max_len, device=q.device)
    allowed = (keys < lengths[:, None])[:, None, None, :]  # real keys of each segment
    if causal:
        allowed = allowed & (keys[None, :] <= keys[:, None])
    scores = (padded(q) @ padded(k).transpose(-1, -2)) * scale
    # softmax in float32 at least, as transformers' eager attention
    softmax_dtype = torch.promote_types(q.dtype, torch.float32)
    weights = scores.masked_fill(~allowed, float("-inf")).softmax(-1, dtype=softmax_dtype)
    weights = weights.to(q.dtype)
    out = (weights @ padded(v)).transpose(1, 2).flatten(0, 1)  # (segments * L, H, D)
    return out.index_select(0, slot)


@dataclass(frozen=True)
class VarlenKernel:
    """torch's varlen attention and how the installed version takes causality and GQA: read
    once at import, so torch.compile traces a plain call (no signature inspection in a graph)."""

    fn: Callable[..., Tensor]
    causal_by_window: bool  # window_size=(-1, 0) rather than is_causal=True
    native_gqa: bool  # enable_gqa=True rather than repeated key/value heads


def varlen_kernel_of(fn: Callable[..., Tensor]) -> VarlenKernel:
    params = inspect.signature(fn).parameters
    return VarlenKernel(fn, "window_size" in params, "enable_gqa" in params)


def find_varlen_kernel() -> VarlenKernel | None:
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_kernel_of(varlen_attn)


TORCH_VARLEN = find_varlen_kernel()


def flash_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu: torch.Tensor,
    max_len: int,
    scale: float,
    causal: bool = True,
) -> torch.Tensor:
    """PyTorch's built-in flash-attention varlen kernel (torch.nn.attention.varlen)."""
    kernel = TORCH_VARLEN
    if kernel is None:
        raise RuntimeError("this torch has no torch.nn.attention.varlen (torch >= 2.10 has it)")
    kwargs: dict[str, Any] = {"scale": scale}
    if kernel.causal_by_window:
        kwargs["window_size"] = (-1, 0) if causal else (-1, -1)
    else:
        kwargs["is_causal"] = causal
    if q.shape[1] != k.shape[1]:
        if kernel.native_gqa:
            kwargs["enable_gqa"] = True
        else:
            groups = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return kernel.fn(q, k, v, cu, cu, max_len, max_len, **kwargs)


def varlen_available(device: torch.device) -> bool:
    return device.type == "cuda" and TORCH_VARLEN is not None


# the segment table from the position ids (a host sync) and the CPU path (host-side lengths)
# stay outside torch.compile; the CUDA kernel is a custom op that compiles
@torch.compiler.disable
def _segments_outside_graph(position_ids: Tensor) -> tuple[Tensor, int]:
    return packed_segments(position_ids)


@torch.compiler.disable
def _reference_outside_graph(
    q: Tensor, k: Tensor, v: Tensor, cu: Tensor, max_len: int, scale: float
) -> Tensor:
    return reference_varlen(q, k, v, cu, max_len, scale)


def _packed_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    position_ids: torch.Tensor,
    scaling: float | None,
    cu: torch.Tensor | None,
    max_len: int | None,
    fa4: bool = False,
) -> torch.Tensor:
    """A packed row through the varlen kernel (FlashAttention-4's with ``fa4``). On CUDA a
    compiled decoder layer traces it, so the layer stays one graph and the (1, H, T, D) ->
    (T, H, D) copies fuse into the kernels that make q, k and v (measured: 493 -> 474 ms per
    1.5B step on an H200)."""
    if cu is None:  # not handed over by the model (its TokenLayout): found here, one sync
        cu, max_len = _segments_outside_graph(position_ids)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    dtype = query.dtype
    if query.is_cuda and torch.is_autocast_enabled("cuda"):
        dtype = torch.get_autocast_dtype("cuda")
    q, k, v = (t[0].transpose(0, 1).to(dtype).contiguous() for t in (query, key, value))
    half = dtype in (torch.bfloat16, torch.float16)
    if fa4 and q.is_cuda and half:
        out = fa4_varlen(q, k, v, cu, max_len, scale)
    elif varlen_available(q.device) and half:
        out = flash_varlen(q, k, v, cu, max_len, scale)
    else:
        out = _reference_outside_graph(q, k, v, cu, max_len, scale)
    return out.unsqueeze(0)  # (1, T, H, D) like transformers' SDPA function


def varlen_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    fa4: bool = False,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """A transformers attention function: packed rows (no mask, one row) -> varlen kernel.

    Registered under ``lit_varlen`` (and, with ``fa4``: FlashAttention-4 on CUDA, under
    ``lit_varlen_fa4``). ``varlen_mask`` leaves the mask out only for one unpadded row, so packed
    rows arrive with ``attention_mask=None`` and their ``position_ids``; anything else (padding
    masks, KV-cache decoding) goes to the stock SDPA function, traceable, so a compiled decoding
    step (static cache) stays one graph.
    """
    position_ids = kwargs.get("position_ids")
    packed = (
        attention_mask is None
        and position_ids is not None
        and query.shape[0] == 1
        and query.shape[2] == key.shape[2]
    )
    if not packed:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    cu, max_len = kwargs.get("cu_seq_lens_q"), kwargs.get("max_length_q")
    return _packed_attention(query, key, value, position_ids, scaling, cu, max_len, fa4), None


def varlen_fa4_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """``lit_varlen_fa4``: ``varlen_attention_forward`` with FlashAttention-4 on CUDA (the
    model checks first that it is installed: ``MultimodalLM.check_kernels``)."""
    return varlen_attention_forward(module, query, key, value, attention_mask, fa4=True, **kwargs)


def varlen_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function: Callable[..., Any] | None = None,
    attention_mask: torch.Tensor | None = None,
    **kwargs: Any,
) -> torch.Tensor | None:
    """A transformers mask function for ``lit_varlen``: ``None`` for one row without a padding
    mask or cache (packed or plain; the attention function reads the segments from the
    position ids), SDPA's boolean mask otherwise, so padded batches never attend to padding.

    A sliding window (``local_size``) or a model's own mask overlay (``use_vmap``, set by
    transformers for ``or_mask_function`` / ``and_mask_function``) also gets SDPA's mask: the
    varlen kernel is plain causal attention per segment.
    """
    unmasked_row = attention_mask is None and batch_size == 1 and q_length == kv_length
    if unmasked_row and kwargs.get("local_size") is None and not kwargs.get("use_vmap", False):
        return None
    if mask_function is not None:
        kwargs["mask_function"] = mask_function
    return sdpa_mask(
        batch_size,
        q_length,
        kv_length,
        q_offset=q_offset,
        kv_offset=kv_offset,
        attention_mask=attention_mask,
        **kwargs,
    )


AttentionInterface.register(VARLEN_ATTENTION, varlen_attention_forward)
AttentionMaskInterface.register(VARLEN_ATTENTION, varlen_mask)
AttentionInterface.register(VARLEN_FA4_ATTENTION, varlen_fa4_attention_forward)
AttentionMaskInterface.register(VARLEN_FA4_ATTENTION, varlen_mask)
