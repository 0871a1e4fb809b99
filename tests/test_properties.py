"""Property tests (hypothesis) of the verification functions in :mod:`verl_sb3.verification.checks`.

Environment properties are covered by tests/test_env.py and tests/test_vector_env.py.
"""

from __future__ import annotations

import math

import numpy as np
import torch as th
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from stable_baselines3.common.distributions import CategoricalDistribution

from verl_sb3.verification import checks as C

PROPERTIES = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

LOGIT = st.floats(-30.0, 30.0, allow_nan=False, width=32)
FINITE = st.floats(-1e3, 1e3, allow_nan=False, width=32)


@st.composite
def logits(draw, n_states=None, n_actions=None):
    """A (states, actions) float32 array of logits, and sometimes a second one of the same shape."""
    n = draw(st.integers(1, 6)) if n_states is None else n_states
    k = draw(st.integers(2, 7)) if n_actions is None else n_actions
    return draw(arrays(np.float32, (n, k), elements=LOGIT))


@st.composite
def logit_pairs(draw):
    old = draw(logits())
    new = draw(logits(*old.shape))
    return old, new


def categorical(values) -> CategoricalDistribution:
    values = th.as_tensor(np.asarray(values), dtype=th.float32)
    return CategoricalDistribution(values.shape[-1]).proba_distribution(values)


def context(old, new=None, advantages=None, returns=None, values=None, forbidden_tokens=()) -> C.UpdateContext:
    old_d = categorical(old)
    new_d = categorical(old if new is None else new)
    n = old_d.distribution.logits.shape[0]
    actions = th.zeros(n, dtype=th.long)
    advantages = th.linspace(-1, 1, n) if advantages is None else th.as_tensor(advantages, dtype=th.float32)
    values = th.zeros(n) if values is None else th.as_tensor(values, dtype=th.float32)
    returns = advantages + values if returns is None else th.as_tensor(returns, dtype=th.float32)
    return C.UpdateContext(
        old_distribution=old_d,
        new_distribution=new_d,
        mask=th.ones(n, dtype=th.bool),
        actions=actions,
        advantages=advantages,
        returns=returns,
        values=values,
        old_log_prob=old_d.log_prob(actions),
        new_log_prob=new_d.log_prob(actions),
        normalize_advantage=True,
        parameters=[th.ones(2)],
        forbidden_tokens=forbidden_tokens,
    )


def kl_by_hand(old: np.ndarray, new: np.ndarray) -> np.ndarray:
    """KL(old || new) per state, in float64 from the float32 logits."""
    log_p = old.astype(np.float64) - np.logaddexp.reduce(old.astype(np.float64), axis=1, keepdims=True)
    log_q = new.astype(np.float64) - np.logaddexp.reduce(new.astype(np.float64), axis=1, keepdims=True)
    return (np.exp(log_p) * (log_p - log_q)).sum(axis=1)


# ---------------------------------------------------------------- KL
@PROPERTIES
@given(logits())
def test_kl_of_a_distribution_with_itself_is_exactly_zero(values):
    ctx = context(values, values.copy())
    assert th.all(ctx.kl == 0.0)
    result = C.kl_check(ctx, kl_threshold=1e-12)
    assert result.passed and result.value == 0.0 and result.details["max"] == 0.0


@PROPERTIES
@given(logit_pairs())
def test_kl_is_never_negative_and_is_the_exact_kl(pair):
    old, new = pair
    kl = context(old, new).kl
    assert th.all(kl >= 0.0), kl  # float32 rounding gave -4.8e-7 for logits [0, 0, 0] vs [7, 7, 7] before the clamp
    expected = kl_by_hand(old, new)
    assert np.allclose(kl.double().numpy(), expected, rtol=1e-3, atol=1e-5)


@PROPERTIES
@given(logit_pairs(), st.floats(0.0, 4.0, allow_nan=False), st.sampled_from(["scaled", "exact"]))
def test_kl_check_passes_iff_the_mean_kl_is_at_most_the_threshold(pair, factor, how):
    old, new = pair
    ctx = context(old, new)
    mean_kl = ctx.kl.double().mean().item()
    threshold = mean_kl if how == "exact" else factor * float(kl_by_hand(old, new).mean())
    assume(threshold > 0.0)
    result = C.kl_check(ctx, threshold)
    assert result.value == mean_kl
    assert result.passed == (mean_kl <= threshold)
    assert result.details["max"] >= result.value


# ---------------------------------------------------------------- entropy
@PROPERTIES
@given(logit_pairs(), st.floats(0.0, 3.0, allow_nan=False), st.floats(0.0, 3.0, allow_nan=False))
def test_entropy_check_is_monotone_in_the_floor(pair, floor_a, floor_b):
    low, high = sorted((floor_a, floor_b))
    ctx = context(*pair)
    at_low, at_high = C.entropy_check(ctx, low), C.entropy_check(ctx, high)
    assert at_low.value == at_high.value
    assert at_high.passed <= at_low.passed  # passing a higher floor implies passing a lower one
    before = at_low.details["before"]
    assert at_low.passed == (at_low.value >= low or at_low.value >= before)  # above the floor, or not lower
    assert 0.0 <= at_low.value <= math.log(pair[0].shape[1]) + 1e-5


# ---------------------------------------------------------------- returns = advantages + values
@st.composite
def rollouts(draw):
    n = draw(st.integers(2, 40))
    advantages = draw(arrays(np.float32, n, elements=FINITE))
    values = draw(arrays(np.float32, n, elements=FINITE))
    return advantages, values


@PROPERTIES
@given(rollouts(), st.sampled_from([1e-4, 1e-3, 0.05]))
def test_returns_match_passes_on_advantages_plus_values(rollout, tolerance):
    advantages, values = rollout
    ctx = context(np.zeros((len(advantages), 3), np.float32), advantages=advantages, values=values)
    result = C.returns_match_check(ctx, tolerance)
    assert result.passed and result.value == 0.0


@PROPERTIES
@given(rollouts(), st.sampled_from([1e-4, 1e-3, 0.05]), st.data())
def test_returns_match_fails_when_one_return_moves_by_more_than_the_tolerance(rollout, tolerance, data):
    advantages, values = rollout
    returns = (th.as_tensor(advantages) + th.as_tensor(values)).numpy()
    index = data.draw(st.integers(0, len(returns) - 1))
    sign = data.draw(st.sampled_from([-1.0, 1.0]))
    # The error is measured relative to 1 + max |return| (after the move): move by enough to exceed it.
    scale = 1.0 + float(np.abs(returns).max())
    delta = sign * 2 * tolerance * scale / (1 - tolerance)
    moved = returns.copy()
    moved[index] += np.float32(delta)
    zeros = np.zeros((len(returns), 3), np.float32)
    result = C.returns_match_check(context(zeros, advantages=advantages, values=values, returns=moved), tolerance)
    assert not result.passed and result.value > tolerance
    # ... and a move well within the tolerance passes.
    small = returns.copy()
    small[index] += np.float32(sign * 0.25 * tolerance * scale)
    assert C.returns_match_check(context(zeros, advantages=advantages, values=values, returns=small), tolerance).passed


# ---------------------------------------------------------------- return bound
@PROPERTIES
@given(
    arrays(
        np.float32,
        st.integers(1, 30),
        elements=st.one_of(st.floats(-1e7, 1e7, width=32), st.sampled_from([math.nan, math.inf, -math.inf])),
    ),
    st.floats(1e-3, 1e6),
)
def test_return_bound_passes_iff_every_return_is_finite_and_within_the_bound(returns, bound):
    ctx = context(
        np.zeros((len(returns), 3), np.float32), advantages=np.zeros(len(returns), np.float32), returns=returns
    )
    result = C.return_bound_check(ctx, bound)
    finite = bool(np.isfinite(returns).all())
    assert result.passed == (finite and float(np.abs(returns).max()) <= bound)
    if finite:
        assert result.value == float(np.abs(returns).max())


# ---------------------------------------------------------------- forbidden mass
@PROPERTIES
@given(logit_pairs(), st.data())
def test_forbidden_mass_is_a_probability(pair, data):
    old, new = pair
    n_actions = old.shape[1]
    tokens = data.draw(st.lists(st.integers(0, n_actions - 1), min_size=1, max_size=n_actions, unique=True))
    ctx = context(old, new, forbidden_tokens=tuple(tokens))
    result = C.forbidden_mass_check(ctx, 0.05)
    assert 0.0 <= result.value <= 1.0 + 1e-6
    if len(tokens) == n_actions:
        assert result.value == np.float32(1.0) or abs(result.value - 1.0) <= 1e-6
    # Passing: within the bound, or not higher than before the update.
    old_mass = float(ctx.probabilities("old")[:, list(tokens)].sum(dim=1).mean())
    assert result.passed == (result.value <= 0.05 or result.value <= old_mass)


# ---------------------------------------------------------------- environment reward bounds
@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_every_reward_lies_within_the_documented_bounds(data):
    """TextGenEnv's manual: one step's reward lies in
    [1 / max_length + min(repetition_penalty, 0) + min(forbidden_penalty, 0),
     1 + max(repetition_penalty, 0) + max(forbidden_penalty, 0)]."""
    from textenv_gym import TextGenEnv

    vocab_size = data.draw(st.integers(2, 12), label="vocab_size")
    max_length = data.draw(st.integers(1, 15), label="max_length")
    repetition_penalty = data.draw(st.floats(-3, 3, allow_nan=False), label="repetition_penalty")
    forbidden_penalty = data.draw(st.floats(-3, 3, allow_nan=False), label="forbidden_penalty")
    forbidden = data.draw(
        st.lists(st.integers(0, vocab_size - 1), max_size=vocab_size - 1, unique=True), label="forbidden"
    )
    env = TextGenEnv(
        vocab_size=vocab_size,
        max_length=max_length,
        repetition_penalty=repetition_penalty,
        repetition_window=data.draw(st.integers(2, 5), label="window"),
        forbidden_tokens=forbidden,
        forbidden_penalty=forbidden_penalty,
    )
    prompt = data.draw(st.lists(st.integers(0, vocab_size - 1), max_size=max_length - 1), label="prompt")
    env.reset(options={"prompt": prompt})
    low = 1 / max_length + min(repetition_penalty, 0) + min(forbidden_penalty, 0)
    high = 1 + max(repetition_penalty, 0) + max(forbidden_penalty, 0)
    terminated = False
    while not terminated:
        _, reward, terminated, truncated, _ = env.step(data.draw(st.integers(0, vocab_size - 1), label="action"))
        assert low - 1e-12 <= reward <= high + 1e-12
        assert not truncated
