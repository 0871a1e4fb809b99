"""Disjoint, seeded train and test splits of a task's procedurally generated prompts."""

from __future__ import annotations

import zlib
from typing import Any

SPLITS = ("train", "test")
#: The share of a task's prompts in its test split.
TEST_FRACTION = 0.2


def require_split(split: Any) -> str:
    if split not in SPLITS:
        raise ValueError(f"split: expected one of {SPLITS}, got {split!r}")
    return split


def require_seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed: expected an integer >= 0 (it picks the train/test split), got {seed!r}")
    return seed


def require_prompts(prompts: list, split: str, arguments: str) -> list:
    if not prompts:
        raise ValueError(f"split={split!r}: no prompt falls into it at {arguments}; make the task larger")
    return prompts


def split_of(text: str, seed: int) -> str:
    """The split of the prompt ``text``: a hash of the text and the seed, so that a prompt keeps
    its split whatever else the task generates, and the two splits never share a prompt."""
    bucket = zlib.crc32(f"{seed}:{text}".encode()) % 1000
    return "test" if bucket < TEST_FRACTION * 1000 else "train"


def require_positive_int(name: str, value: Any, minimum: int = 1, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name}: expected an integer <= {maximum}, got {value!r}")
    return value
