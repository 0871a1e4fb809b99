"""A verifiable reward: veRL's ``compute_score`` called on each finished answer.

``compute_score(data_source, solution_str, ground_truth, extra_info=None)`` returns a number or a
dict holding ``"score"`` (and anything else worth reporting), as veRL's reward functions do
(``verl.utils.reward_score``). The environment calls it once per episode, on the step that ends
it, with the generated text: the sequence after its prompt, the end token left out. It is called
with keywords, as veRL's reward managers call it, so the parameters must have these names.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

#: ``compute_score(data_source, solution_str, ground_truth, extra_info=None) -> float | dict``
ComputeScore = Callable[..., Any]


def function_name(fn: Any) -> str:
    return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or type(fn).__name__


def require_compute_score(fn: Any) -> ComputeScore | None:
    if fn is not None and not callable(fn):
        raise ValueError(
            "compute_score: expected a callable compute_score(data_source, solution_str, ground_truth, "
            f"extra_info=None) -> float or dict with 'score', got {fn!r}"
        )
    return fn


def score_answer(
    fn: ComputeScore, data_source: str | None, solution_str: str, ground_truth: Any, extra_info: Any
) -> tuple[float, dict[str, Any]]:
    """``fn``'s score of one answer and the other keys of its dict, or a ValueError naming ``fn``."""
    name = f"compute_score ({function_name(fn)})"
    try:
        returned = fn(
            data_source=data_source, solution_str=solution_str, ground_truth=ground_truth, extra_info=extra_info
        )
    except Exception as error:
        raise ValueError(f"{name}: raised {type(error).__name__}: {error}") from error
    details: dict[str, Any] = {}
    if isinstance(returned, Mapping):
        if "score" not in returned:
            raise ValueError(f"{name}: returned a dict without 'score': {sorted(map(str, returned))}")
        details = {str(key): value for key, value in returned.items() if key != "score"}
        returned = returned["score"]
    if isinstance(returned, (bool, np.bool_)):
        returned = float(returned)  # veRL's scorers often return a match as a bool
    if not isinstance(returned, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name}: returned {returned!r}, expected a number or a dict with a numeric 'score'")
    score = float(returned)
    if not math.isfinite(score):
        raise ValueError(f"{name}: returned the non-finite score {score} for {solution_str!r}")
    return score, details
