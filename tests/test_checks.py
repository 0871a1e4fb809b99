"""Each verification check, alone, on hand-made tensors: it passes on a healthy update and fails on its fault."""

from __future__ import annotations

import math

import pytest
import torch as th
from stable_baselines3.common.distributions import CategoricalDistribution

from verl_sb3.verification import checks as C
from verl_sb3.verification.reuse_mass import reuse_mass


def categorical(logits) -> CategoricalDistribution:
    logits = th.as_tensor(logits, dtype=th.float32)
    return CategoricalDistribution(logits.shape[-1]).proba_distribution(logits)


def context(old_logits, new_logits, advantages=None, returns=None, values=None, actions=None, **kwargs):
    old, new = categorical(old_logits), categorical(new_logits)
    n = old.distribution.logits.shape[0]
    actions = th.zeros(n, dtype=th.long) if actions is None else th.as_tensor(actions)
    advantages = th.linspace(-1, 1, n) if advantages is None else th.as_tensor(advantages, dtype=th.float32)
    values = th.zeros(n) if values is None else th.as_tensor(values, dtype=th.float32)
    returns = advantages + values if returns is None else th.as_tensor(returns, dtype=th.float32)
    defaults = dict(normalize_advantage=True, parameters=[th.ones(3)], forbidden_tokens=())
    defaults.update(kwargs)
    return C.UpdateContext(
        old_distribution=old,
        new_distribution=new,
        mask=th.ones(n, dtype=th.bool),
        actions=actions,
        advantages=advantages,
        returns=returns,
        values=values,
        old_log_prob=old.log_prob(actions),
        new_log_prob=new.log_prob(actions),
        **defaults,
    )


UNIFORM = th.zeros(4, 3)


def test_kl_is_exact_over_the_full_distribution():
    new = th.tensor([[1.0, 0.0, 0.0]] * 4)
    ctx = context(UNIFORM, new)
    p = th.full((3,), 1 / 3)
    q = th.softmax(new[0], 0)
    by_hand = float((p * (p.log() - q.log())).sum())
    result = C.kl_check(ctx, kl_threshold=1.0)
    assert result.value == pytest.approx(by_hand, rel=1e-6) and result.passed
    assert not C.kl_check(ctx, kl_threshold=by_hand / 2).passed
    assert C.kl_check(context(UNIFORM, UNIFORM), 1e-9).value == 0.0


def test_kl_reports_the_maximum_over_states():
    new = th.zeros(4, 3)
    new[2] = th.tensor([5.0, 0.0, 0.0])
    result = C.kl_check(context(UNIFORM, new), 1.0)
    per_state = context(UNIFORM, new).kl
    assert per_state[0] == 0.0 and per_state[2] > 0
    assert f"max over states {per_state.max().item():.4g}" in result.message


def test_kl_mean_never_exceeds_its_maximum():
    # six equal per-state KLs of 9.54e-7: their float32 mean rounds above them (found by the property tests)
    ctx = context(th.zeros(6, 3), th.zeros(6, 3))
    ctx.kl = th.full((6,), 9.536749985272763e-07)
    assert ctx.kl.mean().item() > ctx.kl.max().item()  # the float32 rounding this guards against
    result = C.kl_check(ctx, 1.0)
    assert result.value <= result.details["max"] == ctx.kl.max().item()


def test_nan_advantage_fails_advantage_finite():
    assert C.advantage_finite_check(context(UNIFORM, UNIFORM)).passed
    result = C.advantage_finite_check(
        context(UNIFORM, UNIFORM, advantages=[0.5, math.nan, -0.5, 1.0], returns=[0.0] * 4)
    )
    assert not result.passed and result.value == 1.0  # one NaN advantage; returns and values are finite
    assert "non-finite" in result.message


def test_returns_that_do_not_match_fail():
    good = context(UNIFORM, UNIFORM, values=[1.0, 2.0, 3.0, 4.0])
    assert C.returns_match_check(good, 1e-5).passed
    bad = context(
        UNIFORM, UNIFORM, advantages=[0.1, 0.2, 0.3, 0.4], values=[1.0, 2.0, 3.0, 4.0], returns=[1.1, 2.2, 3.3, 9.0]
    )
    result = C.returns_match_check(bad, 1e-5)
    assert not result.passed and result.value == pytest.approx(4.6 / 10.0)


def test_constant_advantages_fail_normalization():
    assert C.advantage_normalization_check(context(UNIFORM, UNIFORM), 0.05).passed
    result = C.advantage_normalization_check(context(UNIFORM, UNIFORM, advantages=[0.3] * 4), 0.05)
    assert not result.passed and result.value == pytest.approx(1.0)


def test_surrogate_decrease_fails_and_alignment_is_reported():
    advantages = [1.0, 1.0, -1.0, -1.0]
    toward = th.tensor([[1.0, 0, 0], [1.0, 0, 0], [-1.0, 0, 0], [-1.0, 0, 0]])  # action 0 up where A > 0
    ctx = context(UNIFORM, toward, advantages=advantages)
    assert C.surrogate_check(ctx, 0.0).passed and C.advantage_alignment(ctx) == 1.0
    against = context(UNIFORM, -toward, advantages=advantages)
    result = C.surrogate_check(against, 0.01)
    assert not result.passed and result.value < -0.01
    assert C.advantage_alignment(against) == 0.0 and "0.0% of samples moved with their advantage" in result.message


def test_non_finite_parameters_fail():
    assert C.finite_parameters_check(context(UNIFORM, UNIFORM)).passed
    result = C.finite_parameters_check(context(UNIFORM, UNIFORM, parameters=[th.tensor([1.0, math.inf, math.nan])]))
    assert not result.passed and result.value == 2.0


def test_entropy_collapse_fails():
    assert C.entropy_check(context(UNIFORM, UNIFORM), 1.0).value == pytest.approx(math.log(3))
    collapsed = context(UNIFORM, th.tensor([[20.0, 0.0, 0.0]] * 4))
    result = C.entropy_check(collapsed, 0.01)
    assert not result.passed and result.value < 0.01
    assert result.details["before"] == pytest.approx(math.log(3)) and "1.099 -> " in result.message


def test_an_update_that_does_not_lower_a_low_entropy_passes():
    sharp, sharper = th.tensor([[12.0, 0.0, 0.0]] * 4), th.tensor([[20.0, 0.0, 0.0]] * 4)
    assert C.entropy_check(context(sharper, sharp), 0.01).passed  # below the floor, but higher than before
    assert not C.entropy_check(context(sharp, sharper), 0.01).passed  # below the floor and lower


def test_forbidden_mass_raised_above_the_bound_fails():
    raised = th.tensor([[0.0, 0.0, 3.0]] * 4)
    ctx = context(UNIFORM, raised, forbidden_tokens=(2,))
    result = C.forbidden_mass_check(ctx, 0.5)
    assert not result.passed and result.value == pytest.approx(float(th.softmax(raised[0], 0)[2]))
    lowered = context(UNIFORM, -raised, forbidden_tokens=(2,))
    assert C.forbidden_mass_check(lowered, 0.01).passed  # above the bound (mass 0.024) but lower than before
    assert C.forbidden_mass_check(context(UNIFORM, UNIFORM, forbidden_tokens=(2,)), 0.5).passed


def test_repeat_mass_raised_above_the_bound_fails():
    previous = th.tensor([0, 1, 2, -1])  # the last state has no previous token
    raised = th.zeros(4, 3)
    raised[th.arange(3), previous[:3]] = 3.0  # each state's previous token made likelier
    ctx = context(UNIFORM, raised, previous_tokens=previous)
    result = C.repeat_mass_check(ctx, 0.5)
    by_hand = float(th.softmax(th.tensor([3.0, 0.0, 0.0]), 0)[0])  # the same for the three states
    assert not result.passed and result.value == pytest.approx(by_hand)
    assert C.repeat_mass_check(ctx, 0.95).passed
    lowered = context(UNIFORM, -raised, previous_tokens=previous)
    assert C.repeat_mass_check(lowered, 0.01).passed  # above the bound (mass 0.024) but lower than before
    # only the state without a previous token changes: nothing is measured on it
    other = th.zeros(4, 3)
    other[3, 0] = 9.0
    assert C.repeat_mass_check(context(UNIFORM, other, previous_tokens=previous), 0.0).value == pytest.approx(1 / 3)
    none = context(UNIFORM, raised, previous_tokens=th.full((4,), -1))
    assert C.repeat_mass_check(none, 0.0).passed
    with pytest.raises(ValueError, match="max_repeat_prob"):
        C.repeat_mass_check(context(UNIFORM, raised), 0.5)


def test_padding_is_left_out_of_every_per_sample_figure():
    old_logits = th.zeros(4, 3)
    new_logits = th.tensor([[0.0, 0.0, 0.0], [9.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 9.0]])
    mask = th.tensor([True, False, True, False])  # rows 1 and 3 are padding
    old, new = categorical(old_logits), categorical(new_logits)
    actions = th.zeros(2, dtype=th.long)
    ctx = C.UpdateContext(
        old_distribution=old,
        new_distribution=new,
        mask=mask,
        actions=actions,
        advantages=th.tensor([-1.0, 1.0]),
        returns=th.tensor([-1.0, 1.0]),
        values=th.zeros(2),
        old_log_prob=old.log_prob(th.zeros(4, dtype=th.long))[mask],
        new_log_prob=new.log_prob(th.zeros(4, dtype=th.long))[mask],
        normalize_advantage=True,
        parameters=[th.ones(1)],
    )
    assert ctx.kl.shape == ctx.entropy.shape == (2,) and ctx.probabilities("new").shape == (2, 3)
    assert ctx.kl[0] == 0.0 and ctx.kl[1] == pytest.approx(float(context(UNIFORM[:1], new_logits[2:3]).kl[0]))
    assert ctx.probabilities("new")[1].tolist() == pytest.approx(th.softmax(new_logits[2], 0).tolist())


def test_kl_with_a_zero_probability_action_counts_it_as_zero():
    old = th.tensor([[0.0, 0.0, -math.inf]] * 4)  # token 2 impossible before the update
    new = th.tensor([[0.0, 1.0, 2.0]] * 4)
    p = th.tensor([0.5, 0.5])
    q = th.softmax(new[0], 0)[:2]
    by_hand = float((p * (p.log() - q.log())).sum())
    assert C.kl_check(context(old, new), 10.0).value == pytest.approx(by_hand, rel=1e-6)
    assert C.kl_check(context(new, old), 10.0).value == math.inf  # the new policy rules out a possible token


def test_returns_too_large_or_non_finite_fail_the_return_bound():
    assert C.return_bound_check(context(UNIFORM, UNIFORM, values=[1.0, 2.0, 3.0, 4.0]), 10.0).passed
    spike = C.return_bound_check(context(UNIFORM, UNIFORM, returns=[0.5, 1e6, 1.0, 2.0]), 1e4)
    assert not spike.passed and spike.value == 1e6 and "max |return| 1e+06" in spike.message
    nan = C.return_bound_check(context(UNIFORM, UNIFORM, returns=[0.5, math.nan, 1.0, 2.0]), 1e4)
    assert not nan.passed and "1 non-finite returns" in nan.message


def test_reuse_mass_counts_each_token_already_in_the_sequence_once():
    # 4 tokens, padding id 4; probabilities 0.1, 0.2, 0.3, 0.4
    logits = th.log(th.tensor([[0.1, 0.2, 0.3, 0.4]] * 4))
    tokens = th.tensor(
        [
            [4, 4, 4],  # empty sequence: nothing to reuse
            [1, 3, 4],  # tokens 1 and 3: 0.2 + 0.4
            [2, 2, 2],  # token 2 three times counts once: 0.3
            [3, 0, 3],  # 0.4 + 0.1
        ]
    )
    mass = reuse_mass(logits, tokens, 4)
    assert mass.tolist() == pytest.approx([0.0, 0.6, 0.3, 0.5], abs=1e-6)
    assert tokens.tolist()[2] == [2, 2, 2]  # the input is not modified
