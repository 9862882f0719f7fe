"""One optimiser step = the mean over every supervised token it saw, on every rank, or no step.

Why not Lightning's default: it averages micro-batch losses (so under gradient accumulation a
short conversation weighs as much as a long one) and DDP averages ranks the same way. Here each
micro-batch backpropagates its *summed* token loss times ``LOSS_SUM_SCALE``; after the window's
last backward, one all-reduce of [tokens, loss sum, non-finite flags] lets every rank either
rescale its gradients to the global token mean or drop them all (a non-finite loss or gradient
anywhere: every rank skips the same step, so none waits in a collective the others left).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["LOSS_SUM_SCALE", "StepOutcome", "TokenMeanWindow", "clip_gradients", "zero_loss"]

# A power of two, so the scaling is exact; it keeps each micro-batch's gradients near those of a
# mean over ~1k tokens (fp16 headroom).
LOSS_SUM_SCALE = 2.0**-10


@dataclass(frozen=True)
class StepOutcome:
    """What the all-reduced window decided for this optimiser step."""

    skipped_because: str | None  # None: the gradients were rescaled and the step runs
    tokens: float
    loss: float  # token mean over the window and all ranks (nan when skipped)

    @property
    def dropped(self) -> bool:
        return self.skipped_because is not None


class TokenMeanWindow:
    """This rank's supervised tokens, loss sum and non-finite flag since the last step."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.tokens: Tensor | float = 0.0  # device tensors once added: no host sync per batch
        self.loss_sum: Tensor | float = 0.0
        self.nonfinite_loss: Tensor | float = 0.0

    def add(self, loss_sum: Tensor, count: Tensor) -> None:
        """Accumulated on the device: a non-finite loss is flagged without a host sync."""
        loss = loss_sum.detach().double()
        finite = torch.isfinite(loss)
        self.tokens = self.tokens + count.detach().double()
        self.loss_sum = self.loss_sum + torch.where(finite, loss, 0.0)
        self.nonfinite_loss = self.nonfinite_loss + (~finite).double()

    def flag_nonfinite_loss(self) -> None:
        self.nonfinite_loss = 1.0

    def finish(
        self,
        params: list[nn.Parameter],
        *,
        accumulate: int,
        world: int,
        check_gradients: bool,
        device: torch.device,
    ) -> StepOutcome:
        """Decide the step for every rank and make the gradients the global token mean's.

        After the DDP/FSDP reduction each parameter holds ``LOSS_SUM_SCALE / (accumulate *
        world)`` times the gradient of the summed loss (Lightning divides each micro-batch by
        ``accumulate_grad_batches``, DDP/FSDP average over ranks), so multiplying by
        ``accumulate * world / (LOSS_SUM_SCALE * tokens)`` gives the mean over every token.
        ``check_gradients``: look for non-finite gradients too (not where a grad scaler does).
        """
        grads = [p.grad for p in params if p.grad is not None]
        bad_grads = torch.zeros((), dtype=torch.float64, device=device)
        if grads and check_gradients:  # non-finite iff the total norm is (one reduction)
            norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
            bad_grads = (~torch.isfinite(norm)).to(device, torch.float64)
        stats = torch.stack(
            [
                torch.as_tensor(self.tokens, dtype=torch.float64, device=device),
                torch.as_tensor(self.loss_sum, dtype=torch.float64, device=device),
                torch.as_tensor(self.nonfinite_loss, dtype=torch.float64, device=device),
                bad_grads,
            ]
        )
        self.reset()
        if world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(stats)
        tokens, loss_sum, bad_loss, bad_grad = stats.tolist()
        why = None
        if bad_loss:
            why = f"non-finite loss in {int(bad_loss)} micro-batch(es) over the ranks"
        elif bad_grad:
            why = "non-finite gradients"
        elif tokens == 0:
            why = "no supervised token"
        if why is not None:
            for param in params:
                param.grad = None  # AdamW then leaves parameters and moments untouched
            return StepOutcome(why, tokens, float("nan"))
        factor = accumulate * world / (LOSS_SUM_SCALE * tokens)
        for grad in grads:
            grad.mul_(factor)
        return StepOutcome(None, tokens, loss_sum / tokens)


def zero_loss(loss: Tensor, params: list[nn.Parameter], through_graph: bool) -> Tensor:
    """A zero loss whose backward reaches every trainable parameter (``loss * 0`` is NaN for a
    NaN loss). ``through_graph`` (FSDP: each unit reduce-scatters from its backward hook) goes
    through the forward graph instead, so the gradients are NaN there; either way the step is
    then skipped on every rank."""
    if through_graph:
        return loss * 0.0
    return sum((p.reshape(-1)[:1].sum() * 0.0 for p in params), loss.new_zeros(()))


def clip_gradients(
    optimizer: torch.optim.Optimizer,
    value: float,
    algorithm: str | None,
    *,
    fsdp_root: nn.Module | None,
    scaled: bool,
    lightning_clip: Callable[[torch.optim.Optimizer, float, str | None], None],
) -> None:
    """Clip as Lightning would, where Lightning cannot: under FSDP (sharded gradients: the
    global norm through FSDP's own ``clip_grad_norm_``; Lightning's FSDP precision plugin
    refuses norm clipping) and for fused AdamW without a grad scaler (Lightning refuses to
    clip it, but with no scaler nothing needs unscaling first)."""
    params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    fused_unscaled = getattr(optimizer, "_step_supports_amp_scaling", False) and not scaled
    if algorithm == "value" and (fsdp_root is not None or fused_unscaled):
        torch.nn.utils.clip_grad_value_(params, value)  # elementwise: shards clip like the whole
    elif fsdp_root is not None:
        fsdp_root.clip_grad_norm_(value)
    elif fused_unscaled:
        torch.nn.utils.clip_grad_norm_(params, value)
    else:
        lightning_clip(optimizer, value, algorithm)
