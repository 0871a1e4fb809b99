"""Argument validation shared by the library: a ValueError that names the argument and what it accepts."""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def is_integer(value: Any) -> bool:
    """Whether ``value`` is a Python or numpy integer (booleans are not)."""
    return not isinstance(value, (bool, np.bool_)) and isinstance(value, (int, np.integer))


def require_int(name: str, value: Any, minimum: int, maximum: int | None = None) -> int:
    """``value`` as an int in ``[minimum, maximum]``, or a ValueError naming ``name``."""
    bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
    if not is_integer(value) or value < minimum or (maximum is not None and value > maximum):
        raise ValueError(f"{name}: expected an integer {bound}, got {value!r}")
    return int(value)


def require_number(
    name: str, value: Any, low: float, high: float = math.inf, *, open_low: bool = False, open_high: bool = False
) -> float:
    """``value`` as a float in the given interval, or a ValueError naming ``name`` and the interval."""
    interval = f"{'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"
    if (
        isinstance(value, (bool, np.bool_))
        or not isinstance(value, (int, float, np.integer, np.floating))
        or math.isnan(value)
    ):
        raise ValueError(f"{name}: expected a number in {interval}, got {value!r}")
    too_low = value <= low if open_low else value < low
    too_high = value >= high if open_high else value > high
    if too_low or too_high:
        raise ValueError(f"{name}: expected a number in {interval}, got {value}")
    return float(value)


def optional_number(name: str, value: Any, low: float, high: float = math.inf, **kwargs: bool) -> float | None:
    """None, or :func:`require_number`'s float."""
    return None if value is None else require_number(name, value, low, high, **kwargs)
