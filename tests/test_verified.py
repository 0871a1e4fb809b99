"""Verified PPO: rollback, backtracking, checks, reporting and save/load."""

from __future__ import annotations

import copy
import csv
import math

import gymnasium as gym
import numpy as np
import pytest
import torch as th
from stable_baselines3 import PPO
from stable_baselines3.common.logger import configure
from stable_baselines3.common.vec_env import VecNormalize
from tensor_asserts import assert_same_tensors

from textenv_gym.sb3_vec_env import make_textgen_vec_env
from verl_sb3 import CheckResult, ReuseMassJudge, VerifiedPPO, VerifiedRecurrentPPO
from verl_sb3.rollout import policy_kind
from verl_sb3.tokens import last_tokens, sequence_lengths

PERMISSIVE = dict(kl_threshold=1e9, min_entropy=0.0, surrogate_tolerance=1e9, advantage_tolerance=1e9)
SMALL_PPO = dict(n_steps=64, batch_size=64, n_epochs=2, learning_rate=3e-3, policy_kwargs=dict(net_arch=[32]), seed=0)
SMALL_RECURRENT = dict(
    n_steps=32,
    batch_size=64,
    n_epochs=2,
    learning_rate=3e-3,
    seed=0,
    policy_kwargs=dict(net_arch=[], lstm_hidden_size=16, n_lstm_layers=1),
)


def textgen(num_envs: int = 2, **kwargs):
    return make_textgen_vec_env(num_envs, seed=0, vocab_size=8, max_length=6, **kwargs)


def optimizer_state(model) -> dict:
    return copy.deepcopy(model.policy.optimizer.state_dict())


def probing(cls):
    """A subclass that records the state before and after the parent's (unverified) update."""

    class Probe(cls):
        def train(self):
            self.before = (copy.deepcopy(self.policy.state_dict()), optimizer_state(self), self._n_updates)
            super().train()

    Probe.__name__ = f"Probe{cls.__name__}"
    return Probe


@pytest.mark.parametrize(
    "cls, policy, make_env, kwargs",
    [
        (VerifiedPPO, "MlpPolicy", lambda: "CartPole-v1", SMALL_PPO),
        (VerifiedRecurrentPPO, "MlpLstmPolicy", textgen, SMALL_RECURRENT),
    ],
)
def test_forced_failure_restores_parameters_and_optimizer_exactly(cls, policy, make_env, kwargs):
    model = probing(cls)(policy, make_env(), kl_threshold=1e-12, max_backtracks=0, **kwargs)
    model.learn(3 * kwargs["n_steps"] * model.n_envs)  # three updates, all rejected
    params_before, optimizer_before, n_updates_before = model.before
    assert_same_tensors(dict(model.policy.state_dict()), params_before)
    assert_same_tensors(optimizer_state(model), optimizer_before)
    assert model._n_updates == n_updates_before == 0
    assert len(model.verification_log) == 3
    for entry in model.verification_log:
        assert entry["rolled_back"] and not entry["accepted"]
        assert entry["kl"] > 1e-12  # the update had really moved the policy
        assert entry["kl_max"] >= entry["kl"]
        assert entry["reason"].startswith("rolled back after 0 backtracks: kl:")
    assert model.verification_rate == 0.0
    assert not [key for key in model.logger.name_to_value if key.startswith("train/")]


def test_rollback_after_accepted_updates_restores_the_adam_state_of_the_last_accepted_one():
    class FailThird(probing(VerifiedPPO)):
        def verify(self, ctx):
            results = super().verify(ctx)
            n_verified = self.verification_report.n_verified
            results["third_fails"] = CheckResult(n_verified != 2, float(n_verified), 2.0, "third update vetoed")
            return results

    model = FailThird("MlpPolicy", "CartPole-v1", max_backtracks=1, **SMALL_PPO)
    model.learn(3 * 64)
    params_before, optimizer_before, n_updates_before = model.before
    assert [entry["accepted"] for entry in model.verification_log] == [True, True, False]
    assert optimizer_before["state"][0]["step"].item() > 0  # Adam had moments and steps to restore
    assert_same_tensors(dict(model.policy.state_dict()), params_before)
    assert_same_tensors(optimizer_state(model), optimizer_before)
    assert model._n_updates == n_updates_before == 4
    assert "third_fails: third update vetoed" in model.verification_log[-1]["reason"]


def test_permissive_thresholds_accept_and_match_the_parent_bit_for_bit():
    verified = VerifiedPPO("MlpPolicy", "CartPole-v1", **PERMISSIVE, **SMALL_PPO)
    verified.learn(4 * 64)
    parent = PPO("MlpPolicy", "CartPole-v1", **SMALL_PPO)
    parent.learn(4 * 64)
    assert [entry["accepted"] and entry["backtracks"] == 0 for entry in verified.verification_log] == [True] * 4
    assert verified.verification_rate == 1.0
    assert_same_tensors(dict(verified.policy.state_dict()), dict(parent.policy.state_dict()))


def test_backtracking_keeps_the_first_shorter_step_that_passes():
    free = probing(VerifiedPPO)("MlpPolicy", "CartPole-v1", **PERMISSIVE, **SMALL_PPO)
    free.learn(64)
    full_kl = free.verification_log[0]["kl"]
    full_step = dict(free.policy.state_dict())

    threshold = full_kl / 5
    model = probing(VerifiedPPO)(
        "MlpPolicy", "CartPole-v1", kl_threshold=threshold, max_backtracks=8, backtrack_ratio=0.5, **SMALL_PPO
    )
    model.learn(64)
    entry = model.verification_log[0]
    assert entry["kl"] == pytest.approx(full_kl)  # the same full step, seen by both
    assert entry["accepted"] and not entry["rolled_back"] and entry["backtracks"] >= 1
    assert entry["kl_applied"] <= threshold
    assert "full step failed" in entry["reason"]
    # The kept parameters are old + r^k (new - old), with the smallest k that passes.
    old = model.before[0]
    step = entry["step_size"]
    assert step == 0.5 ** entry["backtracks"]
    for name, tensor in model.policy.state_dict().items():
        expected = old[name] + step * (full_step[name] - old[name])
        assert th.allclose(tensor, expected, atol=1e-7), name
    assert model.verification_rate == 0.0  # accepted, but not at the full step


def test_nan_advantages_are_caught_and_rolled_back_through_training():
    class NaNAdvantages(VerifiedPPO):
        def train(self):
            self.rollout_buffer.advantages[0, 0] = np.nan
            super().train()

    model = NaNAdvantages("MlpPolicy", "CartPole-v1", max_backtracks=2, **SMALL_PPO)
    initial = copy.deepcopy(model.policy.state_dict())
    model.learn(2 * 64)
    for entry in model.verification_log:
        assert entry["rolled_back"]
        assert not entry["checks"]["advantage_finite"]["passed"]
    assert_same_tensors(dict(model.policy.state_dict()), initial)
    assert all(th.isfinite(p).all() for p in model.policy.parameters())


def test_user_check_and_subclass_check_veto_updates():
    calls = []

    def always_fails(ctx):
        calls.append(ctx.new_log_prob.shape)
        return CheckResult(False, 1.0, 0.0, "vetoed by the user")

    model = VerifiedPPO("MlpPolicy", "CartPole-v1", checks=[always_fails], max_backtracks=1, **SMALL_PPO)
    model.learn(64)
    entry = model.verification_log[0]
    assert entry["rolled_back"] and entry["backtracks"] == 1 and len(calls) == 2
    assert entry["checks"]["always_fails"] == {
        "passed": False,
        "value": 1.0,
        "threshold": 0.0,
        "message": "vetoed by the user",
        "details": {},
    }

    def wrong_type(ctx):
        return True

    model = VerifiedPPO("MlpPolicy", "CartPole-v1", checks=[wrong_type], **SMALL_PPO)
    initial = copy.deepcopy(model.policy.state_dict())
    with pytest.raises(TypeError, match="'wrong_type' returned bool, expected a CheckResult"):
        model.learn(64)
    assert_same_tensors(dict(model.policy.state_dict()), initial)  # an error in a check applies nothing


def test_forbidden_tokens_default_to_the_environment_and_bound_the_mass():
    model = VerifiedRecurrentPPO("MlpLstmPolicy", textgen(forbidden_tokens=[1, 2]), **SMALL_RECURRENT)
    assert model.forbidden_tokens == (1, 2)
    model.learn(64)
    check = model.verification_log[0]["checks"]["forbidden_mass"]
    assert 0.0 < check["value"] < 1.0 and check["threshold"] == 0.05

    strict = VerifiedRecurrentPPO(
        "MlpLstmPolicy", textgen(), forbidden_tokens=[3], max_forbidden_prob=0.0, **SMALL_RECURRENT
    )
    strict.learn(64)
    entry = strict.verification_log[0]
    # Uniform start: mass 1/8 > 0; the update passes only if it did not raise the mass.
    assert entry["checks"]["forbidden_mass"]["passed"] == (
        entry["checks"]["forbidden_mass"]["value"] <= 1 / 8 + 1e-6 or entry["checks"]["forbidden_mass"]["value"] == 0.0
    )


def previous_tokens(observations, pad):
    """The repeat-mass check's previous tokens: each row's last token, -1 for an empty sequence."""
    tokens = observations.long()
    return last_tokens(tokens, sequence_lengths(tokens, pad), empty=-1)


def test_repeat_mass_is_measured_on_each_state_previous_token():
    model = VerifiedRecurrentPPO("MlpLstmPolicy", textgen(), max_repeat_prob=0.2, **SMALL_RECURRENT)
    pad = model.action_space.n  # TextGen-v0 pads with the vocabulary size
    observations = th.tensor(
        [[pad] * 6, [3, pad, pad, pad, pad, pad], [3, 5, 7, 1, 0, 2], [4, 4, 6, pad, pad, pad]], dtype=th.float32
    )  # as older SB3 releases store Box observations
    assert previous_tokens(observations, pad).tolist() == [-1, 3, 2, 6]
    model.learn(64)
    check = model.verification_log[0]["checks"]["repeat_mass"]
    assert check["threshold"] == 0.2 and check["value"] == pytest.approx(
        1 / 8, abs=0.05
    )  # near uniform after one update
    # each state's previous token is the action taken at the step before it (environment-major rows)
    batch = policy_kind(model.policy).rollout_batch(model.rollout_buffer, model.device)
    previous = previous_tokens(batch.observations, pad)
    actions, starts = batch.actions.long().flatten(), batch.episode_starts.bool()
    within = ~starts[1:] & (th.arange(1, len(starts)) % model.n_steps != 0)  # same episode, same environment
    assert bool(within.any())
    assert th.equal(previous[1:][within], actions[:-1][within])
    assert bool((previous[starts] == -1).all())  # TextGen-v0 episodes start empty
    default = VerifiedRecurrentPPO("MlpLstmPolicy", textgen(), **SMALL_RECURRENT)
    default.learn(64)
    assert default.max_repeat_prob is None and "repeat_mass" not in default.verification_log[0]["checks"]


def test_the_repeat_check_refuses_observations_that_are_not_padded_token_ids():
    class WrongPadding(gym.Env):
        observation_space = gym.spaces.Box(0, 9, (4,), dtype=np.int64)  # padding id 9, but 5 actions
        action_space = gym.spaces.Discrete(5)

        def reset(self, *, seed=None, options=None):
            return np.full(4, 9), {}

        def step(self, action):
            return np.full(4, 9), 0.0, True, False, {}

    with pytest.raises(ValueError, match="max_repeat_prob: needs Discrete\\(n\\) actions and token-sequence"):
        VerifiedPPO("MlpPolicy", WrongPadding(), max_repeat_prob=0.1, **SMALL_PPO)
    with pytest.raises(ValueError, match="max_repeat_prob: needs the token ids themselves; VecNormalize"):
        VerifiedRecurrentPPO("MlpLstmPolicy", VecNormalize(textgen()), max_repeat_prob=0.1, **SMALL_RECURRENT)
    VerifiedRecurrentPPO(
        "MlpLstmPolicy", VecNormalize(textgen(), norm_obs=False), max_repeat_prob=0.1, **SMALL_RECURRENT
    )


def test_verification_figures_reach_the_logger(tmp_path):
    model = VerifiedPPO("MlpPolicy", "CartPole-v1", **SMALL_PPO)
    model.set_logger(configure(str(tmp_path), ["csv"]))
    model.learn(3 * 64, log_interval=1)
    with open(tmp_path / "progress.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert {"verl/kl", "verl/accepted", "verl/verification_rate", "verl/check_entropy", "train/approx_kl"} <= rows[
        -1
    ].keys()
    # SB3 dumps before each train(): the figures of update k appear in the dump of iteration k + 1.
    kls = [float(row["verl/kl"]) for row in rows if row["verl/kl"]]
    assert len(kls) == 2 and kls == pytest.approx([entry["kl"] for entry in model.verification_log[:2]])


def test_save_and_load_keep_settings_and_log(tmp_path):
    class Strict(VerifiedPPO):
        def verify(self, ctx):
            results = super().verify(ctx)
            results["never"] = CheckResult(False, 0.0, None, "subclass veto")
            return results

    model = Strict("MlpPolicy", "CartPole-v1", kl_threshold=0.123, max_backtracks=1, **SMALL_PPO)
    model.learn(2 * 64)
    model.save(tmp_path / "model.zip")
    loaded = Strict.load(tmp_path / "model.zip", env=gym.make("CartPole-v1"))
    assert type(loaded) is Strict
    assert loaded.kl_threshold == 0.123 and loaded.max_backtracks == 1
    assert loaded.verification_log == model.verification_log
    assert loaded.verification_rate == model.verification_rate == 0.0
    assert not any(isinstance(value, dict) and "optimizer" in value for value in vars(loaded).values())
    loaded.learn(64, reset_num_timesteps=False)
    assert len(loaded.verification_log) == 3 and loaded.verification_log[-1]["reason"].endswith(
        "subclass veto (threshold None)"
    )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(kl_threshold=-1.0), "kl_threshold"),
        (dict(kl_threshold=0.0), "kl_threshold"),
        (dict(kl_threshold=float("nan")), "kl_threshold"),
        (dict(min_entropy=-0.1), "min_entropy"),
        (dict(max_forbidden_prob=1.5), "max_forbidden_prob"),
        (dict(surrogate_tolerance=-1e-3), "surrogate_tolerance"),
        (dict(returns_tolerance=-1.0), "returns_tolerance"),
        (dict(advantage_tolerance="a"), "advantage_tolerance"),
        (dict(max_backtracks=-1), "max_backtracks"),
        (dict(max_backtracks=1.5), "max_backtracks"),
        (dict(backtrack_ratio=1.0), "backtrack_ratio"),
        (dict(backtrack_ratio=0.0), "backtrack_ratio"),
        (dict(checks=[42]), "checks"),
        (dict(forbidden_tokens=[2]), "forbidden_tokens"),  # CartPole has 2 actions: ids 0, 1
        (dict(max_log_entries=0), "max_log_entries"),
        (dict(max_repeat_prob=1.5), "max_repeat_prob"),
        (dict(max_repeat_prob=0.1), "max_repeat_prob"),  # CartPole's observations are not token sequences
        (dict(max_reuse_rise=-1.0), "max_reuse_rise"),
        (dict(max_reuse_rise=3.0), "max_reuse_rise: needs Discrete"),  # not token sequences
        (dict(lr_shrink=1.5), "lr_shrink"),
        (dict(lr_shrink=0.0), "lr_shrink"),
        (dict(lr_recovery=0.9), "lr_recovery"),
        (dict(min_lr_scale=0.0), "min_lr_scale"),
        (dict(judge=object()), "judge: expected an object with the RolloutJudge methods"),
        (dict(judge=ReuseMassJudge(3.0), max_reuse_rise=3.0), "judge: give either"),
    ],
)
def test_invalid_settings_name_the_argument(kwargs, message):
    with pytest.raises(ValueError, match=message):
        VerifiedPPO("MlpPolicy", "CartPole-v1", **kwargs)


def test_verification_needs_the_update_it_verifies():
    from verl_sb3 import VerificationMixin

    class Unverifiable(VerificationMixin, PPO):
        pass

    with pytest.raises(TypeError, match="PPOUpdateMixin"):
        Unverifiable("MlpPolicy", "CartPole-v1")


def test_max_log_entries_bounds_the_log_but_not_the_rate():
    model = VerifiedPPO("MlpPolicy", "CartPole-v1", max_log_entries=2, **SMALL_PPO)
    model.learn(4 * 64)
    assert [entry["update"] for entry in model.verification_log] == [2, 3]
    assert model.verification_report.n_verified == 4 and not math.isnan(model.verification_rate)


def test_verified_ppo_learns_cartpole():
    model = VerifiedPPO("MlpPolicy", "CartPole-v1", n_steps=512, batch_size=64, seed=1)
    model.learn(12_000)
    returns = [info["r"] for info in model.ep_info_buffer]
    assert np.mean(returns) > 60  # a random policy averages about 22
    assert model.verification_rate >= 0.9


def test_entropy_controller_is_dual_ascent_on_accepted_updates():
    model = VerifiedPPO(
        "MlpPolicy", "CartPole-v1", ent_coef=0.0, target_entropy=5.0, entropy_coef_rate=0.1, **SMALL_PPO
    )
    model.learn(2 * 64)
    coefficient = 0.0
    for entry in model.verification_log:
        entropy = entry["checks"]["entropy"]["value"]  # CartPole: at most ln 2 < 5, so it must rise
        coefficient = max(0.0, coefficient + 0.1 * (5.0 - entropy))
    assert model.ent_coef == pytest.approx(coefficient) and model.ent_coef > 0.8

    above = VerifiedPPO(
        "MlpPolicy", "CartPole-v1", ent_coef=0.05, target_entropy=0.0, entropy_coef_rate=0.1, **SMALL_PPO
    )
    above.learn(64)
    assert above.ent_coef == 0.0  # entropy above the target: the multiplier falls to its floor, 0


def test_rejected_updates_leave_the_entropy_controller_alone():
    model = VerifiedPPO(
        "MlpPolicy", "CartPole-v1", ent_coef=0.02, target_entropy=5.0, kl_threshold=1e-12, max_backtracks=0, **SMALL_PPO
    )
    model.learn(2 * 64)
    assert all(entry["rolled_back"] for entry in model.verification_log)
    assert model.ent_coef == 0.02


def test_target_entropy_needs_the_entropy_check():
    with pytest.raises(ValueError, match="target_entropy"):
        VerifiedPPO("MlpPolicy", "CartPole-v1", min_entropy=None, target_entropy=1.0)
    with pytest.raises(ValueError, match="entropy_coef_rate"):
        VerifiedPPO("MlpPolicy", "CartPole-v1", target_entropy=1.0, entropy_coef_rate=0.0)


@pytest.mark.parametrize(
    "cls, policy, make_env, kwargs",
    [
        (VerifiedPPO, "MlpPolicy", lambda: textgen(3), dict(SMALL_PPO, n_steps=16, batch_size=48)),
        (
            VerifiedRecurrentPPO,
            "SLMLstmPolicy",
            lambda: textgen(3),
            dict(SMALL_RECURRENT, n_steps=16, policy_kwargs=dict(lstm_hidden_size=16, embedding_dim=8)),
        ),
    ],
)
def test_old_distribution_recorded_during_collection_equals_a_fresh_forward_pass(cls, policy, make_env, kwargs):
    """The verifier reuses the logits of collection; they must be the old policy on the batch's rows
    (episodes end mid-rollout here: length 6, 16 steps)."""
    compared = []

    class Compare(cls):
        def train(self):
            kind = policy_kind(self.policy)
            batch = kind.rollout_batch(self.rollout_buffer, self.device)
            recorded = self._old_distribution(kind, batch).distribution.logits
            self.policy.set_training_mode(False)
            with th.no_grad():
                fresh = kind.distribution(self.policy, batch)[0].distribution.logits
            assert recorded.shape == fresh.shape == (self.n_envs * self.n_steps, self.action_space.n)
            assert th.allclose(th.log_softmax(recorded, 1), th.log_softmax(fresh, 1), atol=1e-5)
            compared.append(True)
            super().train()

    model = Compare(policy, make_env(), **kwargs)
    model.learn(3 * 16 * 3)
    assert compared == [True] * 3 and len(model.verification_log) == 3


def test_non_finite_parameter_count_is_exact_even_when_a_sum_overflows():
    model = VerifiedPPO("MlpPolicy", "CartPole-v1", **SMALL_PPO)
    weight = next(model.policy.parameters())
    assert model._count_non_finite_parameters() == 0
    with th.no_grad():
        weight.fill_(3e38)  # every value finite, but their sum overflows to inf
    assert model._count_non_finite_parameters() == 0
    with th.no_grad():
        weight.view(-1)[:3] = th.tensor([math.nan, math.inf, -math.inf])
    assert model._count_non_finite_parameters() == 3


# ---------------------------------------------------------------------------- judged on the next rollout
class ScriptedJudge(ReuseMassJudge):
    """The reuse-mass judge, whose rollouts measure the given reuse masses (mean, standard error) in
    turn; it keeps what the real measurement said."""

    def __init__(self, values, max_rise=3.0):
        super().__init__(max_rise)
        object.__setattr__(self, "script", list(values))
        object.__setattr__(self, "measured", [])

    def measure(self, rollout):
        self.measured.append(super().measure(rollout))
        return self.script.pop(0)


class Scripted(probing(VerifiedRecurrentPPO)):
    """Records the state before each update."""

    def train(self):
        self.states_before = [*getattr(self, "states_before", []), copy.deepcopy(self.policy.state_dict())]
        super().train()


def scripted_reuse(values, **kwargs):
    """A VerifiedRecurrentPPO judged by a :class:`ScriptedJudge` of ``values``, and the judge."""
    judge = ScriptedJudge(values)
    return Scripted("MlpLstmPolicy", textgen(), judge=judge, **kwargs, **SMALL_RECURRENT), judge


def test_an_update_that_raises_the_reuse_mass_on_the_next_rollout_is_undone_and_the_rollout_collected_again():
    # rollout 1 trains update 0; rollout 2 shows the reuse mass up by 0.1 (7 standard errors):
    # update 0 is undone and rollout 3 collected instead, which trains update 1
    model, judge = scripted_reuse([(0.2, 0.01), (0.3, 0.01), (0.2, 0.01)])
    rollout = model.n_steps * model.n_envs
    model.learn(3 * rollout)
    assert model.num_timesteps == 3 * rollout and len(model.verification_log) == 2  # three rollouts, two updates
    first, second = model.verification_log
    assert first["accepted"] and first["kl_applied"] > 0 and first["undone"] and not second["undone"]
    assert "reuse mass 0.2 -> 0.3" in first["undo_reason"] and first["reuse_after"] == 0.3
    assert model.n_undone == 1 and model.logger.name_to_value["verl/n_undone"] == 1
    assert_same_tensors(dict(model.states_before[1]), model.states_before[0])  # update 1 started where update 0 did
    assert first["lr_scale"] == 1.0 and second["lr_scale"] == 0.5  # the scale each update used
    assert model.lr_scale == pytest.approx(0.5 * 1.02)  # regrown after update 1
    assert model.policy.optimizer.param_groups[0]["lr"] == pytest.approx(3e-3 * 0.5)  # update 1's learning rate
    assert len(judge.measured) == 3 and judge.script == []


def test_a_rise_within_the_tolerance_keeps_the_update():
    model, _ = scripted_reuse([(0.2, 0.01), (0.22, 0.01), (0.2, 0.01)])  # +0.02 is 1.4 standard errors
    model.learn(3 * model.n_steps * model.n_envs)
    assert model.n_undone == 0 and len(model.verification_log) == 3 and model.lr_scale == 1.0
    assert not any(entry["undone"] for entry in model.verification_log)


def test_the_learning_rate_scale_shrinks_to_its_floor_and_regrows():
    rise, base = (0.5, 0.01), (0.2, 0.01)
    model, _ = scripted_reuse([base, rise, base, rise, base], lr_shrink=0.25, min_lr_scale=0.1, lr_recovery=1.5)
    model.learn(5 * model.n_steps * model.n_envs)  # update 0 undone, update 1 undone, update 2 kept
    assert [entry["lr_scale"] for entry in model.verification_log] == pytest.approx(
        [1.0, 0.25, 0.1]
    )  # 0.375 * 0.25 < 0.1
    assert [entry["undone"] for entry in model.verification_log] == [True, True, False]
    assert model.lr_scale == pytest.approx(0.15) and model.n_undone == 2


def test_the_reuse_mass_is_the_policys_probability_of_tokens_already_in_its_sequences():
    # a rise of 1e9 standard errors never undoes: collect_rollouts only measures
    model = VerifiedRecurrentPPO("MlpLstmPolicy", textgen(num_envs=4), max_reuse_rise=1e9, **SMALL_RECURRENT)
    model.learn(model.n_steps * model.n_envs)  # one rollout, one update
    callback = model._init_callback(None)
    model.collect_rollouts(model.env, callback, model.rollout_buffer, model.n_steps)  # a fresh rollout
    mean, se = model.rollout_judgement.measured
    kind = policy_kind(model.policy)
    batch = kind.rollout_batch(model.rollout_buffer, model.device)
    model.policy.set_training_mode(False)
    with th.no_grad():
        distribution = kind.distribution(model.policy, batch)[0]
    probs = distribution.distribution.probs
    tokens = batch.observations.long()
    expected = []
    for row, sequence in enumerate(tokens.tolist()):
        used = {token for token in sequence if token < model.action_space.n}
        expected.append(sum(probs[row, token].item() for token in used))
    per_env = th.tensor(expected).reshape(model.n_envs, model.n_steps).mean(1)
    assert mean == pytest.approx(per_env.mean().item(), rel=1e-5)
    assert se == pytest.approx(per_env.std().item() / 2, rel=1e-4)  # across the 4 environments
    assert 0.0 < mean < 1.0


def test_the_training_csv_and_dashboard_count_the_undone_updates(tmp_path):
    from verl_sb3.app.config import TrainConfig
    from verl_sb3.app.dashboard import plot_dashboard
    from verl_sb3.app.recorder import TrainingRecorder

    model, _ = scripted_reuse([(0.2, 0.01), (0.3, 0.01), (0.2, 0.01), (0.2, 0.01)])
    rollout = model.n_steps * model.n_envs
    recorder = TrainingRecorder(TrainConfig(eval_freq=10**9, checkpoint_freq=10**9), tmp_path)
    model.learn(4 * rollout, callback=recorder)  # update 0 undone during the second rollout
    with open(tmp_path / "updates.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert [int(row["update"]) for row in rows] == [0, 1, 2]
    assert [int(row["n_undone"]) for row in rows] == [0, 1, 1]  # counted from the row after the undone update
    assert [int(row["timesteps"]) for row in rows] == [rollout, 3 * rollout, 4 * rollout]
    path = plot_dashboard(
        recorder.episode_timesteps, recorder.episode_returns, recorder.updates, tmp_path / "dashboard.png"
    )
    assert path.stat().st_size > 10_000


def test_judgement_needs_two_environments():
    with pytest.raises(ValueError, match="max_reuse_rise: needs at least 2 environments"):
        VerifiedRecurrentPPO("MlpLstmPolicy", textgen(num_envs=1), max_reuse_rise=3.0, **SMALL_RECURRENT)


def test_an_update_awaiting_judgement_survives_save_and_load(tmp_path):
    model = VerifiedRecurrentPPO("MlpLstmPolicy", textgen(), max_reuse_rise=3.0, **SMALL_RECURRENT)
    model.learn(model.n_steps * model.n_envs)
    pending = model.rollout_judgement.pending
    assert pending is not None and pending.update == 0
    model.lr_scale = 0.5
    model.save(tmp_path / "model.zip")
    loaded = VerifiedRecurrentPPO.load(tmp_path / "model.zip", env=textgen())
    assert loaded.lr_scale == 0.5 and loaded.rollout_judgement.pending.measured == pending.measured
    assert_same_tensors(loaded.rollout_judgement.pending.before.policy, pending.before.policy)
    assert_same_tensors(loaded.rollout_judgement.pending.before.optimizer, pending.before.optimizer)


def test_a_policy_pushed_below_the_entropy_floor_is_trained_back():
    """The entropy check passes an update that does not lower the entropy: with the floor alone,
    a policy that something made near-deterministic could never be updated again."""
    model = VerifiedPPO("MlpPolicy", textgen(), ent_coef=0.5, **SMALL_PPO)
    with th.no_grad():
        model.policy.action_net.weight.mul_(1e4)  # finite, but the policy is all but deterministic
        model.policy.action_net.bias.copy_(th.arange(8.0) * 1e3)
    model.learn(6 * 64 * 2)
    entries = model.verification_log
    assert entries[0]["checks"]["entropy"]["value"] < model.min_entropy  # below the floor throughout
    assert sum(entry["accepted"] for entry in entries) >= 3
    rises = [
        e["checks"]["entropy"]["value"] >= e["checks"]["entropy"]["details"]["before"] for e in entries if e["accepted"]
    ]
    assert all(rises)
