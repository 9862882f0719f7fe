"""Model FLOPs formula: a hand-computed case, batch lengths, and parity with torch's counter."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from lit_mllm.flops import (
    FlopsSpec,
    peak_flops,
    sample_lengths,
    spec_from_model,
    step_flops,
    supervised_token_count,
)

SPEC = FlopsSpec(
    encoder_params=10,
    encoder_layers=1,
    encoder_width=2,
    encoder_prefix_tokens=1,
    connector_params=3,
    connector_queries=2,
    connector_width=4,
    decoder_body_params=5,
    decoder_head_params=7,
    decoder_layers=2,
    decoder_attn_dim=3,
    decoder_body_trainable_params=0,
    decoder_head_trainable_params=0,
)


def test_step_flops_by_hand():
    # 2 images, 4 patches + 1 prefix = 5 encoder tokens; samples of 3 and 4 tokens; 2 supervised
    # encoder   2 * (2*10*5 + 4*1*2*5^2)           = 600
    # connector 2 * (6*3*4 + 12*2*4*4)             = 912
    # decoder   6*5*7 + 12*2*3*(3^2 + 4^2) + 6*7*2 = 210 + 1800 + 84 = 2094
    kwargs = {"num_images": 2, "patches_per_image": 4, "sample_lengths": [3, 4]}
    assert step_flops(SPEC, **kwargs, supervised_tokens=2) == 600 + 912 + 2094
    # frozen decoder, "executed": 4N instead of 6N for body and head -> 140 + 1800 + 56
    executed = step_flops(SPEC, **kwargs, supervised_tokens=2, convention="executed")
    assert executed == 600 + 912 + 1996
    with pytest.raises(ValueError, match="convention"):
        step_flops(SPEC, **kwargs, supervised_tokens=2, convention="8N")


def test_views_of_several_sizes_are_charged_each_at_its_own_grid():
    """Sliced images: one term per view, T = P + prefix per view (4 and 9 patches here)."""
    text = {"sample_lengths": [3], "supervised_tokens": 0}
    decoder = step_flops(SPEC, **text)
    # encoder 2*10*5 + 4*1*2*25 = 300 and 2*10*10 + 4*1*2*100 = 1000
    # connector 6*3*4 + 12*2*4*4 = 456 and 6*3*9 + 12*2*9*4 = 1026
    views = step_flops(SPEC, view_patches=[4, 9], **text)
    assert views - decoder == 300 + 1000 + 456 + 1026
    same = step_flops(SPEC, num_images=2, patches_per_image=4, **text)
    assert step_flops(SPEC, view_patches=[4, 4], **text) == same
    assert step_flops(SPEC, num_images=1, patches_per_image=4, view_patches=[4], **text) == same


def test_packing_counts_attention_per_sample():
    """One packed row of 3+4 tokens costs what two padded rows cost, not a 7-token sequence."""
    packed = step_flops(
        SPEC, num_images=0, patches_per_image=0, sample_lengths=[3, 4], supervised_tokens=0
    )
    single = step_flops(
        SPEC, num_images=0, patches_per_image=0, sample_lengths=[7], supervised_tokens=0
    )
    assert single - packed == 12 * 2 * 3 * (49 - 25)


def test_sample_lengths_from_batches():
    padded = {
        "input_ids": torch.zeros(2, 5),
        "attention_mask": torch.tensor([[1] * 5, [1] * 3 + [0] * 2]),
    }
    assert sample_lengths(padded) == [5, 3]
    packed = {
        "input_ids": torch.zeros(1, 9),
        "attention_mask": None,
        "position_ids": torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]]),
        "cu_seqlens": torch.tensor([0, 3, 5, 9], dtype=torch.int32),
    }
    assert sample_lengths(packed) == [3, 2, 4]
    del packed["cu_seqlens"]
    assert sample_lengths(packed) == [3, 2, 4]
    assert sample_lengths({"input_ids": torch.zeros(2, 6)}) == [6, 6]
    labels = torch.tensor([[-100, 5, 6, -100], [-100, -100, -100, 7]])
    assert int(supervised_token_count(labels)) == 3  # the first column is never a target


def test_peak_flops_table():
    assert peak_flops("NVIDIA H100 80GB HBM3", "bf16-mixed") == 989e12
    assert peak_flops("NVIDIA H100 PCIe", "bf16-true") == 756e12
    assert peak_flops("NVIDIA A100-SXM4-80GB", "16-mixed") == 312e12
    assert peak_flops("NVIDIA L40S", "bf16-mixed") == 362e12
    assert peak_flops("NVIDIA L4", "bf16-mixed") == 121e12
    assert peak_flops(None, "bf16-mixed") is None
    assert peak_flops("Some CPU", "32-true") is None
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert peak_flops("NVIDIA H200", "32-true") == 66.9e12
        torch.set_float32_matmul_precision("high")
        assert peak_flops("NVIDIA H200", "32-true") == 495e12
    finally:
        torch.set_float32_matmul_precision(previous)


def _micro_module():
    from tests.test_model import micro_module

    return micro_module()


def test_spec_from_micro_model():
    module = _micro_module()
    spec = spec_from_model(module.model)
    # qwen2 layer, hidden 64, 2 heads of 32, 1 kv head, MLP 128: q 64*64+64, k and v 64*32+32,
    # o 64*64, MLP 3*64*128, 2 RMSNorms of 64 -> 37120; 2 layers + final norm 64
    assert spec.decoder_body_params == 2 * 37120 + 64
    assert spec.decoder_head_params == len(module.tokenizer) * 64  # tied: counted once, as head
    assert spec.decoder_layers == 2 and spec.decoder_attn_dim == 64
    assert spec.encoder_layers == 2 and spec.encoder_width == 48
    assert spec.encoder_prefix_tokens == 1  # CLS
    assert spec.connector_queries == 4 and spec.connector_width == 64
    # micro ViT (timm, no head): patch conv 3*8*8*48 + 48, CLS 48, 17 positions x 48, 2 blocks of
    # (2 LayerNorms 4*48, qkv 48*144+144, proj 48*48+48, MLP 48*192+192 and 192*48+48), final
    # LayerNorm 2*48
    block = 4 * 48 + (48 * 144 + 144) + (48 * 48 + 48) + (48 * 192 + 192) + (192 * 48 + 48)
    assert spec.encoder_params == (3 * 64 * 48 + 48) + 48 + 17 * 48 + 2 * block + 2 * 48
    assert spec.decoder_body_trainable_params == spec.decoder_body_params


def _sdpa_forward(query, key, value, *args, out_shape=None, **kwargs) -> int:
    """QK^T and AV of the CPU SDPA kernel (torch's counter does not know it): 2*B*H*S*Sk*(d+dv)."""
    batch, heads, seq, dim = query
    return 2 * batch * heads * seq * key[2] * (dim + value[3])


def _sdpa_backward(grad, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return 2 * _sdpa_forward(query, key, value)


def test_matches_torch_flop_counter():
    """torch's FLOP counter over a real forward+backward of the micro model is the reference.

    The hardware computes padding, so the estimate uses the padded row width here. Exact where
    the formula is exact: attention (QK^T and AV of every SDPA call, forward and backward) and
    the LM head (6*V*D per supervised token: the loss applies it to those positions only). The
    frozen encoder runs forward only and its estimate is within 5 % above the counter: the
    formula charges every encoder parameter (CLS, position table, norms, biases) as a matmul
    weight on every token. The whole step is within 10 % above the counter, for the same reason
    in the connector and decoder (and the resampler's query-side weights see Q < P rows); the
    formula never counts less than torch does.
    """
    from tests.test_model import make_batch

    module = _micro_module()
    batch = make_batch(module)
    spec = spec_from_model(module.model)
    rows, width = batch["input_ids"].shape
    kwargs = {
        "num_images": batch["pixel_values"].shape[0],
        "patches_per_image": 16,  # 32px / patch 8 -> 4x4
        "sample_lengths": [width] * rows,
        "supervised_tokens": int(supervised_token_count(batch["labels"])),
    }
    estimate = step_flops(spec, **kwargs)
    no_attention = replace(spec, encoder_layers=0, connector_queries=0, decoder_layers=0)
    attention_estimate = estimate - step_flops(no_attention, **kwargs)
    encoder_only = replace(
        spec,
        connector_params=0,
        connector_queries=0,
        decoder_body_params=0,
        decoder_head_params=0,
        decoder_layers=0,
    )
    encoder_estimate = step_flops(encoder_only, **kwargs)

    aten = torch.ops.aten
    mapping = {
        aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_forward,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_backward,
    }
    module.train()
    counter = FlopCounterMode(display=False, custom_mapping=mapping)
    with counter:
        loss, _ = module(batch)
        loss.backward()
    measured = counter.get_total_flops()
    counts = counter.get_flop_counts()
    by_op = {str(op): n for op, n in counts["Global"].items()}
    measured_attention = sum(n for op, n in by_op.items() if "attention" in op)
    assert measured_attention == attention_estimate
    model = f"{type(module).__name__}.model"
    measured_head = sum(counts[f"{model}.decoder.lm_head"].values())
    assert measured_head == 6 * spec.decoder_head_params * kwargs["supervised_tokens"]
    measured_encoder = sum(counts[f"{model}.encoder"].values())
    assert 1.0 <= encoder_estimate / measured_encoder < 1.05, (encoder_estimate, measured_encoder)
    assert 1.0 <= estimate / measured < 1.1, (estimate, measured)
