"""Rollout buffers that remember their last minibatch's samples and estimate advantages without a critic.

Figures computed once on the whole rollout (the reference policy's log-probabilities, for the
KL loss; each sample's weight in the loss) are laid out as each minibatch by
:meth:`SampleIndices.minibatch_rows`; SB3's buffers otherwise never say which samples a
minibatch holds. The same buffers record where episodes end and which group each belongs to,
and compute the advantages of :attr:`AdvantageSettings.estimator` (:mod:`verl_sb3.advantages`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch as th
from sb3_contrib.common.recurrent.buffers import RecurrentDictRolloutBuffer, RecurrentRolloutBuffer
from stable_baselines3.common.buffers import DictRolloutBuffer, RolloutBuffer

from verl_sb3 import advantages as A


@dataclass(frozen=True)
class AdvantageSettings:
    """How a buffer turns a rollout into advantages and loss weights (see :mod:`verl_sb3.advantages`);
    ``loss_scale`` is ``seq-mean-token-sum-norm``'s constant divisor."""

    estimator: str = "gae"
    loss_agg_mode: str = "token-mean"
    filter_groups: bool = False
    loss_scale: float = 1.0

    @property
    def weighted(self) -> bool:
        """Whether the loss weighs samples (else SB3's mean over each minibatch)."""
        return self.estimator != "gae" or self.loss_agg_mode != "token-mean"


class SampleIndices:
    """A rollout buffer mixin: ``sample_indices`` holds the rows (environment-major, as ``get()``
    flattens the rollout) of the minibatch last returned; ``advantage_settings`` say how
    :meth:`compute_returns_and_advantage` estimates advantages (GAE: the parent's computation)."""

    sample_indices: np.ndarray | None = None
    advantage_settings: AdvantageSettings = AdvantageSettings()
    #: the last rollout's episodes and critic-free estimate (None for GAE), and each sample's loss
    #: weight (environment-major; None: SB3's mean over each minibatch)
    episodes: A.RolloutEpisodes | None = None
    estimate: A.EstimatedAdvantages | None = None
    sample_weights: np.ndarray | None = None
    #: ``sample_weights`` laid out as the minibatch last returned (None without weights)
    minibatch_weights: th.Tensor | None = None

    def reset(self) -> None:
        super().reset()
        self.episode_ends = np.zeros((self.buffer_size, self.n_envs), dtype=bool)
        self.group_keys = np.full((self.buffer_size, self.n_envs, 2), -1, dtype=np.int64)
        self.episodes = self.estimate = self.sample_weights = self.minibatch_weights = None

    def record_episode_ends(self, infos: list[dict[str, Any]], dones: np.ndarray) -> None:
        """Note the episodes that the step about to be added ends, and their groups (from the last
        info: ``group`` and ``group_episode``); a group estimator refuses an episode without them."""
        for index in np.flatnonzero(dones):
            self.episode_ends[self.pos, index] = True
            info = infos[index]
            if "group" in info and "group_episode" in info:
                self.group_keys[self.pos, index] = (int(info["group"]), int(info["group_episode"]))
            elif self.advantage_settings.estimator in A.GROUP_ESTIMATORS:
                raise ValueError(
                    f"advantage_estimator: {self.advantage_settings.estimator!r} compares the episodes of a group, "
                    "and an episode ended without 'group' and 'group_episode' in its info: use an environment with "
                    "groups, e.g. make_textgen_vec_env(n, group_size=4)"
                )

    def compute_returns_and_advantage(self, last_values: th.Tensor, dones: np.ndarray) -> None:
        """GAE (the parent's), or the critic-free estimator's advantages; then the loss weights."""
        settings = self.advantage_settings
        if settings.estimator == "gae":
            super().compute_returns_and_advantage(last_values, dones)
        if not settings.weighted:
            return
        self.episodes = A.rollout_episodes(self.episode_starts, self.episode_ends, self.group_keys)
        included = np.ones(self.buffer_size * self.n_envs, dtype=bool)
        if settings.estimator != "gae":
            rewards = self.rewards.T.reshape(-1)
            if settings.estimator == "reinforce_plus_plus":
                self.estimate = A.reinforce_plus_plus_advantages(rewards, self.episodes, self.gamma)
            else:
                self.estimate = A.group_advantages(settings.estimator, rewards, self.episodes, settings.filter_groups)
            shape = (self.n_envs, self.buffer_size)
            self.advantages = self.estimate.advantages.reshape(shape).T.astype(np.float32)
            self.returns = self.estimate.returns.reshape(shape).T.astype(np.float32)
            included = self.estimate.included
        weights = A.loss_weights(settings.loss_agg_mode, included, self.episodes, settings.loss_scale)
        self.sample_weights = weights.astype(np.float32)

    def _get_samples(self, batch_inds: np.ndarray, *args: Any, **kwargs: Any) -> Any:
        samples = super()._get_samples(batch_inds, *args, **kwargs)
        self.sample_indices = batch_inds
        if self.sample_weights is not None:  # once per minibatch, for every term of its loss
            self.minibatch_weights = self.minibatch_rows(self.sample_weights)
        return samples

    def minibatch_rows(self, values: np.ndarray) -> th.Tensor:
        """``values`` (one row per sample of the rollout, environment-major) for the last minibatch."""
        return self.to_torch(values[self.sample_indices])


class RecurrentSampleIndices(SampleIndices):
    """For recurrent buffers, whose minibatches are padded sequences: rows laid out and padded alike."""

    def minibatch_rows(self, values: np.ndarray) -> th.Tensor:
        rows = values[self.sample_indices]
        if rows.ndim == 1:
            return self.pad_and_flatten(rows)
        return self.pad(rows).reshape(-1, *rows.shape[1:])  # set by the last _get_samples


class IndexedRolloutBuffer(SampleIndices, RolloutBuffer):
    pass


class IndexedDictRolloutBuffer(SampleIndices, DictRolloutBuffer):
    pass


class IndexedRecurrentRolloutBuffer(RecurrentSampleIndices, RecurrentRolloutBuffer):
    pass


class IndexedRecurrentDictRolloutBuffer(RecurrentSampleIndices, RecurrentDictRolloutBuffer):
    pass


#: SB3's and sb3-contrib's buffer classes and their indexed twins.
INDEXED = {
    RolloutBuffer: IndexedRolloutBuffer,
    DictRolloutBuffer: IndexedDictRolloutBuffer,
    RecurrentRolloutBuffer: IndexedRecurrentRolloutBuffer,
    RecurrentDictRolloutBuffer: IndexedRecurrentDictRolloutBuffer,
}


def indexed_twin(buffer: Any, settings: AdvantageSettings | None = None) -> Any:
    """A buffer of the same settings as ``buffer`` (SB3's or sb3-contrib's, empty) that remembers its
    samples; ``buffer`` itself when it already does or when it is another class. With ``settings``,
    the twin estimates advantages by them (another class of buffer: a ValueError)."""
    if isinstance(buffer, SampleIndices):
        if settings is not None:
            buffer.advantage_settings = settings
        return buffer
    twin = INDEXED.get(type(buffer))
    if twin is None:
        if settings is not None and settings.weighted:
            raise ValueError(
                f"advantage_estimator / loss_agg_mode: need one of SB3's or sb3-contrib's rollout buffers, "
                f"got {type(buffer).__name__}"
            )
        return buffer
    arguments = dict(
        buffer_size=buffer.buffer_size,
        observation_space=buffer.observation_space,
        action_space=buffer.action_space,
        device=buffer.device,
        gae_lambda=buffer.gae_lambda,
        gamma=buffer.gamma,
        n_envs=buffer.n_envs,
    )
    if isinstance(buffer, RecurrentRolloutBuffer | RecurrentDictRolloutBuffer):
        arguments["hidden_state_shape"] = buffer.hidden_state_shape
    indexed = twin(**arguments)
    if settings is not None:
        indexed.advantage_settings = settings
    return indexed
