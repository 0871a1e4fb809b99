"""The thresholds of the verification, validated and documented in one place."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

from verl_sb3._validation import is_integer, optional_number, require_int, require_number
from verl_sb3.verification.context import Check

DEFAULT_KL_THRESHOLD = 0.25
DEFAULT_MIN_ENTROPY = 0.01
DEFAULT_MAX_FORBIDDEN_PROB = 0.05
DEFAULT_RETURNS_TOLERANCE = 1e-4
DEFAULT_ADVANTAGE_TOLERANCE = 0.05
DEFAULT_SURROGATE_TOLERANCE = 0.02
#: Bound on |return|: far above any return of a bounded per-step reward, far below a corrupt one.
DEFAULT_MAX_ABS_RETURN = 1e4
DEFAULT_MAX_BACKTRACKS = 5
DEFAULT_BACKTRACK_RATIO = 0.5


@dataclass(frozen=True)
class VerificationConfig:
    """What an update must pass, and how far it is backtracked before it is rolled back.

    :param kl_threshold: largest accepted exact mean KL(old || new), > 0.
    :param min_entropy: smallest accepted mean policy entropy in nats, >= 0, or None to skip the check.
    :param forbidden_tokens: actions whose probability mass is bounded (Discrete actions).
    :param max_forbidden_prob: bound on the mean probability of the forbidden tokens, in [0, 1].
    :param max_repeat_prob: bound on the mean probability of repeating the previous token, in
        [0, 1], or None to skip the check (token-sequence observations only).
    :param returns_tolerance: largest accepted |returns - (advantages + values)|, relative to the returns' scale.
    :param advantage_tolerance: largest accepted deviation of normalised advantages from mean 0 / std 1.
    :param surrogate_tolerance: largest accepted decrease of the surrogate objective.
    :param max_abs_return: largest accepted |return| of the rollout (rewards and the critic's
        bootstrap together), > 0, or None to skip the check; non-finite returns always fail.
    :param max_backtracks: how many shorter steps to try before rolling back, >= 0.
    :param backtrack_ratio: step shrink factor per backtrack, in (0, 1).
    :param checks: extra checks: callables ``check(ctx: UpdateContext) -> CheckResult``.
    :param max_log_entries: keep only the last entries of the verification log (None: keep all).
    """

    kl_threshold: float = DEFAULT_KL_THRESHOLD
    min_entropy: float | None = DEFAULT_MIN_ENTROPY
    forbidden_tokens: tuple[int, ...] = ()
    max_forbidden_prob: float = DEFAULT_MAX_FORBIDDEN_PROB
    max_repeat_prob: float | None = None
    returns_tolerance: float = DEFAULT_RETURNS_TOLERANCE
    advantage_tolerance: float = DEFAULT_ADVANTAGE_TOLERANCE
    surrogate_tolerance: float = DEFAULT_SURROGATE_TOLERANCE
    max_abs_return: float | None = DEFAULT_MAX_ABS_RETURN
    max_backtracks: int = DEFAULT_MAX_BACKTRACKS
    backtrack_ratio: float = DEFAULT_BACKTRACK_RATIO
    checks: tuple[Check, ...] = ()
    max_log_entries: int | None = None

    def __post_init__(self) -> None:
        values = {
            "kl_threshold": require_number("kl_threshold", self.kl_threshold, 0.0, open_low=True),
            "min_entropy": optional_number("min_entropy", self.min_entropy, 0.0),
            "forbidden_tokens": _token_ids(self.forbidden_tokens),
            "max_forbidden_prob": require_number("max_forbidden_prob", self.max_forbidden_prob, 0.0, 1.0),
            "max_repeat_prob": optional_number("max_repeat_prob", self.max_repeat_prob, 0.0, 1.0),
            "returns_tolerance": require_number("returns_tolerance", self.returns_tolerance, 0.0),
            "advantage_tolerance": require_number("advantage_tolerance", self.advantage_tolerance, 0.0),
            "surrogate_tolerance": require_number("surrogate_tolerance", self.surrogate_tolerance, 0.0),
            "max_abs_return": optional_number("max_abs_return", self.max_abs_return, 0.0, open_low=True),
            "max_backtracks": require_int("max_backtracks", self.max_backtracks, 0),
            "backtrack_ratio": require_number(
                "backtrack_ratio", self.backtrack_ratio, 0.0, 1.0, open_low=True, open_high=True
            ),
            "checks": _checks(self.checks),
            "max_log_entries": None
            if self.max_log_entries is None
            else require_int("max_log_entries", self.max_log_entries, 1),
        }
        for name, value in values.items():
            object.__setattr__(self, name, value)  # frozen: the validated values replace the given ones

    @classmethod
    def from_object(cls, owner: Any) -> VerificationConfig:
        """The configuration held in ``owner``'s attributes of the same names (a verified model's)."""
        return cls(**{f.name: getattr(owner, f.name) for f in fields(cls)})


def _token_ids(tokens: Any) -> tuple[int, ...]:
    if isinstance(tokens, (str, bytes)) or not isinstance(tokens, Sequence) or not all(is_integer(t) for t in tokens):
        raise ValueError(f"forbidden_tokens: expected a list of token ids (integers >= 0), got {tokens!r}")
    if any(t < 0 for t in tokens):
        raise ValueError(f"forbidden_tokens: ids must be >= 0, got {list(tokens)}")
    return tuple(int(t) for t in tokens)


def _checks(checks: Any) -> tuple[Check, ...]:
    if isinstance(checks, (str, bytes)) or not isinstance(checks, Sequence):
        raise ValueError(f"checks: expected a list of callables taking an UpdateContext, got {checks!r}")
    bad = [check for check in checks if not callable(check)]
    if bad:
        raise ValueError(f"checks: expected callables taking an UpdateContext, got {bad!r}")
    return tuple(checks)
