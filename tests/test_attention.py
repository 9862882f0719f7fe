"""Varlen attention for packed rows (lit_mllm.models.attention) against per-sample SDPA."""

from __future__ import annotations

import inspect

import pytest
import torch
from micro import MICRO_DECODER

from lit_mllm.models import attention
from tests.test_model import make_batch, micro_module


def test_packed_segments_are_exact_and_computed_once_per_forward() -> None:
    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])
    cu, longest = attention.packed_segments(positions)
    assert cu.tolist() == [0, 3, 5, 9] and cu.dtype == torch.int32 and longest == 4
    assert attention.packed_segments(positions)[0] is cu  # cached for the same tensor object
    other = torch.tensor([[0, 1, 0, 1, 2, 3, 4, 0, 1]])
    assert attention.packed_segments(other)[0].tolist() == [0, 2, 7, 9]


def test_reference_varlen_matches_per_sample_sdpa_with_gqa() -> None:
    torch.manual_seed(0)
    q, k, v = torch.randn(9, 4, 8), torch.randn(9, 2, 8), torch.randn(9, 2, 8)
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    out = attention.reference_varlen(q, k, v, cu, 5, 8**-0.5)
    for a, b in ((0, 4), (4, 9)):
        qs = q[a:b].transpose(0, 1)
        ks = k[a:b].transpose(0, 1).repeat_interleave(2, dim=0)
        vs = v[a:b].transpose(0, 1).repeat_interleave(2, dim=0)
        scores = (qs @ ks.transpose(-1, -2)) * 8**-0.5
        causal = torch.ones(b - a, b - a, dtype=torch.bool).tril()
        expected = scores.masked_fill(~causal, float("-inf")).softmax(-1) @ vs
        torch.testing.assert_close(out[a:b], expected.transpose(0, 1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("kernel", ["batched", "looped"])
def test_cpu_segment_attention_gradients_match_per_segment_sdpa(kernel: str, causal: bool) -> None:
    """Both CPU paths against plain per-segment SDPA calls, values and gradients, with a
    one-token segment and GQA."""
    torch.manual_seed(1)
    cu = torch.tensor([0, 1, 6, 8, 15], dtype=torch.int32)
    q = torch.randn(15, 4, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(15, 2, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(15, 2, 8, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(15, 4, 8, dtype=torch.float64)
    k4, v4 = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    if kernel == "batched":
        out = attention.batched_segment_attention(q, k4, v4, cu, 7, 0.3, causal)
    else:
        out = attention.looped_segment_attention(q, k4, v4, cu, 0.3, causal)
    grads = torch.autograd.grad((out * weights).sum(), (q, k, v))
    expected = torch.cat(
        [
            torch.nn.functional.scaled_dot_product_attention(
                q[a:b].transpose(0, 1),
                k[a:b].transpose(0, 1).repeat_interleave(2, dim=0),
                v[a:b].transpose(0, 1).repeat_interleave(2, dim=0),
                is_causal=causal,
                scale=0.3,
            ).transpose(0, 1)
            for a, b in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True)
        ]
    )
    expected_grads = torch.autograd.grad((expected * weights).sum(), (q, k, v))
    torch.testing.assert_close(out, expected)
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize(
    ("lengths", "batched"),
    [([60, 70, 80, 55], True), ([145, 10, 10, 10], False)],  # captions; a long view + short ones
)
def test_reference_varlen_pads_only_segments_of_similar_length(
    monkeypatch, lengths: list[int], batched: bool
) -> None:
    calls = []
    for name in ("batched_segment_attention", "looped_segment_attention"):
        real = getattr(attention, name)
        monkeypatch.setattr(
            attention, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a)
        )
    total = sum(lengths)
    cu = torch.tensor([0, *lengths]).cumsum(0).to(torch.int32)
    q, kv = torch.randn(total, 2, 4), torch.randn(total, 1, 4)
    attention.reference_varlen(q, kv, kv, cu, max(lengths), 0.5)
    assert calls == ["batched_segment_attention" if batched else "looped_segment_attention"]


@pytest.mark.skipif(attention.TORCH_VARLEN is None, reason="torch without nn.attention.varlen")
def test_flash_varlen_passes_arguments_the_torch_kernel_accepts(monkeypatch) -> None:
    real = attention.TORCH_VARLEN.fn
    seen = {}

    def fake(*args, **kwargs):
        inspect.signature(real).bind(*args, **kwargs)  # raises on an unknown/missing argument
        seen.update(kwargs)
        return args[0]

    fake.__signature__ = inspect.signature(real)  # what flash_varlen reads to pick arguments
    monkeypatch.setattr(attention, "TORCH_VARLEN", attention.varlen_kernel_of(fake))
    q, kv = torch.zeros(6, 4, 8), torch.zeros(6, 2, 8)
    attention.flash_varlen(q, kv, kv, torch.tensor([0, 6], dtype=torch.int32), 6, 0.5)
    assert seen["scale"] == 0.5
    assert seen.get("window_size") == (-1, 0) or seen.get("is_causal") is True
    seen.clear()  # the encoder's packed views: full attention inside each segment
    attention.flash_varlen(q, kv, kv, torch.tensor([0, 6], dtype=torch.int32), 6, 0.5, causal=False)
    assert seen.get("window_size") == (-1, -1) or seen.get("is_causal") is False


@pytest.mark.parametrize("native_gqa", [True, False])
def test_flash_varlen_repeats_key_heads_only_for_a_kernel_without_gqa(
    monkeypatch, native_gqa
) -> None:
    seen = {}

    def with_gqa(q, k, v, cu_q, cu_k, max_q, max_k, *, scale, is_causal, enable_gqa=False):
        seen.update(k_heads=k.shape[1], v_heads=v.shape[1], enable_gqa=enable_gqa)
        return q

    def without_gqa(q, k, v, cu_q, cu_k, max_q, max_k, *, scale, is_causal):  # torch 2.10, 2.11
        seen.update(k_heads=k.shape[1], v_heads=v.shape[1], enable_gqa=False)
        torch.testing.assert_close(k[:, 0::3], k[:, 2::3])  # each key head 3 times in a row
        return q

    kernel = attention.varlen_kernel_of(with_gqa if native_gqa else without_gqa)
    monkeypatch.setattr(attention, "TORCH_VARLEN", kernel)
    q, kv = torch.zeros(6, 6, 8), torch.randn(6, 2, 8)
    attention.flash_varlen(q, kv, kv, torch.tensor([0, 6], dtype=torch.int32), 6, 0.5)
    heads = 2 if native_gqa else 6
    assert seen == {"k_heads": heads, "v_heads": heads, "enable_gqa": native_gqa}


def test_varlen_attention_gives_the_block_diagonal_sdpa_loss() -> None:
    """A packed row under ``lit_varlen`` trains like transformers' SDPA with the block-diagonal
    mask it derives from the restarting position ids, and each sample only sees itself."""
    sdpa = micro_module().eval()
    decoder = {**MICRO_DECODER, "attn_implementation": attention.VARLEN_ATTENTION}
    varlen = micro_module(decoder=decoder).eval()
    varlen.load_state_dict(sdpa.state_dict())
    config = varlen.model.decoder.config
    assert config._attn_implementation == attention.VARLEN_ATTENTION
    batch = make_batch(sdpa, packing=True)  # one row, attention_mask None, 3 samples
    assert batch["attention_mask"] is None and len(batch["cu_seqlens"]) == 4
    with torch.no_grad():
        expected, _ = sdpa(batch)
        loss, _ = varlen(batch)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)

    model = varlen.model
    first = int(batch["cu_seqlens"][1])
    ids, positions = batch["input_ids"], batch["position_ids"]
    with torch.no_grad():
        full = model.hidden_states(model.embed(ids, batch["pixel_values"]), None, positions)
        alone = model.hidden_states(
            model.embed(ids[:, :first], batch["pixel_values"][:1]), None, positions[:, :first]
        )
    torch.testing.assert_close(full[:, :first], alone, rtol=1e-5, atol=1e-5)
