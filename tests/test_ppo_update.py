"""PPO's update as :class:`PPOUpdateMixin` writes it: the parents' update bit for bit, its figures,
the extra loss terms, and a verified update interrupted half-way."""

from __future__ import annotations

import copy

import pytest
import torch as th
from sb3_contrib import RecurrentPPO
from stable_baselines3 import PPO
from tensor_asserts import assert_same_tensors

from textenv_gym.sb3_vec_env import make_textgen_vec_env
from verl_sb3 import PPOUpdateMixin, VerifiedPPO, VerifiedRecurrentPPO
from verl_sb3.policies import SLMLstmPolicy

PERMISSIVE = dict(kl_threshold=1e9, min_entropy=0.0, surrogate_tolerance=1e9, advantage_tolerance=1e9)
RECURRENT = dict(
    n_steps=12,
    batch_size=20,
    n_epochs=2,
    learning_rate=3e-3,
    seed=0,
    clip_range_vf=0.5,
    policy_kwargs=dict(lstm_hidden_size=16, n_lstm_layers=1, embedding_dim=8),
)
FEED_FORWARD = dict(
    n_steps=64, batch_size=32, n_epochs=3, learning_rate=3e-3, seed=0, policy_kwargs=dict(net_arch=[16])
)


def textgen():
    return make_textgen_vec_env(3, seed=0, vocab_size=8, max_length=5)  # episodes end mid-rollout: padded minibatches


def figures(model) -> dict:
    return {key: value for key, value in model.logger.name_to_value.items() if key.startswith("train/")}


def test_the_recurrent_update_is_recurrent_ppos_bit_for_bit():
    verified = VerifiedRecurrentPPO("SLMLstmPolicy", textgen(), **PERMISSIVE, **RECURRENT).learn(4 * 36)
    parent = RecurrentPPO(SLMLstmPolicy, textgen(), **RECURRENT).learn(4 * 36)  # built after: SB3 seeds torch globally
    assert [entry["accepted"] and entry["backtracks"] == 0 for entry in verified.verification_log] == [True] * 4
    assert_same_tensors(dict(verified.policy.state_dict()), dict(parent.policy.state_dict()))
    assert_same_tensors(verified.policy.optimizer.state_dict(), parent.policy.optimizer.state_dict())
    assert figures(verified) == figures(parent)


def test_the_feed_forward_update_is_ppos_with_the_same_figures():
    class UpdatedPPO(PPOUpdateMixin, PPO):
        pass

    ours = UpdatedPPO("MlpPolicy", "CartPole-v1", **FEED_FORWARD).learn(3 * 64)
    theirs = PPO("MlpPolicy", "CartPole-v1", **FEED_FORWARD).learn(3 * 64)
    assert_same_tensors(dict(ours.policy.state_dict()), dict(theirs.policy.state_dict()))
    assert figures(ours) == figures(theirs) and "train/learning_rate" in figures(ours)
    assert ours.logger.name_to_excluded == theirs.logger.name_to_excluded  # n_updates stays out of TensorBoard


def test_extra_loss_terms_join_the_loss_and_the_figures():
    class Pulled(PPOUpdateMixin, PPO):
        def _extra_losses(self, log_prob, mask):
            return {**super()._extra_losses(log_prob, mask), "pull": 0.5 * (log_prob**2).mean()}

    plain = type("Plain", (PPOUpdateMixin, PPO), {})("MlpPolicy", "CartPole-v1", **FEED_FORWARD).learn(64)
    pulled = Pulled("MlpPolicy", "CartPole-v1", **FEED_FORWARD).learn(64)
    assert "train/pull" in figures(pulled) and figures(pulled)["train/pull"] > 0 and "train/pull" not in figures(plain)
    assert not th.equal(plain.policy.action_net.weight, pulled.policy.action_net.weight)
    assert figures(pulled)["train/loss"] > figures(plain)["train/loss"]  # the total holds the term


@pytest.mark.parametrize(
    "cls, policy, make_env, kwargs",
    [
        (VerifiedPPO, "MlpPolicy", lambda: "CartPole-v1", FEED_FORWARD),
        (VerifiedRecurrentPPO, "SLMLstmPolicy", textgen, RECURRENT),
    ],
)
def test_an_update_interrupted_half_way_is_undone_before_the_interruption_propagates(cls, policy, make_env, kwargs):
    class Interrupted(cls):
        interrupt_at = None  # a minibatch number

        def _extra_losses(self, log_prob, mask):
            self.minibatches = getattr(self, "minibatches", 0) + 1
            if self.minibatches == self.interrupt_at:
                raise KeyboardInterrupt
            return super()._extra_losses(log_prob, mask)

    model = Interrupted(policy, make_env(), **{**kwargs, "n_epochs": 1, "batch_size": kwargs["n_steps"] // 2})
    model.learn(model.n_steps * model.n_envs)
    model.interrupt_at = model.minibatches + 2  # the next update's second minibatch: one optimizer step made
    before = copy.deepcopy(model.policy.state_dict()), copy.deepcopy(model.policy.optimizer.state_dict())
    n_updates, n_log = model._n_updates, len(model.verification_log)
    with pytest.raises(KeyboardInterrupt):
        model.learn(3 * model.n_steps * model.n_envs, reset_num_timesteps=False)
    assert model.minibatches == model.interrupt_at
    assert_same_tensors(dict(model.policy.state_dict()), before[0])
    assert_same_tensors(model.policy.optimizer.state_dict(), before[1])
    assert model._n_updates == n_updates and len(model.verification_log) == n_log
