"""The next-rollout judgement: an accepted update judged once more on the rollout its policy collects.

Every check of :mod:`verl_sb3.verification.checks` reads the rollout the update trained on, so
none can see where the updated policy takes its own episodes. A *judge* measures a figure of the
policy on a rollout it collected; the figure of the rollout an update trained on is compared
with that of the next rollout, the first one the updated policy collected, and the judge says
whether the update made things worse. The verified classes then undo it (the policy and its
optimizer go back to their state before it), collect that rollout again, and lower a factor on
the learning rate (:class:`UndoSettings`).

A judge is any object with the :class:`RolloutJudge` methods; :class:`~verl_sb3.verification.reuse_mass.ReuseMassJudge`
(TextGen-v0's: the probability of reusing a token already in the sequence) is the one built in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch as th
from stable_baselines3.common.base_class import BaseAlgorithm

from verl_sb3._validation import require_number
from verl_sb3.verification.state import ModelState

#: A judge's figure of a rollout: its mean and the standard error of that mean.
Measurement = tuple[float, float]

DEFAULT_LR_SHRINK = 0.5
DEFAULT_LR_RECOVERY = 1.02
DEFAULT_MIN_LR_SCALE = 1 / 32


@dataclass(frozen=True)
class CollectedRollout:
    """What a judge reads of a rollout the policy collected.

    :param logits: the action logits the policy computed at each step, ``(n_envs, n_steps, n_actions)``.
    :param observations: the observations of those steps as the rollout buffer holds them, ``(n_steps, n_envs, ...)``.
    """

    logits: th.Tensor
    observations: Any


@runtime_checkable
class RolloutJudge(Protocol):
    """Judges an accepted update on the next rollout.

    - ``name``: names the figure in the log (the undone update's entry gets ``<name>_after``).
    - ``validate(model)``: raise a ValueError naming the judge's argument when it cannot judge
      the algorithm ``model`` (its spaces, its number of environments).
    - ``measure(rollout)``: the figure of a :class:`CollectedRollout`, or None when it cannot say.
    - ``verdict(before, after)``: why the update is undone (the figure of the rollout it trained
      on, ``before``, and of the next one, ``after``), or None to keep it.
    """

    name: str

    def validate(self, model: BaseAlgorithm) -> None: ...

    def measure(self, rollout: CollectedRollout) -> Measurement | None: ...

    def verdict(self, before: Measurement, after: Measurement) -> str | None: ...


@dataclass(frozen=True)
class UndoSettings:
    """The learning-rate scale's response to undone updates.

    :param lr_shrink: factor on the scale when an update is undone, in (0, 1].
    :param lr_recovery: factor on the scale after each accepted update, >= 1 (the scale stays <= 1).
    :param min_lr_scale: the smallest scale, in (0, 1].
    """

    lr_shrink: float = DEFAULT_LR_SHRINK
    lr_recovery: float = DEFAULT_LR_RECOVERY
    min_lr_scale: float = DEFAULT_MIN_LR_SCALE

    def __post_init__(self) -> None:
        object.__setattr__(self, "lr_shrink", require_number("lr_shrink", self.lr_shrink, 0.0, 1.0, open_low=True))
        object.__setattr__(self, "lr_recovery", require_number("lr_recovery", self.lr_recovery, 1.0))
        object.__setattr__(
            self, "min_lr_scale", require_number("min_lr_scale", self.min_lr_scale, 0.0, 1.0, open_low=True)
        )

    def shrunk(self, scale: float) -> float:
        return max(self.min_lr_scale, scale * self.lr_shrink)

    def regrown(self, scale: float) -> float:
        return min(1.0, scale * self.lr_recovery)


@dataclass
class PendingJudgement:
    """An accepted update awaiting the next rollout: the state before it (to undo it), its number
    in the log, and the judge's figure of the rollout it trained on."""

    before: ModelState
    update: int
    measured: Measurement


@dataclass
class NextRolloutJudgement:
    """The judge, the figure of the last rollout, and the update awaiting its judgement (if any);
    saved with the model, so that a resumed run judges as the uninterrupted one."""

    judge: RolloutJudge
    measured: Measurement | None = None
    pending: PendingJudgement | None = None

    def judge_rollout(self, rollout: CollectedRollout | None) -> tuple[PendingJudgement, str] | None:
        """Measure a rollout just collected; if it judges the pending update to be undone, that
        update and the reason. The pending update is judged once, whatever the verdict."""
        self.measured = None if rollout is None else self.judge.measure(rollout)
        pending, self.pending = self.pending, None
        if pending is None or self.measured is None:
            return None
        reason = self.judge.verdict(pending.measured, self.measured)
        return None if reason is None else (pending, reason)

    def await_judgement(self, before: ModelState, update: int) -> None:
        """Keep what undoing an accepted update needs until the next rollout judges it."""
        if self.measured is not None:
            self.pending = PendingJudgement(before, update, self.measured)
