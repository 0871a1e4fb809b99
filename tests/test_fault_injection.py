"""Fault injection through the public training loop: each fault is caught, training goes on to the
end, and the final model is finite and still generates valid tokens.

Faults enter where they would in practice: a torch hook on a gradient, a parameter broken between
updates, a ``VecEnvWrapper`` on the rewards, the rollout buffer corrupted after collection. Each
test names the protection it relies on; with that protection removed, the test fails.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch as th
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.vec_env import VecEnvWrapper
from tensor_asserts import assert_same_tensors

from textenv_gym.dynamics import TextGenConfig
from textenv_gym.sb3_vec_env import make_textgen_vec_env
from verl_sb3 import VerifiedPPO, VerifiedRecurrentPPO
from verl_sb3.generation import generate

ENV = dict(vocab_size=8, max_length=6)
N_ENVS, N_STEPS = 2, 12  # two episodes per environment per rollout
ROLLOUT = N_ENVS * N_STEPS
N_UPDATES, FAULT_AT = 5, 2  # the fault hits the third of five updates
COMMON = dict(n_steps=N_STEPS, batch_size=24, n_epochs=2, learning_rate=3e-3, seed=0)
SETTINGS = {
    VerifiedRecurrentPPO: (
        "SLMLstmPolicy",
        dict(COMMON, policy_kwargs=dict(lstm_hidden_size=16, n_lstm_layers=1, embedding_dim=8)),
    ),
    VerifiedPPO: ("MlpPolicy", dict(COMMON, policy_kwargs=dict(net_arch=[32]))),
}
BOTH = [VerifiedRecurrentPPO, VerifiedPPO]


def state(model) -> tuple[dict, dict]:
    return copy.deepcopy(model.policy.state_dict()), copy.deepcopy(model.policy.optimizer.state_dict())


def instrumented(cls):
    """``cls`` calling ``fault(stage, model)`` at update ``FAULT_AT`` and recording the state around each update.

    Stages: ``"after_collect"`` (rollout collected, returns computed), ``"before_train"``,
    ``"after_train"`` (the update verified: accepted or rolled back).
    """

    class Instrumented(cls):
        def setup_probe(self, fault):
            self.fault = fault
            self.before, self.after = [], []  # (policy, optimizer) around each verified update
            return self

        def _call(self, stage):
            if self.fault is not None and self.verification_report.n_verified == FAULT_AT:
                self.fault(stage, self)

        def collect_rollouts(self, *args, **kwargs):
            result = super().collect_rollouts(*args, **kwargs)
            self._call("after_collect")
            return result

        def train(self):
            self.before.append(state(self))
            self._call("before_train")
            stage_at = self.verification_report.n_verified
            super().train()
            self.after.append(state(self))
            if stage_at == FAULT_AT and self.fault is not None:
                self.fault("after_train", self)

    Instrumented.__name__ = f"Instrumented{cls.__name__}"
    return Instrumented


class RewardFault(VecEnvWrapper):
    """Replaces environment 0's reward by ``value`` at one step of update ``FAULT_AT``'s rollout."""

    def __init__(self, venv, value: float, at_step: int = FAULT_AT * N_STEPS + 5) -> None:
        super().__init__(venv)
        self.value, self.at_step, self.steps = value, at_step, 0

    def reset(self):
        return self.venv.reset()

    def step_wait(self):
        observations, rewards, dones, infos = self.venv.step_wait()
        self.steps += 1
        if self.steps == self.at_step:
            rewards = rewards.copy()
            rewards[0] = self.value
        return observations, rewards, dones, infos


def train_with(cls, fault=None, env=None, **kwargs):
    policy, settings = SETTINGS[cls]
    env = env if env is not None else make_textgen_vec_env(N_ENVS, seed=0, **ENV)
    model = instrumented(cls)(policy, env, **{**settings, **kwargs}).setup_probe(fault)
    model.env_kwargs = TextGenConfig(**ENV).as_kwargs()
    model.learn(N_UPDATES * ROLLOUT)
    return model


def assert_trained_to_the_end_and_usable(model) -> None:
    assert model.num_timesteps == N_UPDATES * ROLLOUT
    assert [entry["update"] for entry in model.verification_log] == list(range(N_UPDATES))
    assert all(bool(th.isfinite(p).all()) for p in model.policy.parameters())
    out = generate(model, num_sequences=4, seed=0)
    assert len(out.tokens) == 4
    for tokens in out.tokens:
        assert len(tokens) == ENV["max_length"] and all(0 <= t < ENV["vocab_size"] for t in tokens)
    assert np.isfinite(out.returns).all() and math.isfinite(out.entropy)


def assert_only_the_faulty_update_rolled_back(model, *checks: str) -> dict:
    """The update at ``FAULT_AT`` is rolled back bit for bit, its reason naming ``checks``; the others accepted."""
    log = model.verification_log
    entry = log[FAULT_AT]
    assert entry["rolled_back"] and not entry["accepted"], entry["reason"]
    assert entry["reason"].startswith("rolled back after")
    for check in checks:
        assert not entry["checks"][check]["passed"], check
        assert f"{check}:" in entry["reason"], (check, entry["reason"])
    assert [e["accepted"] for i, e in enumerate(log) if i != FAULT_AT] == [True] * (N_UPDATES - 1)
    assert_same_tensors(model.after[FAULT_AT], model.before[FAULT_AT])  # rolled back bit for bit, optimizer included
    return entry


def test_healthy_run_accepts_every_update_and_trips_no_check():
    """The baseline the fault tests compare with: every update accepted, nothing recovered."""
    for cls in BOTH:
        model = train_with(cls)
        assert [e["accepted"] for e in model.verification_log] == [True] * N_UPDATES
        assert all(e["recovered"] is None for e in model.verification_log)
        assert max(e["checks"]["return_bound"]["value"] for e in model.verification_log) <= ENV["max_length"]
        assert_trained_to_the_end_and_usable(model)


# ---------------------------------------------------------------- gradients
def gradient_fault(value: float):
    """For one update, every gradient reaching the first parameter is replaced by ``value`` (a torch hook)."""

    def fault(stage, model):
        if stage == "before_train":
            parameter = next(model.policy.parameters())
            model.hook = parameter.register_hook(lambda grad: th.full_like(grad, value))
        elif stage == "after_train":
            model.hook.remove()

    return fault


@pytest.mark.parametrize("cls", BOTH)
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_gradient_is_rolled_back(cls, value):
    """Protection: the ``finite_parameters`` check, and ``train()`` catching PPO's own error on NaN logits."""
    model = train_with(cls, gradient_fault(value))
    entry = assert_only_the_faulty_update_rolled_back(model, "finite_parameters")
    assert "non-finite parameters" in entry["checks"]["finite_parameters"]["message"]
    assert_trained_to_the_end_and_usable(model)


# ---------------------------------------------------------------- parameters broken between updates
def broken_parameter(stage_to_hit: str):
    """Sets one policy parameter to +inf at ``stage_to_hit``: outside any update."""

    def fault(stage, model):
        if stage == stage_to_hit:
            with th.no_grad():
                next(model.policy.parameters()).view(-1)[0] = math.inf

    return fault


@pytest.mark.parametrize("cls", BOTH)
def test_parameter_broken_after_an_update_is_restored_before_the_next_rollout(cls):
    """Protection: ``_repair_non_finite`` at the start of ``collect_rollouts``.

    A rollback of the next update could only return to the broken state (its snapshot is taken
    after the break); instead the state kept after the last verified update comes back.
    """
    with pytest.warns(
        RuntimeWarning, match=r"finite_parameters: 1 non-finite parameters .* before collecting a rollout"
    ):
        model = train_with(cls, broken_parameter("after_train"))
    log = model.verification_log
    assert [e["accepted"] for e in log] == [True] * N_UPDATES
    recovered = log[FAULT_AT + 1]["recovered"]
    assert recovered is not None and recovered.startswith("finite_parameters: 1 non-finite parameters")
    assert f"restored the last verified state (after update {FAULT_AT})" in recovered
    assert [i for i, e in enumerate(log) if e["recovered"]] == [FAULT_AT + 1]
    assert_same_tensors(model.before[FAULT_AT + 1], model.after[FAULT_AT])  # exactly the state after the last update
    assert_trained_to_the_end_and_usable(model)


@pytest.mark.parametrize("cls", BOTH)
def test_parameter_broken_between_collection_and_update_is_restored_before_the_update(cls):
    """Protection: ``_repair_non_finite`` at the start of ``train()``."""
    with pytest.warns(RuntimeWarning, match="finite_parameters: .* before the update"):
        model = train_with(cls, broken_parameter("before_train"))
    log = model.verification_log
    assert [e["accepted"] for e in log] == [True] * N_UPDATES
    assert [i for i, e in enumerate(log) if e["recovered"]] == [FAULT_AT]
    assert f"restored the last verified state (after update {FAULT_AT - 1})" in log[FAULT_AT]["recovered"]
    assert_trained_to_the_end_and_usable(model)


def test_parameter_broken_before_training_is_a_clear_error():
    """With no verified state to go back to, the error says what is wrong and where."""
    policy, settings = SETTINGS[VerifiedRecurrentPPO]
    model = VerifiedRecurrentPPO(policy, make_textgen_vec_env(N_ENVS, seed=0, **ENV), **settings)
    with th.no_grad():
        model.policy.value_net.bias.fill_(math.nan)
    with pytest.raises(
        RuntimeError, match=r"finite_parameters: 1 non-finite parameters \(value_net.bias\).*no verified state"
    ):
        model.learn(ROLLOUT)


class BreakDuringRollouts(BaseCallback):
    """Makes a parameter infinite at the given steps of a rollout (``"start"``: at its start)."""

    def __init__(self, when) -> None:
        super().__init__()
        self.when, self.breaks = when, 0

    def _break(self) -> None:
        self.breaks += 1
        with th.no_grad():
            self.model.policy.action_net.embedding.weight.fill_(math.inf)

    def _on_rollout_start(self) -> None:
        if self.when == "start" and self.num_timesteps == ROLLOUT and not self.breaks:
            self._break()

    def _on_step(self) -> bool:
        if (self.when == "every step" and self.num_timesteps > ROLLOUT) or self.num_timesteps == self.when:
            self._break()
        return True


@pytest.mark.parametrize("when", ["start", ROLLOUT + 4], ids=["at a rollout's start", "mid-rollout"])
def test_parameter_broken_during_a_rollout_is_restored_and_the_rollout_collected_again(when):
    """Protection: ``_collect`` restores the last verified state and collects the rollout again."""
    policy, settings = SETTINGS[VerifiedRecurrentPPO]
    model = VerifiedRecurrentPPO(policy, make_textgen_vec_env(N_ENVS, seed=0, **ENV), **settings)
    with pytest.warns(RuntimeWarning, match=r"embedding.weight\) found while collecting a rollout.*restored"):
        model.learn(3 * ROLLOUT, callback=BreakDuringRollouts(when))
    log = model.verification_log
    assert len(log) == 3 and all(entry["accepted"] for entry in log)
    assert log[1]["recovered"] is not None and "after update 0" in log[1]["recovered"]
    assert all(bool(th.isfinite(p).all()) for p in model.policy.parameters())


def test_parameter_broken_again_after_the_restoration_is_a_clear_error():
    """A break that comes back in the rollout collected again: a RuntimeError naming the parameter,
    instead of torch's error about invalid logits, and the parameters are left restored."""
    policy, settings = SETTINGS[VerifiedRecurrentPPO]
    model = VerifiedRecurrentPPO(policy, make_textgen_vec_env(N_ENVS, seed=0, **ENV), **settings)
    with (
        pytest.warns(RuntimeWarning),
        pytest.raises(
            RuntimeError, match=r"action_net.embedding.weight\) became non-finite while collecting a rollout again"
        ),
    ):
        model.learn(3 * ROLLOUT, callback=BreakDuringRollouts("every step"))
    assert all(bool(th.isfinite(p).all()) for p in model.policy.parameters())


# ---------------------------------------------------------------- rewards
@pytest.mark.parametrize("cls", BOTH)
@pytest.mark.parametrize("value", [math.nan, -math.inf])
def test_non_finite_reward_is_rolled_back(cls, value):
    """Protection: ``advantage_finite`` and ``return_bound`` (SB3's buffer and GAE take the NaN
    without complaint and spread it over the episode's advantages)."""
    env = RewardFault(make_textgen_vec_env(N_ENVS, seed=0, **ENV), value)
    model = train_with(cls, env=env)
    entry = assert_only_the_faulty_update_rolled_back(model, "advantage_finite", "return_bound")
    assert "non-finite returns" in entry["checks"]["return_bound"]["message"]
    assert_trained_to_the_end_and_usable(model)


@pytest.mark.parametrize("cls", BOTH)
def test_reward_spike_is_rolled_back(cls):
    """Protection: ``return_bound`` (max |return| <= 1e4 by default). Without it a spike of 1e6
    passes every check: PPO normalises the advantages, which hides the scale."""
    env = RewardFault(make_textgen_vec_env(N_ENVS, seed=0, **ENV), 1e6)
    model = train_with(cls, env=env)
    entry = assert_only_the_faulty_update_rolled_back(model, "return_bound")
    assert entry["checks"]["return_bound"]["value"] >= 1e6 - 20
    assert entry["checks"]["advantage_finite"]["passed"] and entry["checks"]["returns_match"]["passed"]
    assert_trained_to_the_end_and_usable(model)


def test_return_bound_is_a_setting():
    """``max_abs_return=None`` turns the check off (and the spike goes through); a wrong value is refused."""
    env = RewardFault(make_textgen_vec_env(N_ENVS, seed=0, **ENV), 1e6)
    model = train_with(VerifiedRecurrentPPO, env=env, max_abs_return=None)
    assert "return_bound" not in model.verification_log[FAULT_AT]["checks"]
    for bad in (0.0, -1.0, math.nan, "big"):
        with pytest.raises(ValueError, match="max_abs_return"):
            VerifiedPPO("MlpPolicy", "CartPole-v1", max_abs_return=bad)


# ---------------------------------------------------------------- advantages and returns
def corrupt_buffer(stage_to_hit: str, field: str, change):
    def fault(stage, model):
        if stage == stage_to_hit:
            array = getattr(model.rollout_buffer, field)
            array[4, 1] = change(array[4, 1])

    return fault


@pytest.mark.parametrize("cls", BOTH)
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_advantage_is_rolled_back(cls, value):
    """Protection: ``advantage_finite``."""
    model = train_with(cls, corrupt_buffer("before_train", "advantages", lambda _: value))
    assert_only_the_faulty_update_rolled_back(model, "advantage_finite")
    assert_trained_to_the_end_and_usable(model)


@pytest.mark.parametrize("cls", BOTH)
def test_returns_that_do_not_match_are_rolled_back(cls):
    """Protection: ``returns_match`` (returns = advantages + values). The corruption only reaches
    the value loss, so no other check sees it."""
    model = train_with(cls, corrupt_buffer("after_collect", "returns", lambda r: r + 1.0))
    entry = assert_only_the_faulty_update_rolled_back(model, "returns_match")
    failed = [name for name, check in entry["checks"].items() if not check["passed"]]
    assert failed == ["returns_match"]
    assert_trained_to_the_end_and_usable(model)
