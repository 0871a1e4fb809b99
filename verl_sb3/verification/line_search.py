"""The backtracking line search between the policy before an update and after it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from verl_sb3.verification.verifier import Results, all_passed


@dataclass(frozen=True)
class LineSearchResult:
    """The full step's results, the kept step's, and how it was found (``step_size`` 1.0: the full step)."""

    full_step: Results
    final: Results
    accepted: bool
    backtracks: int
    step_size: float


def backtracking_line_search(
    verify_at: Callable[[float], Results], max_backtracks: int, ratio: float
) -> LineSearchResult:
    """Verify the full step, then steps ``ratio**k`` for ``k = 1 .. max_backtracks`` until one passes.

    :param verify_at: sets the policy at a step size (1.0: the update as made) and verifies it.
    :return: the results; when nothing passed, ``accepted`` is False and the caller rolls back.
    """
    full_step = results = verify_at(1.0)
    backtracks, step_size = 0, 1.0
    while not all_passed(results) and backtracks < max_backtracks:
        backtracks += 1
        step_size = ratio**backtracks
        results = verify_at(step_size)
    return LineSearchResult(full_step, results, all_passed(results), backtracks, step_size)
