"""The verifier: which checks run on an update, with which thresholds (checks in, results out).

Pure functions of an :class:`~verl_sb3.verification.context.UpdateContext` and a
:class:`~verl_sb3.verification.config.VerificationConfig`: no model, no state, testable alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from verl_sb3.verification import checks as C
from verl_sb3.verification.config import VerificationConfig
from verl_sb3.verification.context import CheckResult, UpdateContext

Results = dict[str, CheckResult]


def verify_update(ctx: UpdateContext, config: VerificationConfig) -> Results:
    """The result of every check ``config`` asks for, by name; the update passes when all pass."""
    results = {
        "kl": C.kl_check(ctx, config.kl_threshold),
        **rollout_checks(ctx, config),
        "surrogate": C.surrogate_check(ctx, config.surrogate_tolerance),
        "finite_parameters": C.finite_parameters_check(ctx),
    }
    if config.min_entropy is not None:
        results["entropy"] = C.entropy_check(ctx, config.min_entropy)
    if config.forbidden_tokens:
        results["forbidden_mass"] = C.forbidden_mass_check(ctx, config.max_forbidden_prob)
    if config.max_repeat_prob is not None:
        results["repeat_mass"] = C.repeat_mass_check(ctx, config.max_repeat_prob)
    for check in config.checks:
        result = check(ctx)
        if not isinstance(result, CheckResult):
            raise TypeError(f"checks: {check_name(check)!r} returned {type(result).__name__}, expected a CheckResult")
        results[check_name(check)] = result
    return results


def rollout_checks(ctx: UpdateContext, config: VerificationConfig) -> Results:
    """The checks of the rollout's advantages, returns and values (independent of the update): the
    critic's for GAE, the group advantages' for a critic-free estimator."""
    if ctx.estimator == "gae":
        results = {
            "advantage_finite": C.advantage_finite_check(ctx),
            "returns_match": C.returns_match_check(ctx, config.returns_tolerance),
            "advantage_normalization": C.advantage_normalization_check(ctx, config.advantage_tolerance),
        }
    else:
        results = {"group_advantages": C.group_advantage_check(ctx, config.advantage_tolerance)}
    if config.max_abs_return is not None:
        results["return_bound"] = C.return_bound_check(ctx, config.max_abs_return)
    return results


def non_finite_results(rollout_ctx: UpdateContext, config: VerificationConfig, n_non_finite: int) -> Results:
    """What can be said of an update that made ``n_non_finite`` parameters non-finite: the policy
    cannot be evaluated, so only the rollout is checked (``rollout_ctx``: the old policy's context)."""
    message = f"{n_non_finite} non-finite parameters"
    return {
        "kl": CheckResult(False, math.nan, config.kl_threshold, f"not computed: {message}"),
        **rollout_checks(rollout_ctx, config),
        "finite_parameters": CheckResult(False, float(n_non_finite), 0.0, message),
    }


def all_passed(results: Results) -> bool:
    return all(result.passed for result in results.values())


def failures(results: Results) -> list[str]:
    """``name: message (threshold t)`` of each failed check, in order."""
    return [f"{name}: {r.message} (threshold {r.threshold})" for name, r in results.items() if not r.passed]


def check_name(check: Callable) -> str:
    """A user check's name in the results: its ``name`` attribute, else its ``__name__``, else its class's."""
    return getattr(check, "name", None) or getattr(check, "__name__", None) or type(check).__name__
