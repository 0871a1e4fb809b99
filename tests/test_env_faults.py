"""A step that cannot be rewarded changes nothing: the environments stay as they were, and the
error names what failed (a user component, a weight, the reward's float32 range)."""

from __future__ import annotations

import math

import gymnasium as gym
import numpy as np
import pytest

import textenv_gym  # noqa: F401
from textenv_gym.sb3_vec_env import TextGenVecEnv

SMALL = dict(vocab_size=8, max_length=5)


class Flaky:
    """A reward component that fails on the call it is told to (raising, or returning a bad value)."""

    def __init__(self, fail_on: int, outcome):
        self.calls, self.fail_on, self.outcome = 0, fail_on, outcome

    def __call__(self, tokens, lengths):
        self.calls += 1
        if self.calls == self.fail_on:
            if isinstance(self.outcome, Exception):
                raise self.outcome
            return np.full(len(lengths), self.outcome)
        return np.zeros(len(lengths))


def forms(component):
    kwargs = dict(SMALL, reward_fns={"flaky": component})
    return {
        "scalar": gym.make("TextGen-v0", **kwargs),
        "vector": gym.make_vec("TextGen-v0", num_envs=3, vectorization_mode="vector_entry_point", **kwargs),
        "sb3": TextGenVecEnv(3, seed=0, **kwargs),
    }


def step(env, action):
    if isinstance(env, TextGenVecEnv):
        return env.step(np.full(3, action))
    if isinstance(env, gym.vector.VectorEnv):
        return env.step(np.full(3, action))
    return env.step(action)


def sequences(env):
    if isinstance(env, TextGenVecEnv):
        return env.sequences.tokens.copy(), env.sequences.lengths.copy()
    inner = env.unwrapped if hasattr(env, "unwrapped") else env
    batch = inner.sequences if hasattr(inner, "sequences") else inner._sequence
    return batch.tokens.copy(), batch.lengths.copy()


@pytest.mark.parametrize("form", ["scalar", "vector", "sb3"])
@pytest.mark.parametrize(
    "outcome, message",
    [
        (RuntimeError("model offline"), r"reward_fns\['flaky'\]: raised RuntimeError: model offline"),
        (math.nan, r"reward_fns\['flaky'\]: returned non-finite values"),
        (1 + 2j, r"reward_fns\['flaky'\]: returned complex values"),
    ],
)
def test_a_failing_component_leaves_the_sequences_unchanged(form, outcome, message):
    env = forms(Flaky(fail_on=2, outcome=outcome))[form]
    env.reset() if form == "sb3" else env.reset(seed=0)
    step(env, 1)
    before = sequences(env)
    with pytest.raises(ValueError, match=message):
        step(env, 2)
    after = sequences(env)
    assert np.array_equal(before[0], after[0]) and np.array_equal(before[1], after[1])
    step(env, 2)  # the same step succeeds once the component does
    assert (sequences(env)[1] == before[1] + 1).all()


def test_a_weight_or_a_sum_that_overflows_names_what_did():
    def ten(tokens, lengths):
        return np.full(len(lengths), 10.0)

    env = gym.make("TextGen-v0", reward_fns={"ten": ten}, reward_weights={"ten": 1e308}, **SMALL)
    env.reset(seed=0)
    with pytest.raises(
        ValueError, match=r"reward_weights\['ten'\]: weight 1e\+308 times the component's values is not finite"
    ):
        env.step(1)
    assert env.unwrapped.sequence == []
    env = gym.make(
        "TextGen-v0",
        reward_fns={"one": lambda t, n: np.ones(len(n))},
        **SMALL,
        reward_weights={"one": 1e308, "diversity": 1e308},
    )
    env.reset(seed=0)
    with pytest.raises(ValueError, match="reward: the components sum to .*not a finite float64"):
        env.step(1)


def test_a_reward_beyond_float32_is_refused_by_the_sb3_env_but_not_by_the_float64_ones():
    kwargs = dict(SMALL, reward_weights={"diversity": 1e300})
    sb3 = TextGenVecEnv(2, seed=0, **kwargs)
    sb3.reset()
    before = sequences(sb3)
    with pytest.raises(ValueError, match="not a finite float32"):
        sb3.step(np.array([1, 2]))
    assert np.array_equal(sequences(sb3)[1], before[1])
    scalar = gym.make("TextGen-v0", **kwargs)
    scalar.reset(seed=0)
    assert scalar.step(1)[1] == 1e300


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(vocabulary=["start", None]), r"vocabulary: every token must be a str, got \[None\]"),
        (dict(vocabulary=["start", b"a"]), r"vocabulary: every token must be a str, got \[b'a'\]"),
        (
            dict(vocabulary=["start", "end\tgame"]),
            "vocabulary: every token must be a non-empty word without whitespace",
        ),
        (dict(forbidden_tokens=3), "forbidden_tokens: expected a list of token ids, got 3"),
        (dict(vocab_size=2**40), "vocab_size: expected an integer <= 1,048,576"),
        (dict(max_length=10**9), "max_length: expected an integer <= 65,536"),
    ],
)
def test_bad_settings_are_refused_before_anything_is_allocated(kwargs, message):
    with pytest.raises(ValueError, match=message):
        gym.make("TextGen-v0", **kwargs)


def test_a_batch_too_large_for_memory_is_refused_naming_num_envs():
    with pytest.raises(ValueError, match="num_envs: expected an integer <= 6,710,886, got 100000000"):
        TextGenVecEnv(100_000_000)
    with pytest.raises(ValueError, match="num_envs"):
        gym.make_vec("TextGen-v0", num_envs=10**8, vectorization_mode="vector_entry_point")
