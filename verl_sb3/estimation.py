"""Critic-free advantage estimators and veRL's loss settings on PPO's update, in the SB3 API.

:class:`AdvantageEstimationMixin` gives :class:`verl_sb3.ppo_update.PPOUpdateMixin`'s algorithms
(the verified classes) veRL's ``algorithm.adv_estimator`` values and actor loss settings:

- ``advantage_estimator``: ``"gae"`` (PPO's, with the critic; the default), ``"grpo"``,
  ``"dr_grpo"``, ``"rloo"`` or ``"reinforce_plus_plus"`` (:mod:`verl_sb3.advantages`). The
  group estimators compare the episodes of a group (the ``group`` / ``group_episode`` keys of
  the environment's last info: ``make_textgen_vec_env(n, group_size=g)``, or a task's
  ``group_size``); an environment without them is refused with a ValueError. Without GAE no
  critic is trained: the minibatches evaluate only the actor, there is no value loss
  (``vf_coef`` is unused), and the value head keeps its initial weights (SB3 still computes its
  values while collecting and stores them; only its bootstrap of an episode cut by a time limit
  reads them). The advantages are not normalised again per minibatch unless
  ``normalize_advantage=True`` is given.
- ``loss_agg_mode``: veRL's ``token-mean`` (SB3's mean; the default), ``seq-mean-token-sum``,
  ``seq-mean-token-mean``, ``seq-mean-token-sum-norm`` (episodes are the sequences; the norm
  mode divides by ``loss_scale_factor``, default ``n_steps``, the longest an episode can be in a
  rollout). It aggregates the policy, entropy, value and reference-KL losses alike.
- ``clip_range_high``: the ratio is clipped to ``[1 - clip_range, 1 + clip_range_high]`` (DAPO's
  clip-higher, e.g. 0.2 / 0.28); None keeps ``clip_range`` on both sides.
- ``filter_groups``: leave groups whose outcomes are all equal out of the loss (DAPO's dynamic
  sampling, without resampling: the rollout keeps its size).

A group estimator starts each rollout from freshly reset environments when an episode is still
running at its start (see :meth:`AdvantageEstimationMixin.collect_rollouts`).

The logger gets the rollout's ``verl/groups``, ``verl/zero_variance_groups``,
``verl/filtered_groups`` and ``verl/excluded_samples`` (samples left out of the loss); an
update with no sample left (every group filtered) is skipped (``verl/skipped_update``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from stable_baselines3.common.utils import FloatSchedule

from verl_sb3._validation import optional_number, require_number
from verl_sb3.advantages import ADVANTAGE_ESTIMATORS, GROUP_ESTIMATORS, LOSS_AGG_MODES
from verl_sb3.buffers import AdvantageSettings, SampleIndices, indexed_twin


def check_advantage_settings(
    advantage_estimator: Any,
    loss_agg_mode: Any,
    clip_range_high: Any = None,
    filter_groups: Any = False,
    loss_scale_factor: Any = None,
) -> None:
    """A ValueError naming the advantage-estimation setting that is not one of its values (for a
    model, a loaded one and the training job's configuration alike)."""
    if advantage_estimator not in ADVANTAGE_ESTIMATORS:
        raise ValueError(f"advantage_estimator: expected one of {ADVANTAGE_ESTIMATORS}, got {advantage_estimator!r}")
    if loss_agg_mode not in LOSS_AGG_MODES:
        raise ValueError(f"loss_agg_mode: expected one of {LOSS_AGG_MODES}, got {loss_agg_mode!r}")
    if not isinstance(filter_groups, bool):
        raise ValueError(f"filter_groups: expected True or False, got {filter_groups!r}")
    if filter_groups and advantage_estimator not in GROUP_ESTIMATORS:
        raise ValueError(
            f"filter_groups: drops groups of equal outcomes, for a group estimator {GROUP_ESTIMATORS}; "
            f"advantage_estimator is {advantage_estimator!r}"
        )
    optional_number("loss_scale_factor", loss_scale_factor, 0.0, open_low=True, open_high=True)
    if callable(clip_range_high):  # a schedule (a loaded model's FloatSchedule too): its values at both ends
        for progress in (1.0, 0.0):
            require_number(f"clip_range_high (at progress {progress:g})", clip_range_high(progress), 0.0, open_low=True)
    elif clip_range_high is not None:
        require_number("clip_range_high", clip_range_high, 0.0, open_low=True)


class AdvantageEstimationMixin:
    """``advantage_estimator``, ``loss_agg_mode``, ``clip_range_high``, ``filter_groups`` and
    ``loss_scale_factor`` for PPO's update (see the module); put it before ``PPOUpdateMixin``."""

    def __init__(
        self,
        policy: Any,
        env: Any,
        *args: Any,
        advantage_estimator: str = "gae",
        loss_agg_mode: str = "token-mean",
        clip_range_high: float | Any | None = None,
        filter_groups: bool = False,
        loss_scale_factor: float | None = None,
        **kwargs: Any,
    ) -> None:
        self.advantage_estimator = advantage_estimator
        self.loss_agg_mode = loss_agg_mode
        self.clip_range_high = clip_range_high
        self.filter_groups = filter_groups
        self.loss_scale_factor = loss_scale_factor
        self._check_advantage_settings()
        if advantage_estimator != "gae":
            kwargs.setdefault("normalize_advantage", False)  # the estimators normalise (or deliberately not)
        super().__init__(policy, env, *args, **kwargs)

    def _check_advantage_settings(self) -> None:
        check_advantage_settings(
            self.advantage_estimator,
            self.loss_agg_mode,
            self.clip_range_high,
            self.filter_groups,
            self.loss_scale_factor,
        )

    def _setup_model(self) -> None:
        self._check_advantage_settings()
        super()._setup_model()
        if self.clip_range_high is not None:
            self.clip_range_high = FloatSchedule(self.clip_range_high)
        settings = self.advantage_settings
        if settings.weighted:
            self.rollout_buffer = indexed_twin(self.rollout_buffer, settings)
        if self.advantage_estimator in GROUP_ESTIMATORS and self.env is not None:
            self._check_groups(self.env)

    @property
    def advantage_settings(self) -> AdvantageSettings:
        """The settings the rollout buffer estimates advantages and loss weights with."""
        scale = self.n_steps if self.loss_scale_factor is None else self.loss_scale_factor
        return AdvantageSettings(self.advantage_estimator, self.loss_agg_mode, self.filter_groups, float(scale))

    def _check_groups(self, env: Any) -> None:
        """Refuse an environment that declares groups of one (its ``group_size``); one that declares
        nothing is checked on its first finished episode."""
        try:
            sizes = env.get_attr("group_size")
        except (AttributeError, NotImplementedError):
            return
        if sizes and min(sizes) < 2:
            raise ValueError(
                f"advantage_estimator: {self.advantage_estimator!r} compares the episodes of a group, and the "
                f"environment has groups of {min(sizes)}: make it with group_size >= 2 "
                "(e.g. make_textgen_vec_env(n, group_size=4))"
            )

    def set_env(self, env: Any, force_reset: bool = True) -> None:
        if self.advantage_estimator in GROUP_ESTIMATORS:
            self._check_groups(env)
        super().set_env(env, force_reset)

    def collect_rollouts(self, env: Any, callback: Any, rollout_buffer: Any, n_rollout_steps: int) -> bool:
        """The parent's collection; a group estimator's starts from freshly reset environments when an
        episode is still running (it is left out of the loss anyway), so that the members of a group,
        which end their episodes at their own pace, answer their prompts together again."""
        if self.advantage_estimator in GROUP_ESTIMATORS and not np.all(self._last_episode_starts):
            self._last_obs = env.reset()
            self._last_episode_starts = np.ones((env.num_envs,), dtype=bool)
        return super().collect_rollouts(env, callback, rollout_buffer, n_rollout_steps)

    def _update_info_buffer(self, infos: list[dict[str, Any]], dones: np.ndarray | None = None) -> None:
        """SB3's episode statistics; and where episodes end, with their groups, for the buffer."""
        super()._update_info_buffer(infos, dones)
        buffer = self.rollout_buffer
        if dones is not None and isinstance(buffer, SampleIndices) and buffer.advantage_settings.weighted:
            buffer.record_episode_ends(infos, dones)

    def train(self) -> None:
        """The rollout's group counts logged, then the update (skipped when no sample is in the loss)."""
        buffer = self.rollout_buffer
        estimate = getattr(buffer, "estimate", None)
        if estimate is not None:
            self.logger.record("verl/groups", estimate.n_groups)
            self.logger.record("verl/zero_variance_groups", estimate.zero_variance_groups)
            self.logger.record("verl/filtered_groups", estimate.filtered_groups)
            self.logger.record("verl/excluded_samples", int((~estimate.included).sum()))
        weights = getattr(buffer, "sample_weights", None)
        if weights is not None and not weights.any():
            self.logger.record("verl/skipped_update", 1.0)
            return
        super().train()
