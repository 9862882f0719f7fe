"""Varlen attention kernels on one packed row: PyTorch's built-in FA2 against FlashAttention-4.

``python -m benchmarks.varlen_attention`` (CUDA): the training benchmark's segment lengths
(642-1215 tokens, 32 samples) with the 1.5B decoder's heads (12 query, 2 key-value, head dim 128)
in bf16; forward and forward+backward time per call, TFLOP/s by the MFU formula's count (no
causal halving), and each kernel's error against the built-in one. Kernels that cannot run here
(FA4 without flash-attn-4, or before Hopper) are listed with the reason.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from benchmarks.kernel_table import measure, timing_row
from lit_mllm.models.attention import flash_varlen, varlen_available
from lit_mllm.models.fa4_varlen import fa4_problem, fa4_varlen

Kernel = Callable[[Tensor, Tensor, Tensor, Tensor, int, float], Tensor]


def packed_inputs(args: argparse.Namespace, device: torch.device) -> tuple[list[Tensor], Tensor]:
    """q, k, v, the output gradient, and the segment offsets of one seeded packed row."""
    lengths = torch.randint(
        args.min_len, args.max_len + 1, (args.samples,), generator=torch.Generator().manual_seed(0)
    ).tolist()
    cu = torch.tensor([0, *lengths], device=device).cumsum(0).to(torch.int32)
    total = sum(lengths)
    generator = torch.Generator(device=device).manual_seed(0)
    shapes = [
        (total, args.heads, args.head_dim),
        (total, args.kv_heads, args.head_dim),
        (total, args.kv_heads, args.head_dim),
        (total, args.heads, args.head_dim),
    ]
    tensors = [
        torch.randn(s, device=device, dtype=torch.bfloat16, generator=generator) for s in shapes
    ]
    return tensors, cu


def time_kernel(kernel: Kernel, tensors: list[Tensor], cu: Tensor, repeats: int) -> dict:
    """One kernel on the packed row: :func:`benchmarks.kernel_table.measure`'s times and values."""
    q, k, v, grad_out = tensors
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    max_len = int(torch.diff(cu).max())
    scale = q.shape[-1] ** -0.5

    def forward() -> Tensor:
        return kernel(*leaves, cu, max_len, scale)

    def train_step() -> list[Tensor]:
        for leaf in leaves:
            leaf.grad = None
        out = forward()
        out.backward(grad_out)
        return [out, *(t.grad for t in leaves)]

    return measure(forward, train_step, repeats)


def main(argv: Sequence[str] | None = None) -> str:
    p = argparse.ArgumentParser(prog="python -m benchmarks.varlen_attention", description=__doc__)
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--min-len", type=int, default=642)
    p.add_argument("--max-len", type=int, default=1215)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args(argv)
    device = torch.device("cuda")
    if not torch.cuda.is_available() or not varlen_available(device):
        raise SystemExit("needs a CUDA GPU and torch.nn.attention.varlen (torch >= 2.10)")
    tensors, cu = packed_inputs(args, device)
    lengths = torch.diff(cu).tolist()
    flops = sum(4 * n * n * args.heads * args.head_dim for n in lengths)  # forward: QK^T + AV
    kernels: dict[str, Kernel] = {"builtin FA2 (torch varlen_attn)": flash_varlen}
    problem = fa4_problem(device)
    if problem is None:
        kernels["FlashAttention-4 (lit_varlen_fa4)"] = fa4_varlen
    lines = [
        f"# varlen attention, {torch.cuda.get_device_name(device)}, torch {torch.__version__}",
        "",
        f"{args.samples} segments of {args.min_len}-{args.max_len} tokens ({sum(lengths)} in all), "
        f"{args.heads} query / {args.kv_heads} key-value heads, head dim {args.head_dim}, bf16; "
        f"{args.repeats} timed calls after one warm-up call.",
        "",
        "| kernel | first call (s) | forward ms | TFLOP/s | fwd+bwd ms | TFLOP/s "
        "| rel. error out, dq, dk, dv |",
        "|---|---|---|---|---|---|---|",
    ]
    reference = None
    for name, kernel in kernels.items():
        result = time_kernel(kernel, tensors, cu, args.repeats)
        reference = reference or result["outputs"]
        lines.append(timing_row(name, result, reference, flops, 3.5 * flops))
    if problem is not None:
        lines += ["", f"FlashAttention-4 not run: {problem}"]
    text = "\n".join(lines)
    print(text)
    return text


if __name__ == "__main__":
    main()
