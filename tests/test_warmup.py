"""Critic warm-up: the first updates change the value function only."""

from __future__ import annotations

import gymnasium as gym
import pytest
import torch as th
from stable_baselines3 import PPO
from stable_baselines3.common.callbacks import BaseCallback

from textenv_gym.sb3_vec_env import make_textgen_vec_env
from verl_sb3 import CriticWarmupCallback, VerifiedPPO, VerifiedRecurrentPPO
from verl_sb3.warmup import critic_parameters


def snapshot(parameters) -> list[th.Tensor]:
    return [p.detach().clone() for p in parameters]


def changed(before: list[th.Tensor], parameters) -> list[bool]:
    return [not th.equal(b, p.detach()) for b, p in zip(before, parameters)]


def split(policy) -> tuple[list[th.nn.Parameter], list[th.nn.Parameter]]:
    critic_ids = {id(p) for p in critic_parameters(policy)}
    params = list(policy.parameters())
    return [p for p in params if id(p) not in critic_ids], [p for p in params if id(p) in critic_ids]


def slm_model(critic_lstm: bool = False) -> VerifiedRecurrentPPO:
    env = make_textgen_vec_env(4, seed=0, vocab_size=8, max_length=6)
    return VerifiedRecurrentPPO(
        "SLMLstmPolicy",
        env,
        n_steps=6,
        batch_size=24,
        n_epochs=2,
        learning_rate=3e-3,
        seed=0,
        policy_kwargs=dict(enable_critic_lstm=critic_lstm),
    )


@pytest.mark.parametrize("critic_lstm", [False, True])
def test_warmup_trains_the_critic_and_leaves_the_actor_bit_for_bit(critic_lstm):
    model = slm_model(critic_lstm)
    actor, critic = split(model.policy)
    assert actor and critic
    actor_before, critic_before = snapshot(actor), snapshot(critic)
    rollout = 4 * 6
    model.learn(2 * rollout, callback=CriticWarmupCallback(2))
    assert not any(changed(actor_before, actor))
    assert all(changed(critic_before, critic))
    assert not any(state for p in actor for state in model.policy.optimizer.state.get(p, {}).values())
    assert len(model.verification_log) == 2
    assert all(entry["kl"] < 1e-6 for entry in model.verification_log)  # float rounding of the old batch's pass
    assert all(p.requires_grad for p in model.policy.parameters())  # restored when learn() ends

    # the same callback settings on a continued run: past the warm-up, the actor trains
    model.learn(rollout, callback=CriticWarmupCallback(2), reset_num_timesteps=False)
    assert any(changed(actor_before, actor))
    assert model.verification_log[-1]["kl"] > 1e-4


def test_zero_updates_is_no_warmup():
    warm = slm_model()  # built and trained one after the other: SB3 seeds torch's global generator
    warm.learn(24, callback=CriticWarmupCallback(0))
    cold = slm_model()
    cold.learn(24)
    for a, b in zip(warm.policy.parameters(), cold.policy.parameters()):
        assert th.equal(a, b)


def test_ppo_mlp_policy_on_cartpole():
    model = VerifiedPPO(
        "MlpPolicy",
        gym.make("CartPole-v1"),
        n_steps=64,
        batch_size=64,
        n_epochs=2,
        seed=0,
        policy_kwargs=dict(net_arch=[16]),
    )
    actor, critic = split(model.policy)
    names = {n for n, p in model.policy.named_parameters() if any(p is c for c in critic)}
    assert names == {
        "mlp_extractor.value_net.0.weight",
        "mlp_extractor.value_net.0.bias",
        "value_net.weight",
        "value_net.bias",
    }
    actor_before, critic_before = snapshot(actor), snapshot(critic)
    model.learn(64, callback=CriticWarmupCallback(1))
    assert not any(changed(actor_before, actor)) and all(changed(critic_before, critic))


def test_a_separate_critic_features_extractor_is_the_critics():
    shared = PPO("MlpPolicy", gym.make("CartPole-v1"), policy_kwargs=dict(net_arch=[8], share_features_extractor=True))
    separate = PPO(
        "MlpPolicy", gym.make("CartPole-v1"), policy_kwargs=dict(net_arch=[8], share_features_extractor=False)
    )
    extractor = th.nn.Linear(1, 1)  # FlattenExtractor has no parameters: give the critic's one some
    separate.policy.vf_features_extractor.add_module("probe", extractor)
    shared.policy.features_extractor.add_module("probe", th.nn.Linear(1, 1))
    assert any(p is extractor.weight for p in critic_parameters(separate.policy))
    assert not any(p is shared.policy.features_extractor.probe.weight for p in critic_parameters(shared.policy))


@pytest.mark.parametrize("updates", [-1, 1.5, True, "10"])
def test_invalid_updates_are_rejected(updates):
    with pytest.raises(ValueError, match="updates: expected an integer >= 0"):
        CriticWarmupCallback(updates)


class Interrupt(BaseCallback):
    """Stands for a Ctrl-C: raises KeyboardInterrupt during the second rollout."""

    def _on_step(self) -> bool:
        if self.num_timesteps == 2 * self.model.n_steps * self.model.n_envs:
            raise KeyboardInterrupt
        return True


def test_an_interruption_during_the_warm_up_leaves_no_actor_frozen():
    model = slm_model()
    with pytest.raises(KeyboardInterrupt):
        model.learn(10 * 24, callback=[CriticWarmupCallback(5), Interrupt()])
    assert all(p.requires_grad for p in model.policy.parameters())
    actor, _ = split(model.policy)
    before = snapshot(actor)
    model.learn(24, reset_num_timesteps=False)  # a later run without the warm-up trains the actor
    assert model.critic_only is False and any(changed(before, actor))


def test_an_error_inside_a_warm_up_update_leaves_no_actor_frozen():
    class FailingUpdate(VerifiedRecurrentPPO):
        def _extra_losses(self, log_prob, mask):
            raise RuntimeError("a loss term failed")

    model = FailingUpdate(
        "SLMLstmPolicy", make_textgen_vec_env(4, seed=0, vocab_size=8, max_length=6), n_steps=6, batch_size=24, seed=0
    )
    with pytest.raises(RuntimeError, match="a loss term failed"):
        model.learn(48, callback=CriticWarmupCallback(5))
    assert all(p.requires_grad for p in model.policy.parameters())


def test_sb3_algorithms_keep_the_actor_trainable_while_collecting():
    class Watch(BaseCallback):
        frozen_steps = 0

        def _on_step(self) -> bool:
            self.frozen_steps += not all(p.requires_grad for p in self.model.policy.parameters())
            return True

    watch = Watch()
    model = PPO("MlpPolicy", "CartPole-v1", n_steps=32, batch_size=32, seed=0)
    model.learn(4 * 32, callback=[CriticWarmupCallback(2), watch])
    assert watch.frozen_steps == 0 and all(p.requires_grad for p in model.policy.parameters())


def test_a_run_that_ends_inside_the_warm_up_warns():
    with pytest.warns(UserWarning, match=r"training ended within the critic warm-up \(48 of its 120 steps\)"):
        slm_model().learn(48, callback=CriticWarmupCallback(5))
