"""Batching: right-padding, or packing a whole micro-batch into one row with no padding.

Packed rows carry ``position_ids`` that restart at 0 for every sample and no attention mask:
transformers then derives a block-diagonal causal mask from the position ids (SDPA / eager /
flex) or uses variable-length kernels (flash-attention), so attention never crosses samples.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch

from lit_mllm.models.token_layout import TokenLayout
from lit_mllm.models.views import group_views
from lit_mllm.tokens import IGNORE_INDEX


class MLLMCollator:
    """Turns dataset items into a model batch.

    Items are dicts from ``MLLMDataset``; an item with a ``skipped`` key is a dropped sample
    whose reason is counted in ``batch["skipped"]`` so counts survive worker processes.
    With ``image_patch_id``, ``batch["layout"]`` carries the batch's ``TokenLayout`` (found
    here, on the CPU, so the model's forward needs no host sync).
    """

    def __init__(
        self,
        pad_token_id: int,
        *,
        packing: bool = False,
        pad_to_multiple_of: int = 1,
        image_patch_id: int | None = None,
    ) -> None:
        self.pad_token_id = pad_token_id
        self.packing = packing
        self.pad_to_multiple_of = pad_to_multiple_of
        self.image_patch_id = image_patch_id

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        skipped = Counter(item["skipped"] for item in items if "skipped" in item)
        items = [item for item in items if "skipped" not in item]
        batch: dict[str, Any] = {"skipped": dict(skipped), "batch_size": len(items)}
        if not items:
            return batch
        if any("pixel_views" in item for item in items):  # sliced images: views grouped by size
            views, first_views = [], []
            for item in items:
                item_views = item.get("pixel_views") or []
                first_views.append(len(views) if item_views else None)
                views.extend(item_views)
            batch["pixel_values"] = group_views(views) if views else None
            batch["first_views"] = first_views
        else:
            pixel_values = [
                item["pixel_values"] for item in items if item["pixel_values"] is not None
            ]
            batch["pixel_values"] = torch.cat(pixel_values) if pixel_values else None
        sequences = [(item["input_ids"], item["labels"]) for item in items]
        batch.update(
            pack(sequences, self.pad_token_id)
            if self.packing
            else pad(sequences, self.pad_token_id, self.pad_to_multiple_of)
        )
        if self.image_patch_id is not None:
            batch["layout"] = TokenLayout.of(
                batch["input_ids"], batch["labels"], self.image_patch_id, batch.get("cu_seqlens")
            )
        batch["sample_lengths"] = [len(ids) for ids, _ in sequences]  # host ints, for FLOPs
        for key in ("sample_id", "image_id", "references"):
            batch[key] = [item.get(key) for item in items]
        if all("prompt_ids" in item for item in items):
            batch.update(
                left_pad_prompts([item["prompt_ids"] for item in items], self.pad_token_id)
            )
        return batch


def pad(
    sequences: Sequence[tuple[torch.Tensor, torch.Tensor]], pad_token_id: int, multiple_of: int = 1
) -> dict[str, torch.Tensor | float]:
    lengths = [len(ids) for ids, _ in sequences]
    width = -(-max(lengths) // multiple_of) * multiple_of
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(sequences), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, (ids, row_labels) in enumerate(sequences):
        input_ids[row, : len(ids)] = ids
        labels[row, : len(ids)] = row_labels
        attention_mask[row, : len(ids)] = 1
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return {
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": attention_mask,
        "position_ids": position_ids,
        "num_tokens": sum(lengths),
        "num_padded_tokens": input_ids.numel(),
    }


def pack(
    sequences: Sequence[tuple[torch.Tensor, torch.Tensor]], pad_token_id: int
) -> dict[str, torch.Tensor | float | None]:
    """One row holding every sample back to back: zero padding, independent attention."""
    lengths = torch.tensor([len(ids) for ids, _ in sequences])
    input_ids = torch.cat([ids for ids, _ in sequences]).unsqueeze(0)
    labels = torch.cat([row_labels for _, row_labels in sequences]).unsqueeze(0)
    position_ids = torch.cat([torch.arange(int(n)) for n in lengths]).unsqueeze(0)
    cu_seqlens = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    return {
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": None,
        "position_ids": position_ids,
        "cu_seqlens": cu_seqlens,
        "num_tokens": int(lengths.sum()),
        "num_padded_tokens": input_ids.numel(),
    }


def left_pad_prompts(prompts: Sequence[torch.Tensor], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Generation prompts are left-padded so every row's next token sits at the same column."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = prompt
        mask[row, width - len(prompt) :] = 1
    return {"prompt_ids": ids, "prompt_attention_mask": mask}


def padding_waste(batches: Sequence[dict[str, Any]]) -> float:
    """Percentage of pad tokens over a set of batches."""
    real = sum(b.get("num_tokens", 0) for b in batches)
    total = sum(b.get("num_padded_tokens", 0) for b in batches)
    return 0.0 if total == 0 else 100.0 * (total - real) / total
