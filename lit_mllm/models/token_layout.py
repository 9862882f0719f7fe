"""Where a batch's image slots, supervised positions and packed segments lie, found on the CPU.

The collator computes this in the loader workers, so the training forward never has to ask
the GPU (``nonzero``, boolean indexing, ``.item()``): each of those is a host sync that stops
the CPU from queueing kernels ahead of the GPU, and on a large model the GPU then idles
between kernels. The model finds the same layout itself when a batch has none.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from lit_mllm.tokens import IGNORE_INDEX


def image_slot_positions(input_ids: Tensor, image_patch_id: int) -> Tensor:
    """Flat positions (``row * width + column``) of the ``<im_patch>`` tokens, in text order."""
    return (input_ids.flatten() == image_patch_id).nonzero().flatten()


@dataclass
class TokenLayout:
    """Flat positions into a (rows, width) batch: ``row * width + column``.

    Not frozen: Lightning's precision plugins rebuild the dataclasses of a batch field by field.

    ``supervised``: the positions whose *next* token is supervised (their hidden states feed
    the LM head), ``targets``: those next tokens. ``cu_seqlens`` / ``max_seqlen``: a packed
    row's sample boundaries and longest sample (``None`` / 0 for padded rows).
    """

    image_slots: Tensor
    supervised: Tensor
    targets: Tensor
    cu_seqlens: Tensor | None = None
    max_seqlen: int = 0

    @classmethod
    def of(
        cls,
        input_ids: Tensor,
        labels: Tensor,
        image_patch_id: int,
        cu_seqlens: Tensor | None = None,
    ) -> TokenLayout:
        width = input_ids.shape[1]
        following = labels[:, 1:]
        rows, columns = (following != IGNORE_INDEX).nonzero(as_tuple=True)
        max_seqlen = 0
        if cu_seqlens is not None and len(cu_seqlens) > 1:
            max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        return cls(
            image_slots=image_slot_positions(input_ids, image_patch_id),
            supervised=rows * width + columns,
            targets=following[rows, columns],
            cu_seqlens=cu_seqlens,
            max_seqlen=max_seqlen,
        )

    @property
    def num_supervised(self) -> int:
        return int(self.supervised.numel())

    @property
    def num_image_slots(self) -> int:
        return int(self.image_slots.numel())

    def to(self, device: torch.device | str, non_blocking: bool = True) -> TokenLayout:
        """Lightning moves a batch value with a ``to`` method by calling it without
        ``non_blocking``; a blocking copy to the GPU would wait for all queued work (a sync),
        so the default here does not block."""
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> TokenLayout:
        """The DataLoader's ``pin_memory`` calls this, so the copies above can overlap."""
        return self._map(Tensor.pin_memory)

    def _map(self, fn: Callable[[Tensor], Tensor]) -> TokenLayout:
        cu = None if self.cu_seqlens is None else fn(self.cu_seqlens)
        return replace(
            self,
            image_slots=fn(self.image_slots),
            supervised=fn(self.supervised),
            targets=fn(self.targets),
            cu_seqlens=cu,
        )
