"""``attn_implementation: lit_varlen_fa4``: packed rows through FlashAttention-4. CPU tests check
the errors a user sees and the CPU path; GPU tests (``pytest -m gpu``) check FA4 against the
built-in varlen kernel where flash-attn-4 is installed on a Hopper/Blackwell GPU (its fullgraph
compile: ``test_gpu.py::test_packed_attention_compiles_into_one_graph_with_the_eager_values``)."""

from __future__ import annotations

import pytest
import torch
from test_model import MICRO_DECODER, make_batch, micro_module

from lit_mllm.errors import UsageError
from lit_mllm.models import attention, fa4_varlen

FA4_READY = (
    torch.cuda.is_available()
    and torch.cuda.get_device_capability()[0] in fa4_varlen.FA4_CAPABILITIES
    and fa4_varlen.fa4_installed()
)
VARLEN = {**MICRO_DECODER, "attn_implementation": attention.VARLEN_ATTENTION}
VARLEN_FA4 = {**MICRO_DECODER, "attn_implementation": attention.VARLEN_FA4_ATTENTION}


def test_a_cpu_is_named() -> None:
    problem = fa4_varlen.fa4_problem(torch.device("cpu"))
    assert problem == "FlashAttention-4 runs on CUDA GPUs only, not on cpu"


def test_an_older_gpu_is_named_by_its_architecture(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    problem = fa4_varlen.fa4_problem(torch.device("cuda"))
    assert problem == "FlashAttention-4 needs a Hopper or Blackwell GPU; cuda is sm80"


def test_a_missing_package_names_the_module_and_how_to_install_it(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(fa4_varlen, "fa4_installed", lambda: False)
    problem = fa4_varlen.fa4_problem(torch.device("cuda"))
    assert "flash_attn.cute.interface" in problem and "pip install flash-attn-4" in problem


def test_the_model_refuses_fa4_on_a_gpu_without_it_before_any_layer_runs(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(fa4_varlen, "fa4_installed", lambda: False)
    module = micro_module(decoder=VARLEN_FA4)
    with pytest.raises(UsageError, match="decoder.attn_implementation lit_varlen_fa4: Flash"):
        module.model.check_kernels(torch.device("cuda"))
    micro_module(decoder=VARLEN).model.check_kernels(torch.device("cuda"))  # no FA4


def test_on_a_cpu_it_trains_like_lit_varlen() -> None:
    """Off CUDA both names take the same batched reference path: equal loss and gradients."""
    results = []
    for decoder in (VARLEN, VARLEN_FA4):
        module = micro_module(decoder=decoder)
        batch = make_batch(module, packing=True)
        assert batch["attention_mask"] is None
        loss, _ = module(batch)
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in module.parameters() if p.grad is not None])
        results.append((loss.detach(), grads))
    torch.testing.assert_close(results[1][0], results[0][0])
    torch.testing.assert_close(results[1][1], results[0][1])


def _varlen_outputs(kernel, lengths: list[int]) -> list[torch.Tensor]:
    """Output and q/k/v gradients of one packed row (GQA: 8 q / 2 kv heads, head dim 128,
    bf16) from fixed random inputs."""
    generator = torch.Generator(device="cuda").manual_seed(0)
    total = sum(lengths)
    cu = torch.tensor([0, *lengths], device="cuda").cumsum(0).to(torch.int32)
    shapes = [(total, 8, 128), (total, 2, 128), (total, 2, 128)]
    leaves = [
        torch.randn(s, device="cuda", dtype=torch.bfloat16, generator=generator).requires_grad_()
        for s in shapes
    ]
    out = kernel(*leaves, cu, max(lengths), 128**-0.5)
    weights = torch.randn(out.shape, device="cuda", dtype=torch.float32, generator=generator)
    (out.float() * weights).sum().backward()
    return [out.detach(), *(t.grad for t in leaves)]


@pytest.mark.gpu
@pytest.mark.skipif(not FA4_READY, reason="needs a Hopper/Blackwell GPU with flash-attn-4")
def test_fa4_matches_the_builtin_varlen_kernel_on_packed_segments() -> None:
    lengths = [642, 1215, 7, 900, 128, 333]
    builtin = _varlen_outputs(attention.flash_varlen, lengths)
    fa4 = _varlen_outputs(fa4_varlen.fa4_varlen, lengths)
    for name, a, b in zip(("out", "dq", "dk", "dv"), builtin, fa4, strict=True):
        error = float((b.float() - a.float()).norm() / a.float().norm())
        assert error < 2e-2, (name, error)


@pytest.mark.gpu
@pytest.mark.skipif(not FA4_READY, reason="needs a Hopper/Blackwell GPU with flash-attn-4")
def test_compiled_layers_with_fa4_train_like_lit_varlen() -> None:
    """The micro model's packed batch through compiled decoder layers in bf16: the same loss
    and gradients as with the built-in varlen kernel."""
    results = []
    for decoder in (VARLEN, VARLEN_FA4):
        module = micro_module(decoder=decoder).cuda()
        module.model.compile_blocks()
        batch = make_batch(module, packing=True)
        batch = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, _ = module(batch)
        loss.backward()
        grads = [p.grad.flatten() for p in module.parameters() if p.grad is not None]
        results.append((loss.detach().float(), torch.cat(grads).float()))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-2, atol=1e-2)
    assert float((grads_b - grads_a).norm() / grads_a.norm()) < 0.05


def test_the_custom_ops_trace_into_one_graph_with_their_fake_shapes() -> None:
    """AOT autograd traces forward and backward through the ops' fake versions (fullgraph, no
    break); running the graph on a CPU then stops at the kernel call with the one-line error."""
    lengths = [3, 5]
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)

    def loss(q, k, v):
        return fa4_varlen.fa4_varlen(q, k, v, cu, max(lengths), 0.25).float().sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    q = torch.randn(8, 4, 16, dtype=torch.bfloat16, requires_grad=True)
    kv = [torch.randn(8, 2, 16, dtype=torch.bfloat16, requires_grad=True) for _ in range(2)]
    with pytest.raises(UsageError, match="lit_varlen_fa4: FlashAttention-4 runs on CUDA GPUs only"):
        compiled(q, *kv)
