"""Critic-free advantages and loss-aggregation weights against hand computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch as th
from gymnasium import spaces

from verl_sb3 import advantages as A
from verl_sb3.buffers import AdvantageSettings, IndexedRolloutBuffer
from verl_sb3.ppo_update import PPOUpdateMixin

# Two environments, four steps each. Env 0: episodes of 2 and 2 steps; env 1: one of 3 steps,
# then one still running. Group keys (group, group_episode) at the steps that end an episode.
STARTS = np.array([[1, 1], [0, 0], [1, 0], [0, 1]], dtype=np.float32)  # (n_steps, n_envs)
ENDS = np.array([[0, 0], [1, 0], [0, 1], [1, 0]], dtype=bool)
KEYS = np.full((4, 2, 2), -1)
KEYS[1, 0], KEYS[3, 0], KEYS[2, 1] = (0, 0), (0, 1), (0, 0)


def test_rollout_episodes_number_the_episodes_environment_major():
    episodes = A.rollout_episodes(STARTS, ENDS, KEYS)
    assert episodes.episode.tolist() == [0, 0, 1, 1, 2, 2, 2, 3]
    assert episodes.length.tolist() == [2, 2, 3, 1]
    assert episodes.ended.tolist() == [True, True, True, False]
    assert episodes.began.tolist() == [True, True, True, True]
    # keys (0, 0) twice: the first episodes of env 0 and env 1 are one group; (0, 1) another
    assert episodes.group.tolist() == [0, 1, 0, -1]


def test_an_episode_begun_in_the_previous_rollout_is_not_complete():
    starts = STARTS.copy()
    starts[0, 1] = 0  # env 1's first episode began before this rollout
    episodes = A.rollout_episodes(starts, ENDS, KEYS)
    assert episodes.began.tolist() == [True, True, False, True]
    assert episodes.complete.tolist() == [True, True, False, False]


def grouped(outcomes: list[float], group: list[int]) -> A.RolloutEpisodes:
    """One-step episodes, all complete, in the given groups."""
    n = len(outcomes)
    return A.RolloutEpisodes(
        episode=np.arange(n),
        began=np.ones(n, bool),
        ended=np.ones(n, bool),
        length=np.ones(n, np.int64),
        group=np.array(group),
    )


SCORES = [1.0, 2.0, 3.0, 6.0]  # mean 3, unbiased std sqrt(14 / 3)


def test_grpo_divides_by_the_groups_unbiased_standard_deviation():
    estimate = A.group_advantages("grpo", np.array(SCORES), grouped(SCORES, [0, 0, 0, 0]))
    std = math.sqrt(14 / 3)
    np.testing.assert_allclose(estimate.advantages, [(s - 3) / (std + 1e-6) for s in SCORES])
    assert estimate.n_groups == 1 and estimate.zero_variance_groups == 0


def test_dr_grpo_only_subtracts_the_group_mean():
    estimate = A.group_advantages("dr_grpo", np.array(SCORES), grouped(SCORES, [0, 0, 0, 0]))
    np.testing.assert_allclose(estimate.advantages, [-2.0, -1.0, 0.0, 3.0])


def test_rloo_subtracts_the_mean_of_the_other_episodes():
    estimate = A.group_advantages("rloo", np.array(SCORES), grouped(SCORES, [0, 0, 0, 0]))
    others = [(sum(SCORES) - s) / 3 for s in SCORES]
    np.testing.assert_allclose(estimate.advantages, [s - o for s, o in zip(SCORES, others)])
    np.testing.assert_allclose(estimate.advantages, [-8 / 3, -4 / 3, 0.0, 4.0])


def test_groups_are_compared_separately_and_a_lone_episode_is_left_out():
    scores = [1.0, 3.0, 10.0, 20.0, 7.0]
    estimate = A.group_advantages("dr_grpo", np.array(scores), grouped(scores, [0, 0, 1, 1, 2]))
    np.testing.assert_allclose(estimate.advantages, [-1.0, 1.0, -5.0, 5.0, 0.0])
    assert estimate.included.tolist() == [True, True, True, True, False]
    assert estimate.group.tolist() == [0, 0, 1, 1, -1] and estimate.n_groups == 2


def test_an_episode_that_did_not_begin_in_the_rollout_is_left_out_of_its_group():
    episodes = grouped(SCORES, [0, 0, 0, 0])
    episodes.began[3] = False  # its outcome misses the rewards of the previous rollout
    estimate = A.group_advantages("dr_grpo", np.array(SCORES), episodes)
    np.testing.assert_allclose(estimate.advantages, [-1.0, 0.0, 1.0, 0.0])
    assert not estimate.included[3]


@pytest.mark.parametrize("filter_groups", [False, True])
def test_groups_of_equal_outcomes_are_counted_and_dropped_only_when_filtering(filter_groups):
    scores = [1.0, 1.0, 0.0, 2.0]
    estimate = A.group_advantages("grpo", np.array(scores), grouped(scores, [0, 0, 1, 1]), filter_groups)
    assert estimate.zero_variance_groups == 1
    assert estimate.filtered_groups == int(filter_groups)
    assert estimate.included.tolist() == [not filter_groups, not filter_groups, True, True]
    np.testing.assert_allclose(estimate.advantages[:2], [0.0, 0.0])


def test_outcomes_sum_the_rewards_of_each_episode():
    episodes = A.rollout_episodes(STARTS, ENDS, KEYS)
    rewards = np.array([1.0, 2.0, 3.0, 4.0, 0.5, 0.5, 0.5, 9.0])  # environment-major
    np.testing.assert_allclose(A.episode_outcomes(rewards, episodes), [3.0, 7.0, 1.5, 9.0])
    estimate = A.group_advantages("dr_grpo", rewards, episodes)
    # group 0: episodes 0 (3.0) and 2 (1.5); group 1: episode 1 alone; episode 3 unfinished
    np.testing.assert_allclose(estimate.advantages, [0.75, 0.75, 0, 0, -0.75, -0.75, -0.75, 0])
    assert estimate.included.tolist() == [True, True, False, False, True, True, True, False]


def test_reinforce_plus_plus_whitens_discounted_returns_to_the_end_of_each_episode():
    episodes = A.rollout_episodes(STARTS, ENDS, KEYS)
    rewards = np.array([1.0, 2.0, 3.0, 4.0, 0.5, 0.5, 0.5, 9.0])
    estimate = A.reinforce_plus_plus_advantages(rewards, episodes, gamma=0.5)
    returns = [1 + 0.5 * 2, 2.0, 3 + 0.5 * 4, 4.0, 0.5 + 0.25 + 0.125, 0.75, 0.5]  # the unfinished episode: out
    np.testing.assert_allclose(estimate.returns[:7], returns)
    values = np.array(returns)
    expected = (values - values.mean()) / np.sqrt(values.var(ddof=1) + 1e-8)
    np.testing.assert_allclose(estimate.advantages[:7], expected)
    assert estimate.advantages[7] == 0.0 and not estimate.included[7]


def test_loss_weights_of_each_aggregation_mode():
    episodes = A.rollout_episodes(STARTS, ENDS, KEYS)
    included = np.array([True, True, True, True, True, True, True, False])  # 7 samples, 3 episodes
    weights = {mode: A.loss_weights(mode, included, episodes, scale=4.0) for mode in A.LOSS_AGG_MODES}
    np.testing.assert_allclose(weights["token-mean"], [1 / 7] * 7 + [0])
    np.testing.assert_allclose(weights["seq-mean-token-sum"], [1 / 3] * 7 + [0])
    np.testing.assert_allclose(weights["seq-mean-token-mean"], [1 / 6, 1 / 6, 1 / 6, 1 / 6, 1 / 9, 1 / 9, 1 / 9, 0])
    np.testing.assert_allclose(weights["seq-mean-token-sum-norm"], [1 / 12] * 7 + [0])
    with pytest.raises(ValueError, match="loss_agg_mode: expected one of"):
        A.loss_weights("sum", included, episodes, 1.0)


def filled_buffer(settings: AdvantageSettings, rewards: np.ndarray) -> IndexedRolloutBuffer:
    """A rollout buffer holding STARTS / ENDS / KEYS, with ``rewards`` (n_steps, n_envs)."""
    buffer = IndexedRolloutBuffer(4, spaces.Box(-1, 1, (1,)), spaces.Discrete(3), n_envs=2, gamma=1.0)
    buffer.advantage_settings = settings
    for step in range(4):
        infos = [
            {"group": int(KEYS[step, env, 0]), "group_episode": int(KEYS[step, env, 1])} if ENDS[step, env] else {}
            for env in range(2)
        ]
        buffer.record_episode_ends(infos, ENDS[step])
        buffer.add(
            np.zeros((2, 1)),
            np.zeros((2, 1)),
            rewards[step],
            STARTS[step],
            th.zeros(2),
            th.zeros(2),
        )
    buffer.compute_returns_and_advantage(th.zeros(2), np.zeros(2, dtype=bool))
    return buffer


REWARDS = np.array([[1.0, 0.5], [2.0, 0.5], [3.0, 0.5], [4.0, 9.0]])  # environment-major: as above


def test_the_buffer_estimates_from_the_episode_ends_and_groups_it_was_told():
    buffer = filled_buffer(AdvantageSettings("dr_grpo", "seq-mean-token-mean"), REWARDS)
    np.testing.assert_allclose(buffer.advantages.T.reshape(-1), [0.75, 0.75, 0, 0, -0.75, -0.75, -0.75, 0])
    # two episodes in the loss (the lone one of group 1 and the unfinished one are out)
    np.testing.assert_allclose(buffer.sample_weights, [1 / 4, 1 / 4, 0, 0, 1 / 6, 1 / 6, 1 / 6, 0])


def test_a_group_estimator_refuses_an_episode_without_group_keys():
    buffer = IndexedRolloutBuffer(4, spaces.Box(-1, 1, (1,)), spaces.Discrete(3), n_envs=2)
    buffer.advantage_settings = AdvantageSettings("grpo")
    with pytest.raises(ValueError, match="'grpo' compares the episodes of a group.*group_size=4"):
        buffer.record_episode_ends([{}, {"terminal_observation": 0}], np.array([False, True]))


class Update(PPOUpdateMixin):
    """PPO's loss pieces on a given buffer, without a model."""

    def __init__(self, buffer):
        self.rollout_buffer = buffer


def test_a_minibatch_loss_is_its_share_of_the_weighted_rollout_loss():
    buffer = filled_buffer(AdvantageSettings("dr_grpo", "seq-mean-token-mean"), REWARDS)
    per_row = np.array([5.0, 1.0, 2.0, 7.0, 3.0, -4.0, 6.0, 8.0], dtype=np.float32)  # a loss per sample
    expected = float((buffer.sample_weights * per_row).sum())  # 5/4 + 1/4 + (3 - 4 + 6) / 6
    assert expected == pytest.approx(1.5 + 5 / 6)
    next(buffer.get(8))  # the whole rollout as one minibatch
    assert Update(buffer)._loss_mean(th.as_tensor(per_row[buffer.sample_indices]), None).item() == pytest.approx(
        expected
    )
    # minibatches of 4: each 8 / 4 times its weighted sum, so that they average to the rollout's loss
    totals = [
        Update(buffer)._loss_mean(th.as_tensor(per_row[buffer.sample_indices]), None).item() for _ in buffer.get(4)
    ]
    assert len(totals) == 2 and np.mean(totals) == pytest.approx(expected)


def test_without_weights_the_loss_is_sb3s_mean():
    buffer = IndexedRolloutBuffer(4, spaces.Box(-1, 1, (1,)), spaces.Discrete(3), n_envs=2)
    values = th.tensor([1.0, 2.0, 6.0])
    assert Update(buffer)._loss_mean(values, None).item() == pytest.approx(3.0)
    assert Update(buffer)._loss_mean(values, th.tensor([True, False, True])).item() == pytest.approx(3.5)


def test_clip_higher_bounds_the_ratio_by_separate_lower_and_upper_ranges():
    buffer = IndexedRolloutBuffer(4, spaces.Box(-1, 1, (1,)), spaces.Discrete(3), n_envs=2)
    ratio = th.tensor([0.5, 0.9, 1.1, 1.25, 1.5])
    advantages = th.tensor([1.0, -1.0, 1.0, 1.0, 1.0])
    loss, clipped = Update(buffer)._policy_loss(th.log(ratio), th.zeros(5), advantages, (0.2, 0.28), None)
    # min(r * A, clip(r, 0.8, 1.28) * A): 0.5, -0.9, 1.1, 1.25, 1.28
    assert loss.item() == pytest.approx(-(0.5 - 0.9 + 1.1 + 1.25 + 1.28) / 5)
    assert clipped.item() == pytest.approx(2 / 5)  # 0.5 below 0.8, 1.5 above 1.28
    symmetric, clipped = Update(buffer)._policy_loss(th.log(ratio), th.zeros(5), advantages, (0.2, 0.2), None)
    assert symmetric.item() == pytest.approx(-(0.5 - 0.9 + 1.1 + 1.2 + 1.2) / 5)
    assert clipped.item() == pytest.approx(3 / 5)
