"""KL estimators and coefficient controllers against hand computations."""

from __future__ import annotations

import math

import pytest
import torch as th

from verl_sb3.kl_control import AdaptiveKLController, FixedKLController, exact_kl, kl_estimate

# p(a) = 0.5 under the policy, p_ref(a) = 0.2 under the reference.
LOG_P, LOG_REF = math.log(0.5), math.log(0.2)


@pytest.mark.parametrize(
    "estimator, expected",
    [
        ("k1", math.log(0.5 / 0.2)),  # log p - log p_ref
        ("k2", 0.5 * math.log(0.5 / 0.2) ** 2),
        ("k3", 0.2 / 0.5 - math.log(0.2 / 0.5) - 1),  # r - log r - 1, r = p_ref / p
    ],
)
def test_estimators_match_hand_computation(estimator, expected):
    value = kl_estimate(th.tensor([LOG_P], dtype=th.float64), th.tensor([LOG_REF], dtype=th.float64), estimator)
    assert value.item() == pytest.approx(expected, rel=1e-12)


def test_estimators_are_zero_when_policy_equals_reference():
    log_p = th.log(th.tensor([0.1, 0.7, 0.2]))
    for estimator in ("k1", "k2", "k3"):
        assert th.equal(kl_estimate(log_p, log_p, estimator), th.zeros(3))


def test_k1_and_k3_average_to_the_exact_kl_over_the_policy():
    p, q = th.tensor([0.6, 0.3, 0.1], dtype=th.float64), th.tensor([0.2, 0.3, 0.5], dtype=th.float64)
    exact = (p * (p / q).log()).sum()
    for estimator in ("k1", "k3"):  # unbiased: the expectation under p of the estimate is the KL
        expectation = (p * kl_estimate(p.log(), q.log(), estimator)).sum()
        assert expectation.item() == pytest.approx(exact.item(), rel=1e-12)


def test_exact_kl_matches_hand_computation_and_ignores_normalisation():
    p, q = [0.6, 0.3, 0.1], [0.2, 0.3, 0.5]
    expected = sum(a * math.log(a / b) for a, b in zip(p, q))
    logits = th.tensor([p], dtype=th.float64).log() + 3.0  # shifted: not normalised
    ref_logits = th.tensor([q], dtype=th.float64).log() - 1.0
    assert exact_kl(logits, ref_logits).item() == pytest.approx(expected, rel=1e-12)
    # a zero-probability action contributes 0, not NaN
    assert exact_kl(th.tensor([[0.0, -math.inf]]), th.tensor([[0.0, 0.0]])).item() == pytest.approx(math.log(2))


def test_unknown_estimator_is_refused():
    with pytest.raises(ValueError, match="estimator"):
        kl_estimate(th.zeros(1), th.zeros(1), "k4")


def test_adaptive_controller_update_matches_ziegler_formula():
    controller = AdaptiveKLController(init_kl_coef=0.2, target_kl=0.1, horizon=1000)
    controller.update(current_kl=0.11, n_steps=100)  # error = 0.11 / 0.1 - 1 = 0.1
    assert controller.value == pytest.approx(0.2 * (1 + 0.1 * 100 / 1000), rel=1e-12)
    controller.update(current_kl=1.0, n_steps=100)  # error 9 is clipped to 0.2
    assert controller.value == pytest.approx(0.2 * 1.01 * 1.02, rel=1e-12)
    controller.update(current_kl=0.0, n_steps=500)  # error -1 is clipped to -0.2
    assert controller.value == pytest.approx(0.2 * 1.01 * 1.02 * 0.9, rel=1e-12)
    value = controller.value
    controller.update(current_kl=float("nan"), n_steps=500)  # a broken rollout moves nothing
    assert controller.value == value


def test_fixed_controller_never_moves():
    controller = FixedKLController(0.3)
    controller.update(current_kl=10.0, n_steps=10_000)
    assert controller.value == 0.3
