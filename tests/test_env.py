"""The scalar environment TextGen-v0 (:class:`textenv_gym.TextGenEnv`) against its user manual.

Every expected reward is worked out by hand in the test, from the rules of the class docstring:
diversity = unique / total tokens (prompt included), + repetition_penalty when the last
``repetition_window`` tokens are identical, + forbidden_penalty when the appended token is forbidden.
"""

from __future__ import annotations

import math
import warnings

import gymnasium as gym
import numpy as np
import pytest
from gymnasium import spaces

import textenv_gym
from textenv_gym import DEFAULT_VOCABULARY, TextGenEnv, Tokenizer
from textenv_gym.vocabulary import default_vocabulary


def play(env: TextGenEnv, actions, prompt=None):
    """Reset ``env`` (with ``prompt``) and step ``actions``; the list of (reward, terminated, truncated, info)."""
    env.reset(options=None if prompt is None else {"prompt": prompt})
    out = []
    for action in actions:
        _, reward, terminated, truncated, info = env.step(action)
        out.append((reward, terminated, truncated, info))
    return out


def rewards_of(env: TextGenEnv, actions, prompt=None) -> list[float]:
    return [reward for reward, *_ in play(env, actions, prompt)]


# --------------------------------------------------------------------------------------------
# Constructor defaults and spaces
# --------------------------------------------------------------------------------------------


def test_constructor_defaults():
    env = TextGenEnv()
    config = env.config
    assert config.vocab_size == 50
    assert config.max_length == 20
    assert config.repetition_penalty == -0.5
    assert config.repetition_window == 3
    assert config.forbidden_tokens == ()
    assert config.forbidden_penalty == -1.0
    assert env.render_mode is None
    assert env.tokenizer.vocabulary == DEFAULT_VOCABULARY
    assert env.action_space == spaces.Discrete(50)
    assert isinstance(env.observation_space, spaces.Box)
    assert env.observation_space.shape == (20,)
    assert env.observation_space.dtype == np.int64
    assert np.all(env.observation_space.low == 0) and np.all(env.observation_space.high == 50)
    assert env.pad_id == 50


def test_vocab_size_none_follows_the_vocabulary():
    env = TextGenEnv(vocabulary=["Red", "green", "blue"])
    assert env.config.vocab_size == 3
    assert env.action_space == spaces.Discrete(3)
    assert env.pad_id == 3
    assert env.tokenizer.vocabulary == ("Red", "green", "blue")
    # an explicit vocab_size that agrees is accepted
    assert TextGenEnv(vocab_size=3, vocabulary=["a", "b", "c"]).config.vocab_size == 3


def test_vocab_size_larger_than_the_default_words_extends_them():
    env = TextGenEnv(vocab_size=53)
    assert env.tokenizer.vocabulary[:50] == DEFAULT_VOCABULARY
    assert env.tokenizer.vocabulary[50:] == ("tok50", "tok51", "tok52")
    assert default_vocabulary(3) == ("start", "sequence", "generation")
    assert TextGenEnv(vocab_size=4).tokenizer.vocabulary == ("start", "sequence", "generation", "the")


def test_reset_observation_is_all_padding_and_steps_fill_it_left_to_right():
    env = TextGenEnv(vocab_size=10, max_length=5)
    obs, info = env.reset()
    assert obs.dtype == np.int64 and obs.shape == (5,)
    assert obs.tolist() == [10] * 5
    assert info == {"length": 0, "diversity": 0.0, "repeated": False, "forbidden": False}
    assert env.sequence == []
    obs, *_ = env.step(4)
    assert obs.tolist() == [4, 10, 10, 10, 10]
    obs, *_ = env.step(9)
    assert obs.tolist() == [4, 9, 10, 10, 10]
    assert obs in env.observation_space
    assert env.sequence == [4, 9]
    # the returned observation is a copy, not a view of the environment's state
    obs[0] = 0
    assert env.sequence == [4, 9]


# --------------------------------------------------------------------------------------------
# Rewards: one rule at a time, then combined
# --------------------------------------------------------------------------------------------


def test_diversity_is_unique_over_total_of_the_whole_sequence():
    # window 5 > 4 steps, no forbidden tokens: only the diversity term
    env = TextGenEnv(repetition_window=5)
    # sequences: [1], [1,2], [1,2,1], [1,2,1,3]
    assert rewards_of(env, [1, 2, 1, 3]) == [1 / 1, 2 / 2, 2 / 3, 3 / 4]
    # [4], [4,4] (a run of 2 < window 3 with the default window)
    assert rewards_of(TextGenEnv(), [4, 4]) == [1.0, 1 / 2]


def test_diversity_counts_the_prompt():
    env = TextGenEnv(repetition_window=5)
    # prompt [1,2,2] + 3 -> [1,2,2,3]: 3 unique of 4; + 1 -> [1,2,2,3,1]: 3 of 5
    results = play(env, [3, 1], prompt=[1, 2, 2])
    assert [r for r, *_ in results] == [3 / 4, 3 / 5]
    assert [info["diversity"] for *_, info in results] == [3 / 4, 3 / 5]
    assert [info["length"] for *_, info in results] == [4, 5]


@pytest.mark.parametrize("window", [3, 4])
def test_repetition_penalty_fires_when_the_last_window_tokens_are_identical(window):
    env = TextGenEnv(repetition_window=window)
    results = play(env, [7] * 6)
    # sequence [7]*t: diversity 1/t; penalty from t = window on
    expected = [1 / t + (-0.5 if t >= window else 0.0) for t in range(1, 7)]
    assert [r for r, *_ in results] == expected
    assert [info["repeated"] for *_, info in results] == [t >= window for t in range(1, 7)]


def test_repetition_window_3_by_hand():
    env = TextGenEnv()
    # [7], [7,7], [7,7,7] fires, [7,7,7,8] does not, [7,7,7,8,8], [7,7,7,8,8,8] fires
    assert rewards_of(env, [7, 7, 7, 8, 8, 8]) == [1.0, 0.5, 1 / 3 - 0.5, 2 / 4, 2 / 5, 2 / 6 - 0.5]


def test_repetition_needs_identical_consecutive_tokens():
    env = TextGenEnv(repetition_window=3)
    # 7 appears three times but never three in a row
    results = play(env, [7, 7, 8, 7, 7])
    assert not any(info["repeated"] for *_, info in results)
    assert [r for r, *_ in results] == [1.0, 1 / 2, 2 / 3, 2 / 4, 2 / 5]


def test_repetition_run_starting_inside_the_prompt_window_3():
    # The manual's example: appending 7 to [3, 7, 7] gives diversity 2/4 and the penalty: 0.0
    env = TextGenEnv()
    results = play(env, [7, 7], prompt=[3, 7, 7])
    assert [r for r, *_ in results] == [2 / 4 - 0.5, 2 / 5 - 0.5]
    assert results[0][0] == 0.0
    assert all(info["repeated"] for *_, info in results)


def test_repetition_run_starting_inside_the_prompt_window_4():
    env = TextGenEnv(repetition_window=4)
    # [1,7,7] + 7 -> run of 3 < 4: no penalty; + 7 -> run of 4: penalty
    assert rewards_of(env, [7, 7], prompt=[1, 7, 7]) == [2 / 4, 2 / 5 - 0.5]
    # the whole window inside the prompt but one token: [7,7,7] + 7 -> run of 4
    assert rewards_of(env, [7], prompt=[7, 7, 7]) == [1 / 4 - 0.5]


def test_a_run_only_in_the_prompt_is_not_penalised_once_broken():
    env = TextGenEnv(repetition_window=3)
    # prompt [7,7,7] + 8 -> the last three tokens are 7,7,8
    results = play(env, [8], prompt=[7, 7, 7])
    assert results[0][0] == 2 / 4
    assert results[0][3]["repeated"] is False


def test_custom_repetition_penalty():
    env = TextGenEnv(repetition_penalty=-2.0, repetition_window=2)
    assert rewards_of(env, [3, 3, 3]) == [1.0, 1 / 2 - 2.0, 1 / 3 - 2.0]
    # a positive "penalty" is a finite number too, and is added as given
    assert rewards_of(TextGenEnv(repetition_penalty=0.25, repetition_window=2), [3, 3]) == [1.0, 0.5 + 0.25]


def test_forbidden_penalty_when_the_appended_token_is_forbidden():
    env = TextGenEnv(forbidden_tokens=[5, 9])
    results = play(env, [5, 4, 9])
    assert [r for r, *_ in results] == [1.0 - 1.0, 1.0, 1.0 - 1.0]
    assert [info["forbidden"] for *_, info in results] == [True, False, True]
    assert env.config.forbidden_tokens == (5, 9)


def test_forbidden_tokens_in_the_prompt_are_not_penalised():
    env = TextGenEnv(forbidden_tokens=[5])
    results = play(env, [4], prompt=[5])
    assert results[0][0] == 1.0  # [5, 4]: 2 unique of 2, 4 is allowed
    assert results[0][3]["forbidden"] is False


def test_custom_forbidden_penalty():
    env = TextGenEnv(forbidden_tokens=[2], forbidden_penalty=-3.5)
    assert rewards_of(env, [1, 2]) == [1.0, 1.0 - 3.5]


def test_repetition_and_forbidden_combine():
    env = TextGenEnv(forbidden_tokens=[7])
    results = play(env, [7, 7, 7, 1], prompt=None)
    expected = [1.0 - 1.0, 1 / 2 - 1.0, 1 / 3 - 0.5 - 1.0, 2 / 4]
    assert [r for r, *_ in results] == expected
    _, _, _, info = results[2]
    assert info["repeated"] is True and info["forbidden"] is True
    assert info["reward_components"] == {"diversity": 1 / 3, "repetition": -0.5, "forbidden": -1.0}


def test_combination_with_prompt_and_custom_penalties():
    env = TextGenEnv(
        vocab_size=6, repetition_window=2, repetition_penalty=-0.75, forbidden_tokens=[0, 3], forbidden_penalty=-0.125
    )
    # [1,3] + 3 -> [1,3,3]: 2/3, run of 2 (window 2), 3 forbidden
    # + 0 -> [1,3,3,0]: 3/4, forbidden
    # + 5 -> [1,3,3,0,5]: 4/5
    assert rewards_of(env, [3, 0, 5], prompt=[1, 3]) == [2 / 3 - 0.75 - 0.125, 3 / 4 - 0.125, 4 / 5]


def test_info_keys_and_components_sum_to_the_reward():
    env = TextGenEnv(forbidden_tokens=[2])
    _, info = env.reset()
    assert set(info) == {"length", "diversity", "repeated", "forbidden"}
    for action in [2, 2, 2, 3]:
        _, reward, _, _, info = env.step(action)
        assert set(info) == {"length", "diversity", "repeated", "forbidden", "reward_components"}
        assert set(info["reward_components"]) == {"diversity", "repetition", "forbidden"}
        components = info["reward_components"]
        assert components["diversity"] == info["diversity"]
        assert components["repetition"] == (-0.5 if info["repeated"] else 0.0)
        assert components["forbidden"] == (-1.0 if info["forbidden"] else 0.0)
        assert reward == components["diversity"] + components["repetition"] + components["forbidden"]
        assert isinstance(reward, float)
        assert isinstance(info["length"], int) and isinstance(info["repeated"], bool)


def test_reset_info_reports_the_prompt():
    env = TextGenEnv()
    _, info = env.reset(options={"prompt": [4, 4, 6]})
    assert info == {"length": 3, "diversity": 2 / 3, "repeated": False, "forbidden": False}


def test_optimum_is_20_for_20_distinct_tokens():
    env = TextGenEnv()
    results = play(env, list(range(20)))
    assert [r for r, *_ in results] == [1.0] * 20
    assert sum(r for r, *_ in results) == 20.0
    assert [t for _, t, _, _ in results] == [False] * 19 + [True]


def test_uniform_random_policy_return_matches_the_manual():
    # E[return] = sum_t E[unique_t] / t + P(repeat) * penalty, with E[unique_t] = 50 (1 - (49/50)^t)
    expected = sum(50 * (1 - (49 / 50) ** t) / t for t in range(1, 21)) - 0.5 * 18 / 50**2
    assert round(expected, 2) == 18.24
    envs = textenv_gym.TextGenVectorEnv(num_envs=2000)
    envs.reset(seed=0)
    rng = np.random.default_rng(0)
    total = np.zeros(2000)
    for _ in range(20):
        _, reward, terminated, _, _ = envs.step(rng.integers(0, 50, size=2000))
        total += reward
    assert terminated.all()
    assert abs(total.mean() - expected) < 0.05


# --------------------------------------------------------------------------------------------
# Termination
# --------------------------------------------------------------------------------------------


def test_terminates_exactly_at_max_length():
    env = TextGenEnv(max_length=5)
    results = play(env, [0, 1, 2, 3, 4])
    assert [t for _, t, _, _ in results] == [False, False, False, False, True]
    assert all(tr is False for _, _, tr, _ in results)
    assert results[-1][3]["length"] == 5


def test_terminates_at_max_length_with_a_prompt():
    env = TextGenEnv(max_length=5)
    results = play(env, [0, 1, 2], prompt=[7, 8])
    assert [t for _, t, _, _ in results] == [False, False, True]
    assert all(tr is False for _, _, tr, _ in results)
    assert env.sequence == [7, 8, 0, 1, 2]


def test_max_length_one_terminates_at_the_first_step():
    env = TextGenEnv(max_length=1)
    env.reset()
    obs, reward, terminated, truncated, _ = env.step(3)
    assert obs.tolist() == [3] and reward == 1.0 and terminated is True and truncated is False


def test_reset_after_termination_starts_a_new_episode():
    env = TextGenEnv(max_length=2)
    play(env, [1, 2])
    obs, info = env.reset()
    assert obs.tolist() == [50, 50] and info["length"] == 0
    _, reward, terminated, _, _ = env.step(1)
    assert reward == 1.0 and terminated is False


# --------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prompt",
    [
        [3, 5, 6],
        (3, 5, 6),
        np.array([3, 5, 6]),
        np.array([3, 5, 6], dtype=np.int32),
        "the model learns",
        "  The MODEL\tlearns\n",
    ],
    ids=["list", "tuple", "array", "int32-array", "text", "text-upper-case-whitespace"],
)
def test_prompt_forms(prompt):
    env = TextGenEnv()
    obs, info = env.reset(options={"prompt": prompt})
    assert obs.tolist() == [3, 5, 6] + [50] * 17
    assert info["length"] == 3
    assert env.sequence == [3, 5, 6]
    _, reward, *_ = env.step(7)  # "to": 4 distinct tokens
    assert reward == 1.0
    assert env.render_mode is None and env.tokenizer.decode(env.sequence) == "the model learns to"


def test_a_prompt_stays_until_another_is_given():
    env = TextGenEnv()
    env.reset(options={"prompt": [1, 2]})
    obs, info = env.reset()  # as Gymnasium's vector envs autoreset: without options
    assert info["length"] == 2 and env.sequence == [1, 2]
    env.reset(options={"prompt": None})
    assert env.sequence == [] and env.reset()[0].tolist() == [50] * 20
    env.reset(options={"prompt": "the model"})
    env.reset(options={"prompt": []})
    assert env.sequence == []


def test_a_prompt_survives_the_autoresets_of_gymnasiums_and_sb3s_vector_envs():
    from stable_baselines3.common.vec_env import DummyVecEnv

    envs = gym.vector.SyncVectorEnv([lambda: TextGenEnv(max_length=3)] * 2)
    envs.reset(options={"prompt": [1, 2]})
    envs.step([3, 3])  # the sequences are full: the next step autoresets them
    observations, *_ = envs.step([3, 3])
    assert observations[:, :2].tolist() == [[1, 2], [1, 2]]
    sb3 = DummyVecEnv([lambda: TextGenEnv(max_length=3)] * 2)
    sb3.set_options({"prompt": [1, 2]})
    sb3.reset()
    observations, *_ = sb3.step(np.array([3, 3]))  # done: reset in the same step
    assert observations[:, :2].tolist() == [[1, 2], [1, 2]]


def test_prompt_with_unknown_words_names_them():
    env = TextGenEnv()
    with pytest.raises(ValueError, match=r"unknown words.*'zebra'.*'xylophone'"):
        env.reset(options={"prompt": "the zebra plays xylophone"})


def test_prompt_too_long():
    env = TextGenEnv(max_length=5)
    with pytest.raises(ValueError, match=r"prompt: has 5 tokens.*max_length - 1 = 4"):
        env.reset(options={"prompt": [1, 2, 3, 4, 5]})
    with pytest.raises(ValueError, match=r"prompt: has 5 tokens"):
        env.reset(options={"prompt": "the model learns to write"})
    # exactly max_length - 1 tokens is allowed and leaves one action
    env.reset(options={"prompt": [1, 2, 3, 4]})
    *_, terminated, _, _ = env.step(0)
    assert terminated is True
    # with max_length 1, no prompt token at all fits
    with pytest.raises(ValueError, match=r"prompt.*max_length - 1 = 0"):
        TextGenEnv(max_length=1).reset(options={"prompt": [1]})


@pytest.mark.parametrize("prompt", [[50], [1, -1], np.array([0, 99])])
def test_prompt_ids_out_of_range(prompt):
    env = TextGenEnv()
    with pytest.raises(ValueError, match=r"prompt: token ids must lie in \[0, 49\]"):
        env.reset(options={"prompt": prompt})


@pytest.mark.parametrize("prompt", [[1.5], [[1, 2]], [True, False]])
def test_prompt_ids_of_the_wrong_kind(prompt):
    with pytest.raises(ValueError, match=r"prompt"):
        TextGenEnv().reset(options={"prompt": prompt})


# --------------------------------------------------------------------------------------------
# Argument errors: a ValueError naming the argument
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"vocab_size": 1}, r"vocab_size: expected an integer >= 2, got 1"),
        ({"vocab_size": 0}, r"vocab_size"),
        ({"vocab_size": 2.5}, r"vocab_size"),
        ({"vocab_size": True}, r"vocab_size"),
        ({"vocabulary": ["alone"]}, r"vocabulary: expected at least 2 tokens, got 1"),
        ({"vocabulary": "ab"}, r"vocabulary"),
        ({"vocabulary": ["a", "A"]}, r"vocabulary.*distinct"),
        ({"vocabulary": ["two words", "b"]}, r"vocabulary.*whitespace"),
        ({"vocab_size": 3, "vocabulary": ["a", "b"]}, r"vocab_size: got 3 but vocabulary has 2 tokens"),
        ({"max_length": 0}, r"max_length: expected an integer >= 1, got 0"),
        ({"max_length": -3}, r"max_length"),
        ({"max_length": 4.0}, r"max_length"),
        ({"repetition_window": 1}, r"repetition_window: expected an integer >= 2, got 1"),
        ({"repetition_penalty": math.nan}, r"repetition_penalty: expected a finite number, got nan"),
        ({"repetition_penalty": math.inf}, r"repetition_penalty: expected a finite number, got inf"),
        ({"repetition_penalty": -math.inf}, r"repetition_penalty"),
        ({"repetition_penalty": "-0.5"}, r"repetition_penalty"),
        ({"forbidden_penalty": math.nan}, r"forbidden_penalty: expected a finite number, got nan"),
        ({"forbidden_penalty": -math.inf}, r"forbidden_penalty"),
        ({"forbidden_tokens": [50]}, r"forbidden_tokens: token ids must lie in \[0, 49\], got \[50\]"),
        ({"forbidden_tokens": [-1]}, r"forbidden_tokens.*\[-1\]"),
        ({"forbidden_tokens": list(range(50))}, r"forbidden_tokens: every one of the 50 tokens is forbidden"),
        ({"vocabulary": ["a", "b"], "forbidden_tokens": [1, 0, 1]}, r"forbidden_tokens: every one of the 2"),
        ({"render_mode": "video"}, r"render_mode: expected None or one of \['ansi', 'human', 'rgb_array'\]"),
    ],
)
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TextGenEnv(**kwargs)


def test_invalid_arguments_through_gym_make():
    with pytest.raises(ValueError, match="repetition_window"):
        gym.make("TextGen-v0", repetition_window=1)


def test_valid_edge_arguments():
    env = TextGenEnv(
        vocab_size=np.int64(2),
        max_length=1,
        repetition_window=2,
        forbidden_tokens=np.array([1]),
        repetition_penalty=0,
        forbidden_penalty=np.float32(-2.0),
    )
    assert env.config.vocab_size == 2 and env.config.forbidden_tokens == (1,)
    assert env.config.forbidden_penalty == -2.0
    env.reset()
    assert env.step(1)[1] == 1.0 - 2.0


# --------------------------------------------------------------------------------------------
# Action validation
# --------------------------------------------------------------------------------------------


@pytest.fixture
def started_env():
    env = TextGenEnv(vocab_size=10)
    env.reset()
    return env


@pytest.mark.parametrize("action", [10, -1, 11.0, np.int64(10), np.array(-2)])
def test_action_out_of_range(started_env, action):
    with pytest.raises(ValueError, match=r"action: token id must lie in \[0, 9\]"):
        started_env.step(action)


@pytest.mark.parametrize("action", ["3", [3], (3,), None, True, False, np.bool_(True), 3 + 0j, {"a": 1}])
def test_action_of_the_wrong_type(started_env, action):
    with pytest.raises(ValueError, match=r"action: expected an integer token id"):
        started_env.step(action)


@pytest.mark.parametrize("action", [2.5, math.nan, math.inf, np.float32(0.5), np.array(1.25)])
def test_action_non_integral_float(started_env, action):
    with pytest.raises(ValueError, match=r"action: expected an integral token id"):
        started_env.step(action)


@pytest.mark.parametrize("action", [np.array([3]), np.array([[3]]), np.array([1, 2])])
def test_action_array_with_dimensions(started_env, action):
    with pytest.raises(ValueError, match=r"action: expected one token id, got an array of shape"):
        started_env.step(action)


@pytest.mark.parametrize(
    "action",
    [3, 3.0, np.float64(3.0), np.float32(3.0), np.int64(3), np.int32(3), np.uint8(3), np.array(3), np.array(3.0)],
)
def test_accepted_action_forms(started_env, action):
    obs, reward, *_ = started_env.step(action)
    assert started_env.sequence == [3]
    assert obs[0] == 3 and reward == 1.0


def test_rejected_action_leaves_the_episode_unchanged(started_env):
    started_env.step(1)
    for bad in (2.5, 10, "x"):
        with pytest.raises(ValueError):
            started_env.step(bad)
    assert started_env.sequence == [1]
    _, reward, *_ = started_env.step(1)
    assert reward == 1 / 2


def test_step_after_the_episode_ended():
    env = TextGenEnv(max_length=2)
    play(env, [0, 1])
    with pytest.raises(ValueError, match=r"episode has ended.*call reset\(\)"):
        env.step(2)
    env.reset()
    env.step(2)  # fine again
    assert env.sequence == [2]


def test_step_before_any_reset():
    with pytest.raises(ValueError, match=r"call reset\(\)"):
        TextGenEnv().step(0)


# --------------------------------------------------------------------------------------------
# Environment checkers (Gymnasium and Stable-Baselines3), warnings as errors
# --------------------------------------------------------------------------------------------

CHECKER_KWARGS = [
    {},
    {"forbidden_tokens": [0, 3, 7], "forbidden_penalty": -2.0},
    {"vocabulary": ["Alpha", "beta", "gamma", "delta"], "forbidden_tokens": [1], "max_length": 3},
    {"vocab_size": 2, "max_length": 1, "repetition_window": 2},
]


@pytest.mark.parametrize("kwargs", CHECKER_KWARGS)
def test_gymnasium_env_checker_without_warnings(kwargs, capsys):
    from gymnasium.utils.env_checker import check_env

    env = gym.make("TextGen-v0", **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_env(env.unwrapped)
    capsys.readouterr()  # check_env tries render_mode="human", which prints


@pytest.mark.parametrize("kwargs", CHECKER_KWARGS)
def test_sb3_env_checker_without_warnings(kwargs):
    from stable_baselines3.common.env_checker import check_env

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_env(TextGenEnv(**kwargs))


# --------------------------------------------------------------------------------------------
# Seeding
# --------------------------------------------------------------------------------------------


def test_same_seed_same_samples():
    a, b = TextGenEnv(), TextGenEnv()
    a.reset(seed=123)
    b.reset(seed=123)
    a.action_space.seed(123)
    b.action_space.seed(123)
    a.observation_space.seed(5)
    b.observation_space.seed(5)
    actions_a = [a.action_space.sample() for _ in range(50)]
    actions_b = [b.action_space.sample() for _ in range(50)]
    assert actions_a == actions_b
    assert len(set(int(x) for x in actions_a)) > 10  # really random, not constant
    assert np.array_equal(a.observation_space.sample(), b.observation_space.sample())
    assert np.array_equal(a.np_random.integers(0, 10**9, size=8), b.np_random.integers(0, 10**9, size=8))
    a.action_space.seed(124)
    assert [a.action_space.sample() for _ in range(50)] != actions_b


def test_reset_with_seed_is_reproducible():
    env = TextGenEnv(forbidden_tokens=[2])
    runs = []
    for _ in range(2):
        obs, info = env.reset(seed=7, options={"prompt": [1, 2]})
        draws = env.np_random.integers(0, 2**31, size=4).tolist()
        trajectory = [obs.tolist(), info]
        for action in [2, 2, 5]:
            obs, reward, terminated, truncated, info = env.step(action)
            trajectory.append((obs.tolist(), reward, terminated, truncated, info))
        runs.append((draws, trajectory))
    assert runs[0] == runs[1]
    env.reset(seed=8)
    assert env.np_random.integers(0, 2**31, size=4).tolist() != runs[0][0]


# --------------------------------------------------------------------------------------------
# Rendering and the tokenizer
# --------------------------------------------------------------------------------------------


def test_render_ansi_returns_the_decoded_text():
    env = TextGenEnv(render_mode="ansi")
    env.reset()
    assert env.render() == ""
    for action in [3, 5, 6]:
        env.step(action)
    assert env.render() == "the model learns"
    env.reset(options={"prompt": "A quick"})
    env.step(49)
    assert env.render() == "a quick end"


def test_render_human_prints_after_reset_and_every_step(capsys):
    env = TextGenEnv(render_mode="human")
    capsys.readouterr()
    env.reset(options={"prompt": "the"})
    env.step(5)
    env.step(6)
    assert capsys.readouterr().out == "the\nthe model\nthe model learns\n"
    assert env.render() is None
    assert capsys.readouterr().out == "the model learns\n"


def test_render_without_mode_returns_none(capsys):
    env = TextGenEnv()
    env.reset()
    env.step(0)
    assert env.render() is None
    assert capsys.readouterr().out == ""


def test_render_through_gym_make_and_custom_vocabulary():
    env = gym.make("TextGen-v0", vocabulary=["Hello", "World", "again"], render_mode="ansi")
    env.reset(options={"prompt": "hello WORLD"})
    env.step(2)
    assert env.render() == "Hello World again"


def test_tokenizer_round_trip_and_lower_casing():
    tokenizer = TextGenEnv().tokenizer
    ids = tokenizer.encode("The Model LEARNS to write new words")
    assert ids == [3, 5, 6, 7, 8, 9, 10]
    assert tokenizer.decode(ids) == "the model learns to write new words"
    assert tokenizer.encode(tokenizer.decode(ids)) == ids
    assert tokenizer.decode(np.array(ids)) == "the model learns to write new words"
    every_id = list(range(50))
    assert tokenizer.encode(tokenizer.decode(every_id)) == every_id
    assert tokenizer.encode("") == [] and tokenizer.decode([]) == ""
    assert len(tokenizer) == 50


def test_tokenizer_custom_case_sensitive_words_decode_as_given():
    tokenizer = Tokenizer(["Hello", "world", "GPU"])
    assert tokenizer.encode("hello gpu WORLD") == [0, 2, 1]
    assert tokenizer.decode([0, 2, 1]) == "Hello GPU world"


def test_tokenizer_unknown_words():
    with pytest.raises(ValueError, match=r"unknown words \['foo', 'bar'\]"):
        Tokenizer(["a", "b"]).encode("a foo b bar")
    skipping = Tokenizer(["a", "b"], unknown="skip")
    assert skipping.encode("a foo B bar") == [0, 1]
    assert skipping.encode("foo") == []
    with pytest.raises(ValueError, match=r"unknown: expected 'error' or 'skip'"):
        Tokenizer(["a", "b"], unknown="ignore")


def test_tokenizer_errors():
    tokenizer = Tokenizer(["a", "b"])
    with pytest.raises(ValueError, match=r"token_ids: id 2 out of range \[0, 1\]"):
        tokenizer.decode([0, 2])
    with pytest.raises(ValueError, match=r"token_ids: id -1"):
        tokenizer.decode([-1])
    with pytest.raises(TypeError, match="text"):
        tokenizer.encode([0, 1])
    with pytest.raises(ValueError, match="vocabulary"):
        Tokenizer(["a", ""])
