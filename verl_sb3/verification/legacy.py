"""Models saved by verl_sb3 0.1: the classes their pickles name, and their attributes brought to
the current structure when they are loaded (:func:`migrate`, from ``_setup_model``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch as th

from verl_sb3.verification.judgement import NextRolloutJudgement
from verl_sb3.verification.judgement import PendingJudgement as Pending
from verl_sb3.verification.report import VerificationReport
from verl_sb3.verification.reuse_mass import ReuseMassJudge
from verl_sb3.verification.state import ModelState


@dataclass
class Snapshot:
    """``verl_sb3.verified._Snapshot``: the state before an update (``logged``: the logger's figures)."""

    policy: dict[str, th.Tensor]
    optimizer: dict[str, Any]
    n_updates: int
    extra: dict[str, Any]
    logged: tuple[dict, dict, dict]


@dataclass
class PendingJudgement:
    """``verl_sb3.verified._PendingJudgement``: an accepted update awaiting the next rollout."""

    snapshot: Snapshot
    update: int
    reuse_before: tuple[float, float]


#: The report's counters and the model attributes that held them.
_COUNTERS = {
    "_n_verified": "n_verified",
    "_n_accepted_first_try": "n_accepted_first_try",
    "_n_rolled_back": "n_rolled_back",
    "_n_undone": "n_undone",
    "_recovery": "recovery",
}


def migrate(model: Any) -> None:
    """Move a loaded 0.1 model's log, counters and pending judgement into the current parts (no-op otherwise)."""
    state = vars(model)
    if "verification_log" not in state:
        return
    report = VerificationReport()
    report.log = state.pop("verification_log")
    for old, new in _COUNTERS.items():
        if old in state:
            setattr(report, new, state.pop(old))
    model.verification_report = report
    measured, pending = state.pop("_rollout_reuse", None), state.pop("_pending_judgement", None)
    if model.max_reuse_rise is None:
        return
    judgement = NextRolloutJudgement(
        ReuseMassJudge(model.max_reuse_rise), None if measured is None else tuple(measured)
    )
    if pending is not None:
        snapshot = pending.snapshot
        before = ModelState(
            snapshot.policy, snapshot.optimizer, snapshot.n_updates, dict(snapshot.extra), "before the update"
        )
        judgement.pending = Pending(before, pending.update, tuple(pending.reuse_before))
    model.rollout_judgement = judgement
