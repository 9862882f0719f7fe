"""Options shared across the data package: numeric checks (DataModule, synthetic settings) and
what to do with a bad sample (readers, dataset, DataModule)."""

from __future__ import annotations

from typing import Any, Literal

# "error": raise, naming the file and the sample; "skip": leave it out and count it by reason.
OnBadSample = Literal["error", "skip"]
# timm's eval crop modes: how a non-square image meets the encoder's square input
CropMode = Literal["center", "squash", "border"]


def check_int(
    name: str,
    value: Any,
    minimum: int | None,
    maximum: int | None = None,
    *,
    optional: bool = False,
) -> None:
    """Refuse a bad numeric option by its config name, before torch fails on it far away."""
    if value is None and optional:
        return
    allowed = "an integer" if minimum is None else f"an integer >= {minimum}"
    if maximum is not None:
        allowed = f"an integer in {minimum}..{maximum}"
    if optional:
        allowed += " (or null)"
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise ValueError(f"{name} must be {allowed}, got {value}")
