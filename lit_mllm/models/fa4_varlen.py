"""FlashAttention-4 for packed rows: attention name ``lit_varlen_fa4``.

The same packed-row path as ``lit_varlen`` (``lit_mllm.models.attention``), with the varlen
kernels of flash-attn-4 (CuTe DSL, Hopper and Blackwell GPUs) instead of PyTorch's built-in
FlashAttention-2. The kernels are wrapped as two torch custom ops with fake (shape-only)
versions and an autograd formula, so compiled decoder layers call them without a graph break.

flash-attn-4 is an optional package (``pip install flash-attn-4``); PyTorch >= 2.11 can also
route its own flash ops to it (``activate_flash_attention_impl("FA4")``), but that hook follows
one FA4 release's signatures, and these ops call FA4's kernels the same way on any torch.
"""

from __future__ import annotations

import functools
import importlib
from types import ModuleType

import torch
from torch import Tensor

from lit_mllm.errors import UsageError
from lit_mllm.models.gpu_kernels import HOPPER_OR_BLACKWELL, gpu_kernel_problem, module_installed

FA4_MODULE = "flash_attn.cute.interface"
FA4_INSTALL = (
    "`pip install flash-attn-4` (`flash-attn-4[cu13]` with a CUDA 13 torch), or flash-attention's "
    "flash_attn/cute folder from its repository"
)
FA4_CAPABILITIES = HOPPER_OR_BLACKWELL


def fa4_installed() -> bool:
    return module_installed(FA4_MODULE)


def fa4_problem(device: torch.device) -> str | None:
    """Why FA4 cannot run on ``device``; None when it can."""
    return gpu_kernel_problem(device, "FlashAttention-4", FA4_MODULE, FA4_INSTALL, fa4_installed)


@functools.cache
def _kernels(device: torch.device) -> ModuleType:
    """FA4's interface module once checked for ``device`` (cached: called for every layer)."""
    problem = fa4_problem(device)
    if problem is not None:
        raise UsageError(f"attn_implementation lit_varlen_fa4: {problem}")
    return importlib.import_module(FA4_MODULE)


def _causal_segments(cu: Tensor, max_len: int, scale: float) -> dict:
    """FA4's arguments for causal attention within each segment of a packed row."""
    return {
        "cu_seqlens_q": cu,
        "cu_seqlens_k": cu,
        "max_seqlen_q": max_len,
        "max_seqlen_k": max_len,
        "softmax_scale": scale,
        "causal": True,
    }


@torch.library.custom_op("lit_mllm::fa4_varlen_fwd", mutates_args=())
def fa4_varlen_fwd(
    q: Tensor, k: Tensor, v: Tensor, cu: Tensor, max_len: int, scale: float
) -> tuple[Tensor, Tensor]:
    """Causal attention over the segments ``cu`` of (T, H, D) rows: output and log-sum-exp."""
    fwd = _kernels(q.device)._flash_attn_fwd
    out, lse, *_ = fwd(q, k, v, return_lse=True, **_causal_segments(cu, max_len, scale))
    return out, lse


@fa4_varlen_fwd.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, cu: Tensor, max_len: int, scale: float):
    return torch.empty_like(q), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@torch.library.custom_op("lit_mllm::fa4_varlen_bwd", mutates_args=())
def fa4_varlen_bwd(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    cu: Tensor,
    max_len: int,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    bwd = _kernels(q.device)._flash_attn_bwd
    dq, dk, dv = bwd(q, k, v, out, grad_out, lse, **_causal_segments(cu, max_len, scale))[:3]
    return dq, dk, dv


@fa4_varlen_bwd.register_fake
def _(grad_out, q, k, v, out, lse, cu, max_len, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _save(ctx, inputs: tuple, output: tuple) -> None:
    q, k, v, cu, max_len, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu)
    ctx.max_len, ctx.scale = max_len, scale


def _backward(ctx, grad_out: Tensor, grad_lse: Tensor | None):
    q, k, v, out, lse, cu = ctx.saved_tensors
    dq, dk, dv = fa4_varlen_bwd(
        grad_out.contiguous(), q, k, v, out, lse, cu, ctx.max_len, ctx.scale
    )
    return dq, dk, dv, None, None, None


fa4_varlen_fwd.register_autograd(_backward, setup_context=_save)


def fa4_varlen(q: Tensor, k: Tensor, v: Tensor, cu: Tensor, max_len: int, scale: float) -> Tensor:
    """(T, H, D) packed rows -> (T, H, D); key/value heads may be fewer (GQA)."""
    return fa4_varlen_fwd(q, k, v, cu, max_len, scale)[0]
