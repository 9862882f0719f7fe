"""CUDA claims as tests (``pytest -m gpu`` on the device; skipped on a CPU): bf16-mixed training
lowers the loss, the varlen kernel trains like SDPA on packed rows and compiles without a graph
break, compiled blocks give the eager loss, and the 1.5B-class smoke step fits its micro-batch."""

from __future__ import annotations

import pytest
import torch
from test_fa4_varlen import FA4_READY
from test_model import MICRO_DECODER, _fit, make_batch, micro_module

from lit_mllm.models import attention

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def _on_cuda(batch: dict) -> dict:
    return {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def bf16_loss_and_grads(module: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, ...]:
    """One training step under bf16 autocast from fresh gradients: its loss and every
    gradient, flattened into one vector."""
    module.zero_grad()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss, _ = module(batch)
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in module.parameters() if p.grad is not None])
    return loss.detach().float(), grads.float()


def check_bf16_mixed_fit_halves_the_loss(module: torch.nn.Module) -> None:
    """30 steps of ``Trainer(precision="bf16-mixed")`` on the micro batch halve its loss."""
    batch = make_batch(module)
    with torch.no_grad():
        first = float(module.eval()(batch)[0])
    _fit(module, 30, accelerator="cuda", precision="bf16-mixed")
    module.cuda().eval()  # the Trainer's teardown moved it back to the CPU
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        last = float(module(_on_cuda(batch))[0])
    assert torch.isfinite(torch.tensor(last)) and last < 0.5 * first, (first, last)


def test_bf16_mixed_fit_lowers_the_loss() -> None:
    check_bf16_mixed_fit_halves_the_loss(micro_module(optim={"lr": 3e-3, "warmup_steps": 3}))


def test_varlen_kernel_trains_like_sdpa_on_packed_rows() -> None:
    """The flash varlen kernel (CUDA, bf16) against transformers' SDPA with the block-diagonal
    mask: the same loss and gradients on a packed row, to bf16 accuracy."""
    sdpa = micro_module().cuda()
    varlen = micro_module(
        decoder={**MICRO_DECODER, "attn_implementation": attention.VARLEN_ATTENTION}
    )
    varlen.load_state_dict(sdpa.state_dict())
    varlen.cuda()
    batch = _on_cuda(make_batch(sdpa, packing=True))
    assert batch["attention_mask"] is None
    (loss_a, grads_a), (loss_b, grads_b) = (bf16_loss_and_grads(m, batch) for m in (sdpa, varlen))
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-2, atol=1e-2)
    assert float((grads_b - grads_a).norm() / grads_a.norm()) < 0.05


@pytest.mark.parametrize(
    "attention_forward",
    [
        attention.varlen_attention_forward,
        pytest.param(
            attention.varlen_fa4_attention_forward,
            marks=pytest.mark.skipif(not FA4_READY, reason="needs flash-attn-4 on sm90/sm100"),
            id="fa4",
        ),
    ],
)
def test_packed_attention_compiles_into_one_graph_with_the_eager_values(attention_forward) -> None:
    """The varlen path (built-in FA2, or FA4's custom ops through their fake shapes) inside a
    compiled layer makes no graph break (fullgraph) and gives the eager outputs and gradients,
    for two rows of different lengths (dynamic shapes)."""

    def packed(q, k, v, position_ids, cu, max_len):
        out, _ = attention_forward(
            None, q, k, v, None, position_ids=position_ids, cu_seq_lens_q=cu, max_length_q=max_len
        )
        return out

    compiled = torch.compile(packed, fullgraph=True, dynamic=True)
    for lengths in ([5, 130, 64], [200, 3, 77, 90]):
        cu = torch.tensor([0, *lengths], device="cuda").cumsum(0).to(torch.int32)
        total = sum(lengths)
        position_ids = torch.cat([torch.arange(n) for n in lengths]).cuda()[None]
        shapes = [(1, 4, total, 64), (1, 2, total, 64), (1, 2, total, 64)]  # GQA: 4 q, 2 kv heads
        inputs = [torch.randn(s, device="cuda", dtype=torch.bfloat16) for s in shapes]
        results = []
        for fn in (packed, compiled):
            leaves = [t.clone().requires_grad_() for t in inputs]
            out = fn(*leaves, position_ids, cu, max(lengths))
            out.float().square().sum().backward()
            results.append([out, *(t.grad for t in leaves)])
        for eager, traced in zip(*results, strict=True):
            torch.testing.assert_close(traced, eager, rtol=2e-2, atol=2e-2)


def test_compiled_blocks_give_the_eager_loss() -> None:
    module = micro_module().cuda().eval()
    batch = _on_cuda(make_batch(module, packing=True))
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        eager = module(batch)[0].float()
        module.model.compile_blocks()
        assert module.model.blocks_compiled
        compiled = module(batch)[0].float()
    torch.testing.assert_close(compiled, eager, rtol=1e-2, atol=1e-2)


def test_1_5b_smoke_step_fits_at_its_micro_batch() -> None:
    """The benchmark's 1.5B-class MLP row (CLIP-L/336 sizes, random weights) trains a step at
    micro-batch 16 within the card's memory, and its weights stay finite."""
    from benchmarks.train_throughput.rows import make_trainee
    from benchmarks.train_throughput.sizes import REAL
    from benchmarks.train_throughput.stream import SampleStream

    device = torch.device("cuda")
    torch.cuda.reset_peak_memory_stats(device)
    trainee = make_trainee("mlp", "1.5b", REAL, device)
    try:
        vocab = int(REAL.decoders["1.5b"]["vocab_size"])
        batch = trainee.collate(SampleStream(REAL, 0, (16, vocab - 16)).batch(0, 16, warmup=False))
        trainee.step(batch)
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        assert peak < torch.cuda.get_device_properties(device).total_memory
        trained = [p for p in trainee.module.parameters() if p.requires_grad]
        assert trained and all(bool(torch.isfinite(p).all()) for p in trained)
        print(f"1.5B MLP step at micro-batch 16: peak {peak / 2**30:.1f} GiB")
    finally:
        trainee.close()
