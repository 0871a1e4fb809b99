"""The entropy coefficient as a Lagrange multiplier for "entropy >= target", for any on-policy algorithm.

After each update ``ent_coef = max(0, ent_coef + rate * (target - entropy))``: dual ascent raises
the coefficient while the policy's mean entropy is below the target and lowers it, down to 0,
above. The verified classes apply :class:`EntropyController` after each accepted update with the
entropy their verification measured (``target_entropy=``); :class:`TargetEntropyCallback` gives
any SB3 on-policy algorithm the same controller, measuring the entropy itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch as th
from stable_baselines3.common.callbacks import BaseCallback

from verl_sb3._validation import require_number
from verl_sb3.rollout import distribution_validation, policy_kind

DEFAULT_ENTROPY_COEF_RATE = 0.01


@dataclass(frozen=True)
class EntropyController:
    """:param target_entropy: the entropy to keep the policy at least near, in nats, >= 0.
    :param entropy_coef_rate: step size of the coefficient's adaptation, > 0."""

    target_entropy: float
    entropy_coef_rate: float = DEFAULT_ENTROPY_COEF_RATE

    def __post_init__(self) -> None:
        object.__setattr__(self, "target_entropy", require_number("target_entropy", self.target_entropy, 0.0))
        rate = require_number("entropy_coef_rate", self.entropy_coef_rate, 0.0, open_low=True)
        object.__setattr__(self, "entropy_coef_rate", rate)

    def next_coefficient(self, ent_coef: float, entropy: float) -> float:
        """The coefficient after an update that left the policy's mean entropy at ``entropy``
        (unchanged when the entropy is not finite: a broken measurement says nothing)."""
        if not math.isfinite(entropy):
            return float(ent_coef)
        return max(0.0, float(ent_coef) + self.entropy_coef_rate * (self.target_entropy - entropy))


class TargetEntropyCallback(BaseCallback):
    """Adapt ``model.ent_coef`` after each update of an SB3 on-policy algorithm (:class:`EntropyController`).

    The entropy is the updated policy's mean entropy on the states of the next rollout, the first
    it collected, measured when that rollout ends, before the next update uses the coefficient
    (SB3 clears the rollout an update trained on before any callback sees it again). It is logged
    as ``verl/entropy`` and the coefficient as ``verl/ent_coef``. ``ent_coef`` must be a number.

    :param target_entropy: the target, in nats.
    :param entropy_coef_rate: the adaptation's step size.
    """

    def __init__(
        self, target_entropy: float, entropy_coef_rate: float = DEFAULT_ENTROPY_COEF_RATE, verbose: int = 0
    ) -> None:
        super().__init__(verbose)
        self.controller = EntropyController(target_entropy, entropy_coef_rate)
        self._updates_seen = 0

    def _on_training_start(self) -> None:
        self._updates_seen = self.model._n_updates

    def _on_rollout_end(self) -> None:
        """Once per update: the counter moved since the last adaptation."""
        if self.model._n_updates == self._updates_seen:
            return
        self._updates_seen = self.model._n_updates
        entropy = rollout_entropy(self.model)
        self.model.ent_coef = self.controller.next_coefficient(self.model.ent_coef, entropy)
        self.logger.record("verl/entropy", entropy)
        self.logger.record("verl/ent_coef", self.model.ent_coef)

    def _on_step(self) -> bool:
        return True


def rollout_entropy(model: object) -> float:
    """The policy's mean entropy on the states of the rollout in ``model.rollout_buffer``."""
    kind = policy_kind(model.policy)
    batch = kind.rollout_batch(model.rollout_buffer, model.device)
    model.policy.set_training_mode(False)
    with th.no_grad(), distribution_validation(False):
        distribution, _ = kind.distribution(model.policy, batch)
        entropy = distribution.entropy()
    return float("nan") if entropy is None else entropy.mean().item()
