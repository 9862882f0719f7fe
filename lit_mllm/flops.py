"""Model FLOPs of one training step and the peak FLOP/s of the device: the two halves of MFU.

MFU = (model FLOPs per optimiser step) / (step time) / (peak dense FLOP/s of one device).

*Model* FLOPs count the matmuls the model needs, not what the hardware executes: activation
recomputation (gradient checkpointing), padding tokens and the frozen encoder's backward (there
is none: it runs under ``no_grad``) are not counted, so padding waste and recomputation show up
as lower MFU, as in the PaLM paper (Chowdhery et al. 2022, appendix B).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from lit_mllm.tokens import IGNORE_INDEX

Convention = Literal["6N", "executed"]

# Dense (no sparsity) tensor-core peak per device, FLOP/s: (bf16/fp16, tf32, fp32).
# Matched in order against the lower-cased ``torch.cuda.get_device_name()``; the first hit wins,
# so more specific names come first. Sources: NVIDIA data sheets (H100/H200/A100/L4/L40S).
PEAK_FLOPS: tuple[tuple[str, tuple[float, float, float]], ...] = (
    ("h100 pcie", (756e12, 378e12, 51.2e12)),
    ("h100", (989e12, 495e12, 66.9e12)),  # SXM: "NVIDIA H100 80GB HBM3"
    ("h200", (989e12, 495e12, 66.9e12)),  # also matches GH200 (an H100-class GPU)
    ("h800", (989e12, 495e12, 66.9e12)),
    ("a100", (312e12, 156e12, 19.5e12)),
    ("a800", (312e12, 156e12, 19.5e12)),
    ("l40s", (362e12, 183e12, 91.6e12)),
    ("l40", (181e12, 90.5e12, 90.5e12)),
    ("l4", (121e12, 60e12, 30.3e12)),
)


@dataclass(frozen=True)
class FlopsSpec:
    """Static sizes of the three parts; per-batch quantities are arguments of ``step_flops``.

    ``decoder_body_params`` excludes the input embedding (a lookup, no FLOPs) and the LM head,
    which is counted separately because the model applies it to supervised positions only.
    ``*_trainable_params`` are used by the ``"executed"`` convention only.
    """

    encoder_params: int
    encoder_layers: int
    encoder_width: int
    encoder_prefix_tokens: int
    connector_params: int
    connector_queries: int  # cross-attention queries (resampler); 0 for an MLP projector
    connector_width: int
    decoder_body_params: int
    decoder_head_params: int
    decoder_layers: int
    decoder_attn_dim: int  # num_attention_heads * head_dim (= hidden size in most models)
    decoder_body_trainable_params: int = -1
    decoder_head_trainable_params: int = -1


def step_flops(
    spec: FlopsSpec,
    *,
    num_images: int = 0,
    patches_per_image: int = 0,
    view_patches: Sequence[int] = (),
    sample_lengths: Sequence[int],
    supervised_tokens: int,
    convention: Convention = "6N",
) -> float:
    """Model FLOPs of one forward+backward pass over one micro-batch.

    Images of one size are ``num_images`` x ``patches_per_image``; the views of sliced images
    (thumbnails and slices, each at its own patch grid) add one entry per view to
    ``view_patches``. The encoder and connector terms below are summed over all of them.

    With ``n`` images of ``P`` patches (``T = P + prefix`` encoder tokens), decoder samples of
    lengths ``S_i`` (image tokens included, padding excluded; packed rows count each sample
    separately), ``T_sup`` supervised tokens, and ``N_*`` parameter counts::

        encoder   (forward only)  n * (2 * N_enc * T  +  4 * L_enc * D_enc * T^2)
        connector (fwd + bwd)     n * (6 * N_conn * P  +  12 * Q * P * D_conn)
        decoder   (fwd + bwd)     6 * N_body * sum(S_i)  +  12 * L_dec * D_attn * sum(S_i^2)
        LM head   (fwd + bwd)     6 * N_head * T_sup

    ``2N`` per token is one forward matmul pass (a multiply and an add per weight); backward
    costs ``2N`` for activation gradients plus ``2N`` for weight gradients, hence ``6N``.
    Attention adds ``QK^T`` and ``AV`` (``2 * 2 * S * D`` per token and layer forward, ``x3`` with
    backward), without the causal halving, following PaLM. The connector term ``6 * N_conn * P``
    is exact for the MLP projector and an upper bound for the resampler, whose query-side
    weights see ``Q < P`` rows.

    Convention ``"6N"`` (default, the standard one) charges ``6N`` for every decoder weight, frozen
    or not, so MFU stays comparable across freezing recipes. ``"executed"`` charges frozen
    decoder weights ``4N`` (their weight gradients are never computed): ``(4 N + 2 N_trainable)``.
    """
    if convention not in ("6N", "executed"):
        raise ValueError(f"convention must be '6N' or 'executed', got {convention!r}")
    patches = [int(patches_per_image)] * int(num_images) + [int(p) for p in view_patches]
    encoder = connector = 0
    for p in patches:
        t = p + spec.encoder_prefix_tokens
        encoder += 2 * spec.encoder_params * t + 4 * spec.encoder_layers * spec.encoder_width * t**2
        connector += (
            6 * spec.connector_params * p + 12 * spec.connector_queries * p * spec.connector_width
        )
    tokens = sum(int(s) for s in sample_lengths)
    tokens_sq = sum(int(s) ** 2 for s in sample_lengths)
    body, head = spec.decoder_body_params, spec.decoder_head_params
    if convention == "6N":
        body_factor, head_factor = 6 * body, 6 * head
    else:
        body_trainable = max(spec.decoder_body_trainable_params, 0)
        head_trainable = max(spec.decoder_head_trainable_params, 0)
        body_factor = 4 * body + 2 * body_trainable
        head_factor = 4 * head + 2 * head_trainable
    decoder = (
        body_factor * tokens
        + 12 * spec.decoder_layers * spec.decoder_attn_dim * tokens_sq
        + head_factor * int(supervised_tokens)
    )
    return float(encoder + connector + decoder)


def sample_lengths(batch: Mapping[str, Any]) -> list[int]:
    """Real (unpadded) length of every sample: packed rows are split at their boundaries.

    Uses the collator's ``sample_lengths`` (host integers: no sync) when present, else
    ``cu_seqlens``, else the attention mask (right padding), else the restarts of
    ``position_ids`` at 0, else the full row width.
    """
    if batch.get("sample_lengths") is not None:
        return [int(n) for n in batch["sample_lengths"]]
    cu = batch.get("cu_seqlens")
    if cu is not None:
        return torch.diff(torch.as_tensor(cu)).tolist()
    mask = batch.get("attention_mask")
    if mask is not None:
        return mask.sum(dim=-1).tolist()
    input_ids = batch["input_ids"]
    positions = batch.get("position_ids")
    if positions is None:
        return [int(input_ids.shape[1])] * int(input_ids.shape[0])
    lengths: list[int] = []
    for row in positions:
        starts = (row == 0).nonzero().flatten().tolist() + [len(row)]
        lengths.extend(b - a for a, b in zip(starts[:-1], starts[1:], strict=True))
    return lengths


def supervised_token_count(labels: torch.Tensor) -> torch.Tensor:
    """Positions that carry a loss after the next-token shift (stays on device, no sync)."""
    return (labels[:, 1:] != IGNORE_INDEX).sum()


def _numel(params: Any, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in params if p.requires_grad or not trainable_only)


def spec_from_model(model: nn.Module) -> FlopsSpec:
    """Read the sizes from a ``MultimodalLM`` (``encoder``/``connector``/``decoder``)."""
    encoder, connector, decoder = model.encoder, model.connector, model.decoder
    timm_model = getattr(encoder, "model", encoder)
    blocks = getattr(timm_model, "blocks", None)
    text_cfg = decoder.config.get_text_config()
    heads = int(text_cfg.num_attention_heads)
    head_dim = getattr(text_cfg, "head_dim", None) or text_cfg.hidden_size // heads
    embedding = decoder.get_input_embeddings().weight
    head = decoder.get_output_embeddings()
    head_weight = head.weight if head is not None else embedding
    skip = {id(embedding), id(head_weight)}
    body = [p for p in decoder.parameters() if id(p) not in skip]
    return FlopsSpec(
        encoder_params=_numel(encoder.parameters()),
        encoder_layers=len(blocks) if blocks is not None else 0,
        encoder_width=int(getattr(encoder, "embed_dim", 0) or 0),
        encoder_prefix_tokens=int(getattr(encoder, "num_prefix_tokens", 0) or 0),
        connector_params=_numel(connector.parameters()),
        connector_queries=int(getattr(connector, "num_queries", 0) or 0),
        connector_width=int(getattr(connector, "embed_dim", 0) or 0),
        decoder_body_params=_numel(body),
        decoder_head_params=head_weight.numel(),
        decoder_layers=int(text_cfg.num_hidden_layers),
        decoder_attn_dim=heads * int(head_dim),
        decoder_body_trainable_params=_numel(body, trainable_only=True),
        decoder_head_trainable_params=head_weight.numel() if head_weight.requires_grad else 0,
    )


def peak_flops(device_name: str | None, precision: str = "bf16-mixed") -> float | None:
    """Dense peak FLOP/s of one device for a Lightning precision string; None when unknown.

    bf16/fp16 precisions use the tensor-core half-precision peak; ``32*`` uses TF32 when
    ``torch.get_float32_matmul_precision()`` allows it, else plain FP32. CPUs are unknown.
    """
    if not device_name:
        return None
    name = device_name.lower()
    for key, (half, tf32, fp32) in PEAK_FLOPS:
        if key in name:
            if "16" in str(precision):
                return half
            return tf32 if torch.get_float32_matmul_precision() != "highest" else fp32
    return None
