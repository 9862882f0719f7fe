"""The collator's TokenLayout: exact positions, and the sync-free forward it enables gives the
same loss and gradients as the forward that finds those positions on the device."""

from __future__ import annotations

import pytest
import torch
from micro import MICRO_DECODER
from test_model import make_batch, micro_module

from lit_mllm.data.collate import pack, pad
from lit_mllm.models import attention
from lit_mllm.models.token_layout import TokenLayout
from lit_mllm.tokens import IGNORE_INDEX

PATCH = 7
X = IGNORE_INDEX


def _sequences() -> list[tuple[torch.Tensor, torch.Tensor]]:
    # sample 0: <p> <p> a b (b supervised), sample 1: <p> c d e (d, e supervised)
    return [
        (torch.tensor([PATCH, PATCH, 1, 2]), torch.tensor([X, X, X, 2])),
        (torch.tensor([PATCH, 3, 4, 5]), torch.tensor([X, X, 4, 5])),
    ]


def test_layout_of_a_padded_batch_names_every_position() -> None:
    batch = pad(_sequences()[:1] + [(torch.tensor([PATCH, 9]), torch.tensor([X, 9]))], 0)
    layout = TokenLayout.of(batch["input_ids"], batch["labels"], PATCH)
    # rows of width 4: row 0 = positions 0-3, row 1 = 4-7 (the pad is at 6-7)
    assert layout.image_slots.tolist() == [0, 1, 4]
    assert layout.supervised.tolist() == [2, 4]  # hidden states that predict 2 and 9
    assert layout.targets.tolist() == [2, 9]
    assert layout.cu_seqlens is None and layout.max_seqlen == 0
    assert layout.num_supervised == 2 and layout.num_image_slots == 3


def test_layout_of_a_packed_row_never_crosses_samples() -> None:
    batch = pack(_sequences(), 0)
    layout = TokenLayout.of(batch["input_ids"], batch["labels"], PATCH, batch["cu_seqlens"])
    assert layout.image_slots.tolist() == [0, 1, 4]
    # position 3 (sample 0's last token) predicts nothing: the next label is sample 1's
    # first, which is IGNORE_INDEX, as every sample's first label is
    assert layout.supervised.tolist() == [2, 5, 6]
    assert layout.targets.tolist() == [2, 4, 5]
    assert layout.cu_seqlens.tolist() == [0, 4, 8] and layout.max_seqlen == 4


def test_layout_moves_with_its_tensors() -> None:
    batch = pack(_sequences(), 0)
    layout = TokenLayout.of(batch["input_ids"], batch["labels"], PATCH, batch["cu_seqlens"])
    moved = layout.to("meta")
    assert {t.device.type for t in (moved.image_slots, moved.supervised, moved.cu_seqlens)} == {
        "meta"
    }
    assert moved.max_seqlen == 4


def _loss_and_grads(module, batch) -> tuple[torch.Tensor, torch.Tensor]:
    module.zero_grad()
    loss, count = module(batch, reduction="sum")
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in module.parameters() if p.grad is not None])
    return torch.stack([loss.detach(), count.to(loss.dtype)]), grads


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_forward_with_the_collators_layout_equals_the_forward_without(packing: bool) -> None:
    decoder = {**MICRO_DECODER, "attn_implementation": attention.VARLEN_ATTENTION}
    module = micro_module(decoder=decoder).double()
    with_layout = make_batch(module, packing=packing, layout=True)
    without = make_batch(module, packing=packing)
    assert "layout" in with_layout and "layout" not in without
    pixels = with_layout["pixel_values"].double()
    with_layout["pixel_values"] = without["pixel_values"] = pixels
    loss_a, grads_a = _loss_and_grads(module, without)
    loss_b, grads_b = _loss_and_grads(module, with_layout)
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grads_b, grads_a, rtol=1e-10, atol=1e-12)


def test_packed_layout_hands_its_segments_to_every_layer(monkeypatch) -> None:
    """With the layout, no layer derives the segments from the position ids (a host sync on
    CUDA): each gets the collator's cu_seqlens."""
    derived = []
    real = attention.packed_segments
    monkeypatch.setattr(attention, "packed_segments", lambda p: derived.append(1) or real(p))
    seen = []
    real_kernel = attention.reference_varlen

    def recording(q, k, v, cu, max_len, *args, **kwargs):
        seen.append((cu.tolist(), max_len))
        return real_kernel(q, k, v, cu, max_len, *args, **kwargs)

    monkeypatch.setattr(attention, "reference_varlen", recording)
    decoder = {**MICRO_DECODER, "attn_implementation": attention.VARLEN_ATTENTION}
    module = micro_module(decoder=decoder).eval()
    batch = make_batch(module, packing=True, layout=True)
    with torch.no_grad():
        module(batch)
    cu = batch["cu_seqlens"]
    longest = int((cu[1:] - cu[:-1]).max())
    assert derived == []
    assert seen == [(cu.tolist(), longest)] * MICRO_DECODER["config"]["num_hidden_layers"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_training_forward_and_backward_make_no_host_sync_on_cuda() -> None:
    """CUDA: with the collator's layout, forward (encoder, splice, varlen decoder, gather, loss)
    and backward queue kernels without waiting for the GPU once."""
    decoder = {**MICRO_DECODER, "attn_implementation": attention.VARLEN_ATTENTION}
    module = micro_module(decoder=decoder).cuda()
    batch = make_batch(module, packing=True, layout=True)
    batch = {k: v.to("cuda") if hasattr(v, "to") else v for k, v in batch.items()}
    with torch.autocast("cuda", dtype=torch.bfloat16):
        module(batch)[0].backward()  # warm-up: lazy initialisations may sync once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, _ = module(batch, reduction="sum")
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss).item()
