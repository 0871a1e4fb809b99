"""What happened to each update: the verification log, its counters, and the logger's ``verl/`` figures."""

from __future__ import annotations

import math
from typing import Any, TypedDict

from stable_baselines3.common.logger import Logger

from verl_sb3.verification.line_search import LineSearchResult
from verl_sb3.verification.verifier import failures


class UpdateRecord(TypedDict, total=False):
    """One entry of ``verification_log`` (a plain dict, so that checkpoints keep it as JSON).

    ``kl`` and ``entropy`` are the full step's; ``kl_applied`` the kept step's (0 when rolled back);
    ``checks`` holds every check's ``CheckResult.as_dict()`` at the full step; ``reason`` says why
    the full step was rejected (None when it passed); ``recovered`` which restoration of the last
    verified state preceded the update; ``lr_scale`` the learning-rate scale it used. An update
    undone on the next rollout gets ``undone=True``, ``undo_reason`` and the judge's figure after it
    (``reuse_after`` for the reuse-mass judge).
    """

    update: int
    timesteps: int
    accepted: bool
    rolled_back: bool
    backtracks: int
    step_size: float
    kl: float
    kl_max: float
    kl_applied: float
    entropy: float
    checks: dict[str, dict[str, Any]]
    reason: str | None
    recovered: str | None
    lr_scale: float
    undone: bool
    undo_reason: str


def update_record(
    search: LineSearchResult, update: int, timesteps: int, recovered: str | None, lr_scale: float
) -> UpdateRecord:
    """The log entry of a verified update from its line search."""
    full_step, final, accepted = search.full_step, search.final, search.accepted
    failed = failures(full_step)
    if not failed:
        reason = None
    elif accepted:
        reason = (
            f"full step failed [{'; '.join(failed)}]; accepted at step size {search.step_size:g} "
            f"after {search.backtracks} backtracks"
        )
    else:
        reason = f"rolled back after {search.backtracks} backtracks: {'; '.join(failed)}"
    return UpdateRecord(
        update=update,
        timesteps=int(timesteps),
        accepted=accepted,
        rolled_back=not accepted,
        backtracks=search.backtracks,
        step_size=search.step_size if accepted else 0.0,
        kl=full_step["kl"].value,
        kl_max=full_step["kl"].details.get("max", math.nan),
        kl_applied=final["kl"].value if accepted else 0.0,
        entropy=full_step["entropy"].value if "entropy" in full_step else math.nan,
        checks={name: result.as_dict() for name, result in full_step.items()},
        reason=reason,
        recovered=recovered,
        lr_scale=lr_scale,
        undone=False,
    )


class VerificationReport:
    """The log of verified updates (:class:`UpdateRecord`, the last ``max_log_entries`` when set)
    and the counters that outlive it."""

    def __init__(self) -> None:
        self.log: list[UpdateRecord] = []
        self.n_verified = 0
        self.n_accepted_first_try = 0
        self.n_rolled_back = 0
        self.n_undone = 0
        #: restorations of the last verified state since the last update, for its record
        self.recovery: str | None = None

    @property
    def verification_rate(self) -> float:
        """Share of verified updates accepted at the full step (NaN before the first update)."""
        return self.n_accepted_first_try / self.n_verified if self.n_verified else math.nan

    def note_recovery(self, message: str) -> None:
        self.recovery = message if self.recovery is None else f"{self.recovery}; {message}"

    def add(
        self, search: LineSearchResult, timesteps: int, lr_scale: float, max_log_entries: int | None
    ) -> UpdateRecord:
        """Record a verified update (and the recovery that preceded it); return its entry."""
        record = update_record(search, self.n_verified, timesteps, self.recovery, lr_scale)
        self.recovery = None
        self.n_verified += 1
        self.n_accepted_first_try += int(search.accepted and search.backtracks == 0)
        self.n_rolled_back += int(not search.accepted)
        self.log.append(record)
        if max_log_entries is not None and len(self.log) > max_log_entries:
            del self.log[: len(self.log) - max_log_entries]
        return record

    def mark_undone(self, update: int, reason: str, figures: dict[str, float]) -> None:
        """Count an update undone on the next rollout, and say so in its entry (the last one until the next update)."""
        self.n_undone += 1
        if self.log and self.log[-1]["update"] == update:
            self.log[-1].update(undone=True, **figures, undo_reason=reason)

    def log_update(self, logger: Logger, record: UpdateRecord, judging: bool, lr_scale: float) -> None:
        """The update's figures under ``verl/`` (``judging``: also the undo counter and the learning-rate scale)."""
        logger.record("verl/accepted", float(record["accepted"]))
        logger.record("verl/rolled_back", float(record["rolled_back"]))
        logger.record("verl/backtracks", record["backtracks"])
        logger.record("verl/step_size", record["step_size"])
        logger.record("verl/kl", record["kl"])
        logger.record("verl/kl_applied", record["kl_applied"])
        logger.record("verl/verification_rate", self.verification_rate)
        logger.record("verl/n_rolled_back", self.n_rolled_back)
        logger.record("verl/kl_max", record["kl_max"])
        if judging:
            logger.record("verl/n_undone", self.n_undone)
            logger.record("verl/lr_scale", lr_scale)
        for name, result in record["checks"].items():
            logger.record(f"verl/check_{name}", result["value"])
