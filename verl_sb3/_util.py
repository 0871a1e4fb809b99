"""Small helpers shared by the algorithm modules: argument validation and temporary patches."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch as th


def require_number(name: str, value: Any, low: float, high: float = math.inf, *, open_low: bool = False, open_high: bool = False) -> float:
    """``value`` as a float in the given interval, or a ValueError naming ``name`` and the interval."""
    interval = f"{'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) or math.isnan(value):
        raise ValueError(f"{name}: expected a number in {interval}, got {value!r}")
    too_low = value <= low if open_low else value < low
    too_high = value >= high if open_high else value > high
    if too_low or too_high:
        raise ValueError(f"{name}: expected a number in {interval}, got {value}")
    return float(value)


@contextlib.contextmanager
def patched_attribute(owner: Any, name: str, replacement: Any) -> Iterator[None]:
    """Set ``owner.name`` to ``replacement`` for the block, then put back exactly what was there.

    Patches nest: an instance attribute set by an outer patch is restored, not deleted.
    """
    missing = object()
    previous = vars(owner).get(name, missing)
    setattr(owner, name, replacement)
    try:
        yield
    finally:
        if previous is missing:
            delattr(owner, name)
        else:
            setattr(owner, name, previous)


@contextlib.contextmanager
def distribution_validation(enabled: bool) -> Iterator[None]:
    """Turn torch.distributions' argument checks on or off for the block, then restore the default.

    Verification builds distributions over whole rollouts, whose values it checks itself
    (``finite_parameters``): torch's checks would cost a pass over the logits per distribution
    and raise on the non-finite values that the checks are there to report.
    """
    previous = th.distributions.Distribution._validate_args
    th.distributions.Distribution.set_default_validate_args(enabled)
    try:
        yield
    finally:
        th.distributions.Distribution.set_default_validate_args(previous)
