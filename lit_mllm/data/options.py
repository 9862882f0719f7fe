"""Checks of numeric options, shared by the DataModule and the synthetic data settings."""

from __future__ import annotations

from typing import Any


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
