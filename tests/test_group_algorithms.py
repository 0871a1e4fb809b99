"""GRPO, Dr. GRPO, RLOO and REINFORCE++ on the verified classes: advantages, checks, rollback, save/load, errors."""

from __future__ import annotations

import copy
import json
import zipfile

import numpy as np
import pytest
import torch as th
from stable_baselines3.common.env_util import make_vec_env
from tensor_asserts import assert_same_tensors

import textenv_gym  # noqa: F401  (registers TextGen-v0)
from textenv_gym.sb3_vec_env import make_textgen_vec_env
from textenv_gym.tasks import task_kwargs
from verl_sb3 import VerifiedPPO, VerifiedRecurrentPPO
from verl_sb3.advantages import GROUP_ESTIMATORS
from verl_sb3.checkpoints import load_checkpoint, save_checkpoint
from verl_sb3.rollout import policy_kind
from verl_sb3.trust import CheckpointError
from verl_sb3.verification import checks as C
from verl_sb3.verification.context import rollout_context

LENGTH, GROUP, ENVS = 6, 4, 8
LSTM = dict(policy_kwargs=dict(lstm_hidden_size=16, embedding_dim=8))
TRANSFORMER = dict(policy_kwargs=dict(d_model=16, n_layers=1, n_heads=2, ff_dim=32))
POLICIES = [(VerifiedRecurrentPPO, "SLMLstmPolicy", LSTM), (VerifiedPPO, "SLMTransformerPolicy", TRANSFORMER)]
ESTIMATORS = ("grpo", "dr_grpo", "rloo", "reinforce_plus_plus")


def grouped_env(group_size: int = GROUP, **kwargs):
    return make_textgen_vec_env(ENVS, seed=0, group_size=group_size, vocab_size=10, max_length=LENGTH, **kwargs)


def model_of(cls, policy, policy_kwargs, estimator="grpo", env=None, **kwargs):
    settings = dict(n_steps=LENGTH, batch_size=24, n_epochs=2, learning_rate=3e-3, seed=0)
    settings.update(kwargs)
    env = grouped_env() if env is None else env
    return cls(policy, env, advantage_estimator=estimator, **policy_kwargs, **settings)


def hand_advantages(estimator: str, rewards: np.ndarray) -> np.ndarray:
    """One episode per environment (n_steps == length): each environment's outcome against its group's."""
    outcomes = rewards.sum(axis=0)  # (n_envs,)
    advantages = np.zeros(len(outcomes))
    for start in range(0, len(outcomes), GROUP):
        group = outcomes[start : start + GROUP]
        if estimator == "grpo":
            advantages[start : start + GROUP] = (group - group.mean()) / (group.std(ddof=1) + 1e-6)
        elif estimator == "dr_grpo":
            advantages[start : start + GROUP] = group - group.mean()
        else:
            advantages[start : start + GROUP] = [s - np.delete(group, i).mean() for i, s in enumerate(group)]
    return np.broadcast_to(advantages, rewards.shape)


@pytest.mark.parametrize("estimator", GROUP_ESTIMATORS)
@pytest.mark.parametrize("cls, policy, policy_kwargs", POLICIES)
def test_group_estimators_match_a_hand_computation_on_a_rollout(cls, policy, policy_kwargs, estimator):
    model = model_of(cls, policy, policy_kwargs, estimator)
    model.learn(2 * LENGTH * ENVS)
    buffer = model.rollout_buffer
    rewards = buffer.rewards  # (n_steps, n_envs): get() flattens the other fields only
    advantages = buffer.advantages if not buffer.generator_ready else buffer.advantages.reshape(ENVS, LENGTH).T
    np.testing.assert_allclose(advantages, hand_advantages(estimator, rewards), rtol=1e-5, atol=1e-5)
    assert model.logger.name_to_value["verl/groups"] == ENVS // GROUP
    assert all(entry["accepted"] for entry in model.verification_log)


@pytest.mark.parametrize("cls, policy, policy_kwargs", POLICIES)
def test_reinforce_plus_plus_whitens_the_returns_to_go(cls, policy, policy_kwargs):
    model = model_of(cls, policy, policy_kwargs, "reinforce_plus_plus", gamma=0.9)
    model.learn(LENGTH * ENVS)
    buffer = model.rollout_buffer
    rewards = buffer.rewards
    returns = np.zeros_like(rewards, dtype=np.float64)
    running = np.zeros(ENVS)
    for step in reversed(range(LENGTH)):
        running = rewards[step] + 0.9 * running
        returns[step] = running
    expected = (returns - returns.mean()) / np.sqrt(returns.var(ddof=1) + 1e-8)
    advantages = buffer.advantages.reshape(ENVS, LENGTH).T if buffer.generator_ready else buffer.advantages
    np.testing.assert_allclose(advantages, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cls, policy, policy_kwargs", POLICIES)
def test_without_a_critic_the_value_head_is_left_alone(cls, policy, policy_kwargs):
    model = model_of(cls, policy, policy_kwargs, "rloo")
    value_before = copy.deepcopy(model.policy.value_net.state_dict())
    before = copy.deepcopy(model.policy.state_dict())
    model.learn(3 * LENGTH * ENVS)
    assert_same_tensors(dict(model.policy.value_net.state_dict()), value_before)
    changed = [name for name, value in model.policy.state_dict().items() if not th.equal(value, before[name])]
    assert changed and not [name for name in changed if name.startswith("value_net")]
    figures = model.logger.name_to_value
    assert "train/value_loss" not in figures and "train/explained_variance" not in figures
    assert "train/policy_gradient_loss" in figures


@pytest.mark.parametrize("cls, policy, policy_kwargs", POLICIES)
def test_the_actor_alone_gives_the_log_probabilities_of_evaluate_actions(cls, policy, policy_kwargs):
    model = model_of(cls, policy, policy_kwargs, "grpo")
    model.learn(LENGTH * ENVS)
    kind = policy_kind(model.policy)
    samples = next(model.rollout_buffer.get(24))
    actions = samples.actions.long().flatten()
    model.policy.set_training_mode(False)
    with th.no_grad():
        _, log_prob, entropy = kind.evaluate_minibatch(model.policy, samples, actions)
        actor_log_prob, actor_entropy = kind.evaluate_actor_minibatch(model.policy, samples, actions)
    th.testing.assert_close(actor_log_prob, log_prob)
    th.testing.assert_close(actor_entropy, entropy)


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("cls, policy, policy_kwargs", POLICIES)
def test_a_forced_failure_rolls_a_group_update_back_exactly(cls, policy, policy_kwargs, estimator):
    class Probe(cls):
        def train(self):
            self.before = (copy.deepcopy(self.policy.state_dict()), copy.deepcopy(self.policy.optimizer.state_dict()))
            super().train()

    model = model_of(Probe, policy, policy_kwargs, estimator, kl_threshold=1e-12, max_backtracks=0)
    model.learn(2 * LENGTH * ENVS)
    params, optimizer = model.before
    assert_same_tensors(dict(model.policy.state_dict()), params)
    assert_same_tensors(copy.deepcopy(model.policy.optimizer.state_dict()), optimizer)
    assert [entry["rolled_back"] for entry in model.verification_log] == [True, True]
    assert all(entry["kl"] > 1e-12 for entry in model.verification_log)


def rollout_check(model):
    """The group-advantage check of the model's last rollout, after a fault put in ``fault(buffer)``."""
    kind = policy_kind(model.policy)
    batch = kind.rollout_batch(model.rollout_buffer, model.device)
    old = kind.old_distribution(model.policy, batch, None)
    ctx = rollout_context(kind, batch, old, None, model.normalize_advantage)
    return C.group_advantage_check(ctx, model.advantage_tolerance)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_group_checks_pass_on_the_estimate_and_fail_on_injected_faults(estimator):
    model = model_of(VerifiedPPO, "SLMTransformerPolicy", TRANSFORMER, estimator)
    model.learn(LENGTH * ENVS)
    buffer = model.rollout_buffer
    assert rollout_check(model).passed
    flat = buffer.advantages.reshape(-1)  # environment-major after get()
    saved = flat.copy()
    if estimator == "reinforce_plus_plus":
        flat += 0.5  # no longer whitened
    else:
        flat[: GROUP * LENGTH] += 0.5  # the first group no longer centred
    result = rollout_check(model)
    assert not result.passed and result.value > model.advantage_tolerance
    flat[:] = saved
    flat[3] = np.nan  # a NaN outcome
    result = rollout_check(model)
    assert not result.passed and "1 non-finite" in result.message


def test_an_update_on_advantages_made_uncentred_is_rolled_back():
    class Uncentred(VerifiedPPO):
        def train(self):
            self.rollout_buffer.advantages[:, :GROUP] += 1.0  # before get(): (n_steps, n_envs)
            self.before = copy.deepcopy(self.policy.state_dict())
            super().train()

    model = model_of(Uncentred, "SLMTransformerPolicy", TRANSFORMER, "dr_grpo", max_backtracks=0)
    model.learn(LENGTH * ENVS)
    assert_same_tensors(dict(model.policy.state_dict()), model.before)
    assert "group_advantages" in model.verification_log[0]["reason"]


def test_nan_rewards_make_an_update_that_is_rolled_back():
    class NaNOutcome(VerifiedPPO):
        def train(self):
            self.before = copy.deepcopy(self.policy.state_dict())
            super().train()

    env = grouped_env()
    model = model_of(NaNOutcome, "SLMTransformerPolicy", TRANSFORMER, "grpo", env=env, max_backtracks=0)
    original = model.rollout_buffer.compute_returns_and_advantage

    def poisoned(last_values, dones):
        model.rollout_buffer.rewards[-1, 0] = np.nan
        original(last_values, dones)

    model.rollout_buffer.compute_returns_and_advantage = poisoned
    model.learn(LENGTH * ENVS)
    assert_same_tensors(dict(model.policy.state_dict()), model.before)
    assert not model.verification_log[0]["accepted"]


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_every_loss_aggregation_mode_trains_with_the_reference_kl_loss(mode):
    model = model_of(
        VerifiedRecurrentPPO,
        "SLMLstmPolicy",
        LSTM,
        "grpo",
        loss_agg_mode=mode,
        clip_range_high=0.28,
        ref_kl_coef=0.01,
        ref_kl_mode="loss",
        ref_kl_estimator="k3",
    )
    model.learn(2 * LENGTH * ENVS)
    figures = model.logger.name_to_value
    assert figures["train/ref_kl_loss"] > 0 and figures["train/clip_range_high"] == pytest.approx(0.28)
    assert all(entry["accepted"] for entry in model.verification_log)


def test_filter_groups_drops_groups_of_equal_outcomes_and_counts_them():
    # every step rewarded 1: each group's outcomes are equal, all groups are dropped, no update is made
    model = model_of(VerifiedPPO, "SLMTransformerPolicy", TRANSFORMER, "grpo", filter_groups=True)
    before = copy.deepcopy(model.policy.state_dict())
    original = model.rollout_buffer.compute_returns_and_advantage

    def equal_outcomes(last_values, dones):
        model.rollout_buffer.rewards[:] = 1.0
        original(last_values, dones)

    model.rollout_buffer.compute_returns_and_advantage = equal_outcomes
    model.learn(LENGTH * ENVS)
    figures = model.logger.name_to_value
    assert figures["verl/filtered_groups"] == figures["verl/zero_variance_groups"] == ENVS // GROUP
    assert figures["verl/skipped_update"] == 1.0
    assert_same_tensors(dict(model.policy.state_dict()), before)


@pytest.mark.parametrize("cls, policy, policy_kwargs", POLICIES)
def test_save_and_load_keep_the_estimator_settings(tmp_path, cls, policy, policy_kwargs):
    model = model_of(cls, policy, policy_kwargs, "rloo", loss_agg_mode="seq-mean-token-sum-norm", clip_range_high=0.3)
    model.learn(LENGTH * ENVS)
    model.save(tmp_path / "model.zip")
    loaded = cls.load(tmp_path / "model.zip", env=grouped_env())
    assert (loaded.advantage_estimator, loaded.loss_agg_mode) == ("rloo", "seq-mean-token-sum-norm")
    assert loaded.clip_range_high(1.0) == pytest.approx(0.3) and loaded.normalize_advantage is False
    assert loaded.rollout_buffer.advantage_settings == model.rollout_buffer.advantage_settings
    loaded.learn(LENGTH * ENVS)
    assert loaded.logger.name_to_value["verl/groups"] == ENVS // GROUP


def test_on_a_task_with_groups_of_prompts():
    env = make_textgen_vec_env(ENVS, seed=0, group_size=GROUP, **task_kwargs("TextGen-Reverse-v0", length=2))
    model = VerifiedRecurrentPPO("SLMLstmPolicy", env, advantage_estimator="grpo", n_steps=16, batch_size=32, seed=0)
    model.learn(2 * 16 * ENVS)
    estimate = model.rollout_buffer.estimate
    assert estimate.n_groups >= 1 and estimate.included.any()
    assert all(entry["accepted"] for entry in model.verification_log)


def test_bad_settings_are_refused_by_name():
    with pytest.raises(ValueError, match="advantage_estimator: expected one of"):
        model_of(VerifiedPPO, "SLMTransformerPolicy", TRANSFORMER, "ppo")
    with pytest.raises(ValueError, match="loss_agg_mode: expected one of"):
        model_of(VerifiedPPO, "SLMTransformerPolicy", TRANSFORMER, "grpo", loss_agg_mode="sum")
    with pytest.raises(ValueError, match="clip_range_high: expected a number"):
        model_of(VerifiedPPO, "SLMTransformerPolicy", TRANSFORMER, "grpo", clip_range_high=-0.1)
    with pytest.raises(ValueError, match="filter_groups: drops groups"):
        model_of(VerifiedPPO, "SLMTransformerPolicy", TRANSFORMER, "gae", filter_groups=True)
    with pytest.raises(ValueError, match="loss_scale_factor: expected a number"):
        model_of(VerifiedPPO, "SLMTransformerPolicy", TRANSFORMER, "grpo", loss_scale_factor=0)


def test_an_environment_without_groups_is_refused():
    with pytest.raises(ValueError, match="environment has groups of 1: make it with group_size >= 2"):
        model_of(VerifiedPPO, "SLMTransformerPolicy", TRANSFORMER, "grpo", env=grouped_env(group_size=1))
    scalar = make_vec_env("TextGen-v0", n_envs=2, env_kwargs=dict(vocab_size=10, max_length=LENGTH))
    model = model_of(VerifiedPPO, "SLMTransformerPolicy", TRANSFORMER, "rloo", env=scalar, batch_size=12)
    with pytest.raises(ValueError, match="'rloo' compares the episodes of a group.*without 'group'"):
        model.learn(LENGTH * 2)
    # REINFORCE++ needs no groups
    free = model_of(VerifiedPPO, "SLMTransformerPolicy", TRANSFORMER, "reinforce_plus_plus", env=scalar, batch_size=12)
    free.learn(LENGTH * 2)
    assert free.verification_log[0]["accepted"]


def rewritten_data(source, target, **entries):
    """A copy of checkpoint ``source`` whose ``data`` entry has ``entries`` replaced."""
    with zipfile.ZipFile(source) as archive, zipfile.ZipFile(target, "w") as copy_:
        for item in archive.infolist():
            content = archive.read(item.filename)
            if item.filename == "data":
                content = json.dumps({**json.loads(content), **entries}).encode()
            copy_.writestr(item, content)
    return target


@pytest.mark.parametrize(
    "entry, value, message",
    [
        ("advantage_estimator", "evil", "advantage_estimator: expected one of"),
        ("loss_agg_mode", 5, "loss_agg_mode: expected one of"),
        ("filter_groups", "yes", "filter_groups: expected True or False"),
        ("loss_scale_factor", -1, "loss_scale_factor: expected a number"),
    ],
)
def test_a_checkpoint_with_bad_estimator_settings_is_refused_by_name(tmp_path, entry, value, message):
    model = model_of(VerifiedPPO, "SLMTransformerPolicy", TRANSFORMER, "grpo")
    saved = save_checkpoint(model, tmp_path / "model.zip")
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(rewritten_data(saved, tmp_path / "bad.zip", **{entry: value}))
    assert load_checkpoint(saved).advantage_estimator == "grpo"


def test_groups_sharing_the_empty_prompt_carry_group_keys_in_both_vector_forms():
    import gymnasium as gym

    vector = gym.make_vec("TextGen-v0", 4, vectorization_mode="vector_entry_point", group_size=2, max_length=3)
    _, info = vector.reset(seed=0)
    assert info["group"].tolist() == [0, 0, 1, 1] and info["group_episode"].tolist() == [0] * 4
    for _ in range(4):  # 3 steps end the episodes, the 4th resets them (next-step autoreset)
        _, _, _, _, info = vector.step(vector.action_space.sample())
    assert info["group_episode"].tolist() == [1] * 4
    sb3 = grouped_env(group_size=2)
    sb3.reset()
    assert [i["group"] for i in sb3.unwrapped.reset_infos] == [0, 0, 1, 1, 2, 2, 3, 3]
    for _ in range(LENGTH):
        _, _, dones, infos = sb3.step(np.zeros(ENVS, dtype=np.int64))
    assert dones.all() and [(i["group"], i["group_episode"]) for i in infos[:3]] == [(0, 0), (0, 0), (1, 0)]
    assert "group" not in make_textgen_vec_env(2, seed=0).unwrapped.starter.info(0)  # groups of one: no keys


def test_a_clip_range_high_schedule_and_the_loss_scale_factor_are_checked():
    with pytest.raises(ValueError, match=r"clip_range_high \(at progress 0\): expected a number in \(0.0, inf\]"):
        model_of(VerifiedPPO, "SLMTransformerPolicy", TRANSFORMER, "grpo", clip_range_high=lambda progress: progress)
    with pytest.raises(ValueError, match="loss_scale_factor: expected a number in"):
        model_of(VerifiedPPO, "SLMTransformerPolicy", TRANSFORMER, "grpo", loss_scale_factor=float("inf"))
    model = model_of(VerifiedPPO, "SLMTransformerPolicy", TRANSFORMER, "grpo", clip_range_high=lambda p: 0.1 + p)
    assert model.clip_range_high(0.5) == pytest.approx(0.6)


def test_the_critic_warmup_refuses_a_critic_free_model():
    from verl_sb3 import CriticWarmupCallback

    model = model_of(VerifiedPPO, "SLMTransformerPolicy", TRANSFORMER, "rloo")
    with pytest.raises(ValueError, match="CriticWarmupCallback: advantage_estimator 'rloo' trains no critic"):
        model.learn(LENGTH * ENVS, callback=CriticWarmupCallback(2))
    model.learn(LENGTH * ENVS, callback=CriticWarmupCallback(0))


def test_equal_outcomes_give_advantages_of_exactly_zero():
    from verl_sb3 import advantages as A

    episodes = A.RolloutEpisodes(np.arange(3), np.ones(3, bool), np.ones(3, bool), np.ones(3, int), np.zeros(3, int))
    for estimator in GROUP_ESTIMATORS:
        assert A.group_advantages(estimator, np.full(3, 0.1), episodes).advantages.tolist() == [0.0] * 3


def test_a_group_estimator_starts_each_rollout_with_the_groups_together():
    env = make_textgen_vec_env(ENVS, seed=0, group_size=GROUP, **task_kwargs("TextGen-Reverse-v0", length=2))
    model = VerifiedRecurrentPPO("SLMLstmPolicy", env, advantage_estimator="rloo", n_steps=9, batch_size=24, seed=0)
    excluded = []
    for _ in range(4):  # 9 steps against episodes of about 3 to 6: episodes run over every rollout's end
        model.learn(9 * ENVS, reset_num_timesteps=False)
        buffer = model.rollout_buffer
        starts = buffer.episode_starts if not buffer.generator_ready else buffer.episode_starts.reshape(ENVS, 9).T
        assert starts[0].all()  # every environment begins a fresh episode with the rollout
        assert buffer.episodes.began[buffer.episodes.episode[::9]].all()
        excluded.append(float((~buffer.estimate.included).mean()))
    assert max(excluded) < 0.25  # only the episodes still running at the end of the rollout are left out
