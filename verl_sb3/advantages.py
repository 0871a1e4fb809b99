"""Critic-free advantages of a rollout (GRPO, Dr. GRPO, RLOO, REINFORCE++) and loss-aggregation weights.

Pure numpy functions of a rollout laid out environment-major (row ``env * n_steps + step``), as
veRL's ``verl/trainer/ppo/core_algos.py`` computes them on a batch of responses:

- ``grpo``: each episode's outcome (its rewards summed) minus its group's mean, divided by the
  group's standard deviation (unbiased, plus ``1e-6``), at every step of the episode;
- ``dr_grpo``: the same without the division (Dr. GRPO, veRL's ``norm_adv_by_std_in_grpo=False``);
- ``rloo``: the outcome minus the mean outcome of the group's other episodes;
- ``reinforce_plus_plus``: each step's discounted return to the episode's end, whitened over the
  rollout (mean 0, unbiased variance 1, veRL's ``masked_whiten``); no groups needed.

An SB3 rollout is a fixed number of steps per environment, so an episode can begin in the
previous rollout or end in the next one. Group estimators use the episodes that begin and end
in the rollout; REINFORCE++ those that end in it (a return to the end needs only later
rewards). A group counts with at least two such episodes; the steps of every other episode are
left out of the loss (weight 0, advantage 0). With ``filter_groups`` (DAPO's dynamic sampling),
groups whose outcomes are all equal are left out too.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: ``advantage_estimator`` values: GAE (with the critic) and the critic-free ones.
ADVANTAGE_ESTIMATORS = ("gae", "grpo", "dr_grpo", "rloo", "reinforce_plus_plus")
#: Estimators that compare the episodes of a group.
GROUP_ESTIMATORS = ("grpo", "dr_grpo", "rloo")
#: veRL's ``loss_agg_mode`` values.
LOSS_AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
#: veRL's epsilon in GRPO's division by the group's standard deviation.
GRPO_EPSILON = 1e-6


@dataclass
class RolloutEpisodes:
    """A rollout's episodes: ``episode[row]`` numbers the episode of each sample (environment-major);
    per episode, whether it ``began`` and ``ended`` within the rollout, its ``length`` there, and
    its ``group`` (an integer numbering the rollout's distinct group keys; -1 without one)."""

    episode: np.ndarray
    began: np.ndarray
    ended: np.ndarray
    length: np.ndarray
    group: np.ndarray

    @property
    def complete(self) -> np.ndarray:
        return self.began & self.ended


def rollout_episodes(episode_starts: np.ndarray, ends: np.ndarray, group_keys: np.ndarray) -> RolloutEpisodes:
    """The episodes of a rollout given as ``(n_steps, n_envs)`` arrays: ``episode_starts`` (SB3's
    buffer field: the step begins an episode), ``ends`` (the step ends one) and ``group_keys``
    ``(n_steps, n_envs, 2)``: at a step that ends an episode, its ``(group, group_episode)``, else -1."""
    n_steps, n_envs = episode_starts.shape
    starts = np.asarray(episode_starts, dtype=bool).T.reshape(-1)
    first_of_env = np.zeros(n_steps * n_envs, dtype=bool)
    first_of_env[::n_steps] = True
    new = starts | first_of_env
    episode = np.cumsum(new) - 1
    first_rows, last_rows = np.flatnonzero(new), np.r_[np.flatnonzero(new)[1:] - 1, n_steps * n_envs - 1]
    keys = np.asarray(group_keys).transpose(1, 0, 2).reshape(-1, 2)[last_rows]
    ended = np.asarray(ends, dtype=bool).T.reshape(-1)[last_rows]
    group = np.full(len(first_rows), -1, dtype=np.int64)
    keyed = ended & (keys >= 0).all(axis=1)
    if keyed.any():
        _, group[keyed] = np.unique(keys[keyed], axis=0, return_inverse=True)
    return RolloutEpisodes(episode, starts[first_rows], ended, last_rows - first_rows + 1, group)


@dataclass
class EstimatedAdvantages:
    """Per sample (environment-major): ``advantages``, ``returns`` and ``included`` (in the loss);
    per episode: ``group`` (-1 when not in a counted group); and the rollout's group counts."""

    advantages: np.ndarray
    returns: np.ndarray
    included: np.ndarray
    group: np.ndarray
    n_groups: int = 0
    zero_variance_groups: int = 0
    filtered_groups: int = 0


def episode_outcomes(rewards: np.ndarray, episodes: RolloutEpisodes) -> np.ndarray:
    """Each episode's rewards summed (``rewards`` environment-major), in float64."""
    return np.bincount(episodes.episode, weights=rewards.astype(np.float64), minlength=len(episodes.length))


def group_advantages(
    estimator: str, rewards: np.ndarray, episodes: RolloutEpisodes, filter_groups: bool = False
) -> EstimatedAdvantages:
    """``grpo``, ``dr_grpo`` or ``rloo`` advantages of a rollout (``rewards`` environment-major)."""
    outcomes = episode_outcomes(rewards, episodes)
    candidate = episodes.complete & (episodes.group >= 0)
    members = np.bincount(episodes.group[candidate], minlength=max(int(episodes.group.max(initial=-1)) + 1, 1))
    group = np.where(candidate & (members[np.maximum(episodes.group, 0)] >= 2), episodes.group, -1)
    advantage = np.zeros(len(outcomes))
    n_groups = zero_variance = filtered = 0
    for g in np.unique(group[group >= 0]):
        index = np.flatnonzero(group == g)
        scores = outcomes[index]
        n_groups += 1
        uniform = bool(np.all(scores == scores[0]))
        zero_variance += uniform
        if uniform and filter_groups:
            filtered += 1
            group[index] = -1
            continue
        if not uniform:  # equal outcomes: exactly 0 (the mean's rounding would leave +-1e-11)
            advantage[index] = _group_advantage(estimator, scores)
    per_sample = advantage[episodes.episode]
    included = (group >= 0)[episodes.episode]
    per_sample[~included] = 0.0
    return EstimatedAdvantages(per_sample, per_sample.copy(), included, group, n_groups, zero_variance, filtered)


def _group_advantage(estimator: str, scores: np.ndarray) -> np.ndarray:
    mean = scores.mean()
    if estimator == "grpo":
        return (scores - mean) / (scores.std(ddof=1) + GRPO_EPSILON)
    if estimator == "dr_grpo":
        return scores - mean
    if estimator == "rloo":
        n = len(scores)
        return scores * n / (n - 1) - mean * n / (n - 1)
    raise ValueError(f"advantage_estimator: {estimator!r} is not a group estimator {GROUP_ESTIMATORS}")


def reinforce_plus_plus_advantages(rewards: np.ndarray, episodes: RolloutEpisodes, gamma: float) -> EstimatedAdvantages:
    """REINFORCE++: returns to each episode's end (discount ``gamma``), whitened over the steps of
    the episodes that end in the rollout."""
    returns = np.zeros(len(rewards))
    running = 0.0
    for row in range(len(rewards) - 1, -1, -1):  # the rows of an episode are consecutive, its end last
        if row == len(rewards) - 1 or episodes.episode[row + 1] != episodes.episode[row]:
            running = 0.0
        running = float(rewards[row]) + gamma * running
        returns[row] = running
    included = episodes.ended[episodes.episode]
    advantages = np.zeros(len(rewards))
    if included.any():
        values = returns[included]
        variance = values.var(ddof=1) if len(values) > 1 else 0.0
        advantages[included] = (values - values.mean()) / np.sqrt(variance + 1e-8)
    returns[~included] = 0.0
    return EstimatedAdvantages(advantages, returns, included, np.full(len(episodes.length), -1))


def loss_weights(mode: str, included: np.ndarray, episodes: RolloutEpisodes, scale: float) -> np.ndarray:
    """Per sample, its weight in the rollout's loss ``sum(weight * per_sample_loss)`` (veRL's ``agg_loss``
    over the whole rollout, episodes as its sequences): ``token-mean`` 1 / included samples;
    ``seq-mean-token-sum`` 1 / included episodes; ``seq-mean-token-mean`` 1 / (included episodes x the
    episode's samples); ``seq-mean-token-sum-norm`` 1 / (included episodes x ``scale``): each episode's
    token sum over a constant, averaged (Dr. GRPO's; veRL sums its micro-batch's instead, a constant
    factor more). Excluded: 0."""
    if mode not in LOSS_AGG_MODES:
        raise ValueError(f"loss_agg_mode: expected one of {LOSS_AGG_MODES}, got {mode!r}")
    weights = np.zeros(len(included))
    if not included.any():
        return weights
    n_episodes = len(np.unique(episodes.episode[included]))
    if mode == "token-mean":
        weights[included] = 1.0 / included.sum()
    elif mode == "seq-mean-token-sum":
        weights[included] = 1.0 / n_episodes
    elif mode == "seq-mean-token-mean":
        weights[included] = 1.0 / (n_episodes * episodes.length[episodes.episode[included]])
    else:
        weights[included] = 1.0 / (n_episodes * scale)
    return weights
