"""KL control toward a reference policy: the penalty, the loss term, the controller, save/load."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch as th
from stable_baselines3.common.vec_env import VecEnvWrapper
from tensor_asserts import assert_same_tensors

from textenv_gym.sb3_vec_env import make_textgen_vec_env
from verl_sb3 import AdaptiveKLController, VerifiedPPO, VerifiedRecurrentPPO
from verl_sb3.kl_control import exact_kl, kl_estimate

N_ENVS, N_STEPS = 4, 6
PPO_KW = dict(n_steps=N_STEPS, batch_size=N_ENVS * N_STEPS, n_epochs=2, policy_kwargs=dict(net_arch=[16]))
SLM_KW = dict(
    n_steps=N_STEPS,
    batch_size=N_ENVS * N_STEPS,
    n_epochs=2,
    policy_kwargs=dict(embedding_dim=8, lstm_hidden_size=16, n_lstm_layers=1, enable_critic_lstm=False),
)


class RewardRecorder(VecEnvWrapper):
    """Keeps the environment's rewards, step by step, before anything changes them."""

    def __init__(self, venv):
        super().__init__(venv)
        self.rewards = []

    def reset(self):
        return self.venv.reset()

    def step_wait(self):
        obs, rewards, dones, infos = self.venv.step_wait()
        self.rewards.append(rewards.copy())
        return obs, rewards, dones, infos


def textgen():
    return RewardRecorder(make_textgen_vec_env(N_ENVS, seed=0, vocab_size=8, max_length=N_STEPS))


def distinct_reference(cls, policy, kwargs):
    """A model whose policy is far from a freshly initialised one (noise added to every parameter)."""
    other = cls(policy, textgen(), seed=1, **kwargs)
    generator = th.Generator().manual_seed(1)
    with th.no_grad():
        for parameter in other.policy.parameters():
            parameter.add_(th.randn(parameter.shape, generator=generator))
    return other


def collect_one_rollout(model):
    _, callback = model._setup_learn(N_STEPS * N_ENVS, callback=None)
    assert model.collect_rollouts(model.env, callback, model.rollout_buffer, model.n_steps)
    return model.rollout_buffer


def reference_log_probs(model, buffer, reference_policy):
    """The reference's log-probabilities of the buffer's actions, recomputed from scratch, (n_steps, n_envs)."""
    actions = th.as_tensor(buffer.actions[..., 0]).long()
    with th.no_grad():
        if model.policy.__class__.__name__ == "SLMLstmPolicy":
            # Every environment starts an episode at step 0 (n_steps == max_length): replay the steps.
            states = tuple(th.zeros_like(x) for x in model._last_lstm_states.pi)
            rows = []
            for step in range(N_STEPS):
                obs = th.as_tensor(buffer.observations[step])
                starts = th.as_tensor(buffer.episode_starts[step], dtype=th.float32)
                distribution, states = reference_policy.get_distribution(obs, states, starts)
                rows.append(distribution.distribution.logits)
            logits = th.stack(rows)
        else:
            obs = th.as_tensor(buffer.observations.reshape(N_STEPS * N_ENVS, -1))
            logits = reference_policy.get_distribution(obs).distribution.logits.reshape(N_STEPS, N_ENVS, -1)
    return th.log_softmax(logits, -1).gather(-1, actions[..., None])[..., 0], logits


@pytest.mark.parametrize(
    "cls, policy, kwargs", [(VerifiedPPO, "MlpPolicy", PPO_KW), (VerifiedRecurrentPPO, "SLMLstmPolicy", SLM_KW)]
)
@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_reward_mode_subtracts_beta_times_the_estimate(cls, policy, kwargs, estimator):
    other = distinct_reference(cls, policy, kwargs)
    model = cls(policy, textgen(), seed=0, ref_kl_coef=0.7, ref_kl_estimator=estimator, reference=other, **kwargs)
    buffer = collect_one_rollout(model)
    ref_log_prob, _ = reference_log_probs(model, buffer, other.policy)
    expected_kl = kl_estimate(th.as_tensor(buffer.log_probs), ref_log_prob, estimator).numpy()
    env_rewards = np.stack(model.env.rewards)
    assert np.abs(expected_kl).max() > 1e-3  # the two policies differ: the test can fail
    np.testing.assert_allclose(buffer.rewards, env_rewards - 0.7 * expected_kl, rtol=1e-5, atol=1e-6)
    assert model._ref_rollout["kl"] == pytest.approx(float(expected_kl.mean()), rel=1e-5, abs=1e-7)


@pytest.mark.parametrize(
    "cls, policy, kwargs", [(VerifiedPPO, "MlpPolicy", PPO_KW), (VerifiedRecurrentPPO, "SLMLstmPolicy", SLM_KW)]
)
def test_reward_mode_exact_estimator(cls, policy, kwargs):
    other = distinct_reference(cls, policy, kwargs)
    model = cls(policy, textgen(), seed=0, ref_kl_coef=0.5, ref_kl_estimator="exact", reference=other, **kwargs)
    buffer = collect_one_rollout(model)
    _, ref_logits = reference_log_probs(model, buffer, other.policy)
    _, policy_logits = reference_log_probs(model, buffer, model.policy)
    expected_kl = exact_kl(policy_logits, ref_logits).numpy()
    np.testing.assert_allclose(buffer.rewards, np.stack(model.env.rewards) - 0.5 * expected_kl, rtol=1e-5, atol=1e-6)
    assert (expected_kl > 0).all()


def test_initial_policy_reference_gives_zero_kl_at_the_start_and_a_frozen_copy():
    model = VerifiedRecurrentPPO("SLMLstmPolicy", textgen(), seed=0, ref_kl_coef=1.0, **SLM_KW)
    assert_same_tensors(dict(model.ref_policy.state_dict()), dict(model.policy.state_dict()))
    assert not any(p.requires_grad for p in model.ref_policy.parameters())
    buffer = collect_one_rollout(model)
    np.testing.assert_array_equal(buffer.rewards, np.stack(model.env.rewards))  # k1 is exactly 0
    frozen = copy.deepcopy(model.ref_policy.state_dict())
    model.learn(3 * N_STEPS * N_ENVS)
    assert_same_tensors(dict(model.ref_policy.state_dict()), frozen)
    assert model.logger.name_to_value["verl/ref_kl"] != 0.0


@pytest.mark.parametrize("estimator", ["k1", "k3", "exact"])
def test_loss_mode_adds_the_gradient_of_beta_times_mean_kl(estimator):
    """One full-batch gradient step: the gradient differs from the KL-free one by grad(beta * mean KL)."""
    beta = 2.0

    def first_gradient(coef):
        other = distinct_reference(VerifiedPPO, "MlpPolicy", PPO_KW)
        model = VerifiedPPO(
            "MlpPolicy",
            textgen(),
            seed=0,
            ref_kl_coef=coef,
            ref_kl_mode="loss",
            ref_kl_estimator=estimator,
            reference=other,
            max_grad_norm=1e9,
            **{**PPO_KW, "n_epochs": 1},
        )
        initial = copy.deepcopy(model.policy)
        gradients = []
        step = model.policy.optimizer.step

        def recording_step(*args, **kwargs):
            gradients.append({n: p.grad.clone() for n, p in model.policy.named_parameters() if p.grad is not None})
            return step(*args, **kwargs)

        model.policy.optimizer.step = recording_step
        buffer = collect_one_rollout(model)
        observations = th.as_tensor(buffer.observations.reshape(N_STEPS * N_ENVS, -1))
        actions = th.as_tensor(buffer.actions.reshape(-1)).long()
        model.train()
        return gradients[0], initial, other, observations, actions

    with_kl, initial, other, observations, actions = first_gradient(beta)
    without_kl, *_ = first_gradient(0.0)
    # The KL term by hand, at the initial parameters, over the whole batch.
    logits = initial.get_distribution(observations).distribution.logits
    with th.no_grad():
        ref_logits = other.policy.get_distribution(observations).distribution.logits
    if estimator == "exact":
        kl = exact_kl(logits, ref_logits)
    else:
        log_p = th.log_softmax(logits, -1).gather(1, actions[:, None])[:, 0]
        kl = kl_estimate(log_p, th.log_softmax(ref_logits, -1).gather(1, actions[:, None])[:, 0], estimator)
    (beta * kl.mean()).backward()
    expected = {n: p.grad for n, p in initial.named_parameters() if p.grad is not None}
    assert expected
    for name, grad in expected.items():
        th.testing.assert_close(with_kl[name] - without_kl.get(name, th.zeros_like(grad)), grad, rtol=1e-4, atol=1e-6)


def test_loss_mode_recurrent_pulls_the_policy_toward_the_reference():
    def final_kl(coef):
        other = distinct_reference(VerifiedRecurrentPPO, "SLMLstmPolicy", SLM_KW)
        model = VerifiedRecurrentPPO(
            "SLMLstmPolicy",
            textgen(),
            seed=0,
            ref_kl_coef=coef,
            ref_kl_mode="loss",
            ref_kl_estimator="exact",
            reference=other,
            learning_rate=3e-3,
            kl_threshold=1e9,
            **SLM_KW,
        )
        model.learn(10 * N_STEPS * N_ENVS)
        assert all(entry["accepted"] for entry in model.verification_log)
        return model.logger.name_to_value["verl/ref_kl"], model.logger.name_to_value["train/ref_kl_loss"]

    kl_free, loss_free = final_kl(0.0)
    kl_pulled, loss_pulled = final_kl(5.0)
    assert loss_free == 0.0 and loss_pulled > 0.0
    assert kl_pulled < 0.5 * kl_free


def test_adaptive_controller_moves_and_is_restored_by_a_rollback():
    kwargs = dict(ref_kl_coef=0.2, ref_kl_target=0.05, ref_kl_horizon=100, **SLM_KW)
    accepted = VerifiedRecurrentPPO("SLMLstmPolicy", textgen(), seed=0, **kwargs)
    accepted.learn(N_STEPS * N_ENVS)
    # First rollout: policy == reference, KL 0, error clipped to -0.2, over 24 steps.
    assert accepted.kl_ctrl.value == pytest.approx(0.2 * (1 - 0.2 * 24 / 100))
    assert accepted.logger.name_to_value["verl/kl_coef"] == 0.2
    rejected = VerifiedRecurrentPPO("SLMLstmPolicy", textgen(), seed=0, kl_threshold=1e-12, max_backtracks=0, **kwargs)
    rejected.learn(2 * N_STEPS * N_ENVS)
    assert [entry["rolled_back"] for entry in rejected.verification_log] == [True, True]
    assert rejected.kl_ctrl == AdaptiveKLController(0.2, 0.05, 100)


@pytest.mark.parametrize("mode", ["reward", "loss"])
def test_save_and_load_keep_the_reference_and_the_controller(tmp_path, mode):
    other = VerifiedRecurrentPPO("SLMLstmPolicy", textgen(), seed=1, **SLM_KW)
    model = VerifiedRecurrentPPO(
        "SLMLstmPolicy",
        textgen(),
        seed=0,
        reference=other,
        ref_kl_coef=0.3,
        ref_kl_target=0.01,
        ref_kl_horizon=50,
        ref_kl_mode=mode,
        ref_kl_estimator="k3",
        **SLM_KW,
    )
    model.learn(2 * N_STEPS * N_ENVS)
    model.save(tmp_path / "model")
    loaded = VerifiedRecurrentPPO.load(tmp_path / "model", env=textgen())
    assert_same_tensors(dict(loaded.ref_policy.state_dict()), dict(other.policy.state_dict()))
    assert_same_tensors(dict(loaded.policy.state_dict()), dict(model.policy.state_dict()))
    assert loaded.kl_ctrl == model.kl_ctrl and loaded.kl_ctrl.value != 0.3
    assert (loaded.ref_kl_mode, loaded.ref_kl_estimator, loaded.ref_kl_horizon) == (mode, "k3", 50)
    loaded.learn(N_STEPS * N_ENVS, reset_num_timesteps=False)
    assert loaded.verification_log[-1]["accepted"]


def test_reference_from_a_saved_model_path(tmp_path):
    source = VerifiedPPO("MlpPolicy", textgen(), seed=3, **PPO_KW)
    source.save(tmp_path / "source.zip")
    model = VerifiedPPO("MlpPolicy", textgen(), seed=0, ref_kl_coef=0.1, reference=tmp_path / "source.zip", **PPO_KW)
    assert_same_tensors(dict(model.ref_policy.state_dict()), dict(source.policy.state_dict()))


def test_model_without_reference_saves_no_reference(tmp_path):
    model = VerifiedPPO("MlpPolicy", textgen(), seed=0, **PPO_KW)
    assert model.ref_policy is None and model.kl_ctrl is None
    model.save(tmp_path / "plain")
    assert VerifiedPPO.load(tmp_path / "plain").ref_policy is None


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(ref_kl_coef=-0.1), "ref_kl_coef"),
        (dict(ref_kl_coef=float("nan")), "ref_kl_coef"),
        (dict(ref_kl_coef=0.1, ref_kl_estimator="k4"), "ref_kl_estimator"),
        (dict(ref_kl_coef=0.1, ref_kl_mode="penalty"), "ref_kl_mode"),
        (dict(ref_kl_coef=0.1, ref_kl_target=0.0), "ref_kl_target"),
        (dict(ref_kl_coef=0.1, ref_kl_horizon=0), "ref_kl_horizon"),
        (dict(ref_kl_target=0.1), "ref_kl_coef"),
        (dict(ref_kl_coef=0.1, reference=42), "reference"),
        (dict(ref_kl_coef=0.1, reference="/nonexistent/model.zip"), "reference"),
    ],
)
def test_bad_settings_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        VerifiedPPO("MlpPolicy", textgen(), **PPO_KW, **kwargs)


def test_reference_of_another_architecture_is_refused():
    other = VerifiedPPO("MlpPolicy", textgen(), policy_kwargs=dict(net_arch=[32]), n_steps=N_STEPS, batch_size=24)
    with pytest.raises(ValueError, match="reference: .*architecture"):
        VerifiedPPO("MlpPolicy", textgen(), ref_kl_coef=0.1, reference=other, **PPO_KW)


def test_subclass_rollback_attributes_add_to_the_controller():
    class Counting(VerifiedRecurrentPPO):
        _rollback_attributes = ("counter",)

        def _update_learning_rate(self, optimizers):  # called inside the parent's train()
            self.counter += 1
            super()._update_learning_rate(optimizers)

    model = Counting(
        "SLMLstmPolicy",
        textgen(),
        seed=0,
        ref_kl_coef=0.2,
        ref_kl_target=0.05,
        kl_threshold=1e-12,
        max_backtracks=0,
        **SLM_KW,
    )
    model.counter = 0
    model.learn(2 * N_STEPS * N_ENVS)
    assert model._rollback_attribute_names() == ("kl_ctrl", "counter")
    assert model.counter == 0 and model.kl_ctrl == AdaptiveKLController(0.2, 0.05, 10_000)


def test_the_mixin_works_on_plain_sb3_ppo(tmp_path):
    from stable_baselines3 import PPO

    from verl_sb3 import ReferenceKLMixin

    class ReferencePPO(ReferenceKLMixin, PPO):
        pass

    model = ReferencePPO(
        "MlpPolicy", textgen(), seed=0, ref_kl_coef=0.3, ref_kl_target=0.01, ref_kl_horizon=50, **PPO_KW
    )
    model.learn(3 * N_STEPS * N_ENVS)
    assert model.kl_ctrl.value != 0.3 and model.logger.name_to_value["verl/kl_coef"] > 0
    model.save(tmp_path / "plain")
    loaded = ReferencePPO.load(tmp_path / "plain")
    assert loaded.kl_ctrl == model.kl_ctrl
    assert_same_tensors(dict(loaded.ref_policy.state_dict()), dict(model.ref_policy.state_dict()))
