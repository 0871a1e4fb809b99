"""How the rollout is read: the recorded logits, the buffers that remember their samples, and the
advantages computed again after the reference-KL penalty."""

from __future__ import annotations

import numpy as np
import pytest
import torch as th
from sb3_contrib import RecurrentPPO
from stable_baselines3 import PPO

from textenv_gym.sb3_vec_env import make_textgen_vec_env
from verl_sb3 import VerifiedPPO, VerifiedRecurrentPPO
from verl_sb3.buffers import SampleIndices, indexed_twin
from verl_sb3.policies import SLMLstmPolicy
from verl_sb3.rollout import LogitsRecorder

SLM = dict(policy_kwargs=dict(lstm_hidden_size=16, n_lstm_layers=1, embedding_dim=8))


def env(n=2):
    return make_textgen_vec_env(n, seed=0, vocab_size=8, max_length=5)


def test_the_recorder_keeps_one_row_of_logits_per_step_and_nothing_else():
    model = PPO("MlpPolicy", env(), n_steps=4, seed=0)
    obs = th.as_tensor(model.env.reset())
    recorder = LogitsRecorder(model.policy, n_envs=2, n_steps=2)
    with recorder, th.no_grad():
        model.policy(obs)
        model.policy.get_distribution(th.cat([obs, obs, obs]))  # a whole-rollout evaluation: not a step
        assert recorder.logits is None  # one step of two
        model.policy(obs)
    expected = model.policy.get_distribution(obs).distribution.logits
    assert recorder.logits.shape == (2, 2, 8) and th.equal(recorder.logits[:, 1], expected)
    with th.no_grad():
        model.policy(obs)  # after the block: the hook is gone
    assert recorder.steps == 2
    with LogitsRecorder(model.policy, n_envs=2, n_steps=1) as extra, th.no_grad():
        model.policy(obs)
        model.policy(obs)  # a step too many: the recording cannot be trusted
    assert extra.logits is None


def test_a_policy_without_categorical_actions_records_nothing():
    model = PPO("MlpPolicy", "Pendulum-v1", n_steps=4, seed=0)
    with LogitsRecorder(model.policy, 1, 1) as recorder, th.no_grad():
        model.policy(th.zeros(1, 3))
    assert recorder.logits is None


@pytest.mark.parametrize("cls, policy", [(PPO, "MlpPolicy"), (RecurrentPPO, SLMLstmPolicy)])
def test_an_indexed_twin_has_the_settings_and_lays_rows_out_as_the_minibatch(cls, policy):
    kwargs = SLM if cls is RecurrentPPO else {}
    model = cls(policy, env(3), n_steps=6, batch_size=5, seed=0, **kwargs)
    twin = indexed_twin(model.rollout_buffer)
    assert isinstance(twin, SampleIndices) and isinstance(twin, type(model.rollout_buffer))
    for name in ("buffer_size", "n_envs", "gamma", "gae_lambda", "observation_space", "action_space"):
        assert getattr(twin, name) == getattr(model.rollout_buffer, name), name
    model.rollout_buffer = twin
    model.learn(18)  # one rollout, then get() flattens it
    log_probs = twin.log_probs.flatten()  # environment-major rows after get()
    for samples in twin.get(5):
        assert th.equal(twin.minibatch_rows(log_probs), samples.old_log_prob)
        wide = np.stack([log_probs, 2 * log_probs], axis=1)
        assert th.equal(twin.minibatch_rows(wide)[:, 1], 2 * samples.old_log_prob)


@pytest.mark.parametrize(
    "cls, policy, kwargs", [(VerifiedRecurrentPPO, "SLMLstmPolicy", SLM), (VerifiedPPO, "MlpPolicy", {})]
)
def test_reward_mode_computes_the_advantages_again_exactly_as_the_collection_did(cls, policy, kwargs):
    """A zero penalty changes nothing: the bootstrap values computed again after the collection are
    the ones SB3 computed in it, so the advantages are the same bit for bit."""

    def collected(**settings):
        model = cls(
            policy, env(), n_steps=8, batch_size=16, seed=0, **kwargs, **settings
        )  # seeds torch: build, then collect
        model.collect_rollouts(model.env, model._setup_learn(16, None)[1], model.rollout_buffer, 8)
        return model

    plain, penalised = collected(), collected(ref_kl_coef=0.0)
    assert penalised._ref_rollout is not None
    assert np.array_equal(plain.rollout_buffer.advantages, penalised.rollout_buffer.advantages)
    assert np.array_equal(plain.rollout_buffer.returns, penalised.rollout_buffer.returns)
