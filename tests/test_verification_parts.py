"""The parts of the verification alone, without PPO: the verifier, its configuration, the model's
state, the line search, the next-rollout judgement and the report."""

from __future__ import annotations

import math

import pytest
import torch as th
from stable_baselines3 import PPO
from stable_baselines3.common.distributions import CategoricalDistribution
from tensor_asserts import assert_same_tensors

from verl_sb3.verification import CheckResult, ModelState, UpdateContext, VerificationConfig, verify_update
from verl_sb3.verification.judgement import NextRolloutJudgement, PendingJudgement
from verl_sb3.verification.line_search import backtracking_line_search
from verl_sb3.verification.report import VerificationReport
from verl_sb3.verification.verifier import all_passed


def context(new_logits, forbidden_tokens=()) -> UpdateContext:
    old = CategoricalDistribution(3).proba_distribution(th.zeros(4, 3))
    new = CategoricalDistribution(3).proba_distribution(th.as_tensor(new_logits, dtype=th.float32))
    actions = th.zeros(4, dtype=th.long)
    advantages = th.linspace(-1, 1, 4)
    return UpdateContext(
        old_distribution=old,
        new_distribution=new,
        mask=th.ones(4, dtype=th.bool),
        actions=actions,
        advantages=advantages,
        returns=advantages,
        values=th.zeros(4),
        old_log_prob=old.log_prob(actions),
        new_log_prob=new.log_prob(actions),
        normalize_advantage=True,
        parameters=[th.ones(2)],
        forbidden_tokens=forbidden_tokens,
    )


def test_the_verifier_runs_the_configured_checks_in_order():
    results = verify_update(context(th.zeros(4, 3)), VerificationConfig())
    assert list(results) == [
        "kl",
        "advantage_finite",
        "returns_match",
        "advantage_normalization",
        "return_bound",
        "surrogate",
        "finite_parameters",
        "entropy",
    ]
    assert all_passed(results) and results["kl"].value == 0.0

    def mine(ctx):
        return CheckResult(False, 1.0, 0.0, "no")

    config = VerificationConfig(min_entropy=None, max_abs_return=None, forbidden_tokens=(2,), checks=(mine,))
    results = verify_update(context(th.zeros(4, 3), forbidden_tokens=(2,)), config)
    assert "entropy" not in results and "return_bound" not in results
    assert list(results)[-2:] == ["forbidden_mass", "mine"] and not all_passed(results)


def test_a_sharp_update_fails_the_kl_bound_of_the_configuration():
    sharp = th.tensor([[5.0, 0.0, 0.0]] * 4)  # KL(uniform || sharp) = 2.248 nats
    assert verify_update(context(sharp), VerificationConfig(kl_threshold=2.3))["kl"].passed
    assert not verify_update(context(sharp), VerificationConfig())["kl"].passed


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(kl_threshold=0.0), "kl_threshold"),
        (dict(max_backtracks=-1), "max_backtracks"),
        (dict(forbidden_tokens=[1.5]), "forbidden_tokens"),
        (dict(forbidden_tokens="12"), "forbidden_tokens"),
        (dict(checks=[1]), "checks"),
        (dict(max_log_entries=0), "max_log_entries"),
        (dict(backtrack_ratio=1.0), "backtrack_ratio"),
    ],
)
def test_the_configuration_names_a_bad_value(kwargs, name):
    with pytest.raises(ValueError, match=name):
        VerificationConfig(**kwargs)


def test_the_line_search_keeps_the_first_step_that_passes():
    tried = []

    def verify_at(step):
        tried.append(step)
        return {"kl": CheckResult(step <= 0.25, step, 0.25)}

    search = backtracking_line_search(verify_at, max_backtracks=5, ratio=0.5)
    assert tried == [1.0, 0.5, 0.25] and search.accepted and (search.backtracks, search.step_size) == (2, 0.25)
    assert not search.full_step["kl"].passed and search.final["kl"].passed
    failing = backtracking_line_search(lambda step: {"kl": CheckResult(False, step)}, max_backtracks=3, ratio=0.5)
    assert not failing.accepted and failing.backtracks == 3 and failing.step_size == 0.125


def trained_ppo():
    model = PPO(
        "MlpPolicy", "CartPole-v1", n_steps=64, batch_size=64, n_epochs=1, seed=0, policy_kwargs=dict(net_arch=[8])
    )
    model.learn(64)
    return model


def test_the_model_state_comes_back_bit_for_bit_and_stays_usable():
    model = trained_ppo()
    model.counter = [1]
    state = ModelState.capture(model, "before", attributes=("counter",))
    policy, optimizer = state.policy, state.optimizer
    for _ in range(2):  # restoring twice: the optimizer must not have changed the captured tensors
        model.learn(64, reset_num_timesteps=False)
        model.counter.append(2)
        state.restore(model)
        assert_same_tensors(dict(model.policy.state_dict()), policy)
        assert_same_tensors(model.policy.optimizer.state_dict(), optimizer)
        assert model._n_updates == state.n_updates and model.counter == [1]
    assert state.label == "before"


def test_interpolation_sets_the_policy_between_two_states():
    model = trained_ppo()
    before = ModelState.capture(model)
    model.learn(64, reset_num_timesteps=False)
    after = {name: tensor.clone() for name, tensor in model.policy.state_dict().items()}
    before.interpolate(model, after, 0.25)
    for name, tensor in model.policy.state_dict().items():
        assert th.allclose(tensor, before.policy[name] + 0.25 * (after[name] - before.policy[name]))


class Judge:
    name = "score"

    def __init__(self, figures):
        self.figures = list(figures)

    def validate(self, model):
        pass

    def measure(self, rollout):
        return self.figures.pop(0)

    def verdict(self, before, after):
        return f"score {before[0]} -> {after[0]}" if after[0] > before[0] else None


def test_the_judgement_judges_the_pending_update_once_on_the_next_rollout():
    judgement = NextRolloutJudgement(Judge([(1.0, 0.1), (2.0, 0.1), (3.0, 0.1), (0.5, 0.1)]))
    state = ModelState({}, {}, 0)
    assert judgement.judge_rollout(object()) is None and judgement.measured == (1.0, 0.1)  # nothing pending
    judgement.await_judgement(state, update=0)
    assert judgement.pending == PendingJudgement(state, 0, (1.0, 0.1))
    pending, reason = judgement.judge_rollout(object())  # 1.0 -> 2.0: undo update 0
    assert pending.update == 0 and reason == "score 1.0 -> 2.0" and judgement.pending is None
    judgement.await_judgement(state, update=1)
    assert judgement.judge_rollout(object()) is not None
    judgement.await_judgement(state, update=2)
    assert judgement.judge_rollout(object()) is None and judgement.pending is None  # 3.0 -> 0.5: kept
    judgement.measured = None
    judgement.await_judgement(state, update=3)  # a rollout that was not measured judges nothing
    assert judgement.pending is None
    assert judgement.judge_rollout(None) is None and judgement.measured is None


def test_the_report_counts_every_update_and_keeps_the_last_entries():
    report = VerificationReport()
    passing = backtracking_line_search(lambda step: {"kl": CheckResult(True, 0.1, 0.25)}, 2, 0.5)
    failing = backtracking_line_search(lambda step: {"kl": CheckResult(False, 1.0, 0.25, "too far")}, 2, 0.5)
    report.note_recovery("restored")
    first = report.add(passing, timesteps=10, lr_scale=1.0, max_log_entries=2)
    assert first["recovered"] == "restored" and first["reason"] is None and first["update"] == 0
    report.add(failing, timesteps=20, lr_scale=1.0, max_log_entries=2)
    third = report.add(passing, timesteps=30, lr_scale=0.5, max_log_entries=2)
    assert [entry["update"] for entry in report.log] == [1, 2] and third["recovered"] is None
    assert report.log[0]["reason"] == "rolled back after 2 backtracks: kl: too far (threshold 0.25)"
    assert (report.n_verified, report.n_rolled_back, report.verification_rate) == (3, 1, 2 / 3)
    report.mark_undone(2, "worse", {"score_after": 3.0})
    assert report.n_undone == 1 and report.log[-1]["undone"] and report.log[-1]["score_after"] == 3.0
    assert math.isnan(VerificationReport().verification_rate)
