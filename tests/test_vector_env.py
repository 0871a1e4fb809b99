"""The batched environments against N scalar :class:`TextGenEnv`s.

- :class:`textenv_gym.TextGenVectorEnv`: Gymnasium ``VectorEnv``, NEXT_STEP autoreset;
- :class:`textenv_gym.sb3_vec_env.TextGenVecEnv`: SB3 ``VecEnv``, same-step autoreset.

The property tests compare with ``==`` (never approx): the batched environments run the same
arithmetic as the scalar one and must agree to the last bit.
"""

from __future__ import annotations

import warnings

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.vector import AutoresetMode, SyncVectorEnv
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from stable_baselines3.common.vec_env import DummyVecEnv, VecEnv, VecMonitor

from textenv_gym import TextGenEnv, TextGenVectorEnv
from textenv_gym.sb3_vec_env import TextGenVecEnv, make_textgen_vec_env

PROPERTY_SETTINGS = settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)


# --------------------------------------------------------------------------------------------
# Strategies: a configuration, a prompt, a number of environments and several episodes of actions
# --------------------------------------------------------------------------------------------

PENALTIES = st.sampled_from([-0.5, -1.0, -0.3, -2.75, 0.0, 0.1, -1e-3, 1 / 3])


@st.composite
def scenarios(draw):
    vocab_size = draw(st.integers(2, 9))
    max_length = draw(st.integers(1, 7))
    forbidden = draw(st.sets(st.integers(0, vocab_size - 1), max_size=vocab_size - 1))
    kwargs = {
        "vocab_size": vocab_size,
        "max_length": max_length,
        "repetition_window": draw(st.integers(2, 5)),
        "repetition_penalty": draw(PENALTIES),
        "forbidden_tokens": sorted(forbidden),
        "forbidden_penalty": draw(PENALTIES),
        "eos_token": draw(st.none() | st.integers(0, vocab_size - 1)),  # episodes of different lengths
    }
    prompt = draw(st.none() | st.lists(st.integers(0, vocab_size - 1), max_size=max_length - 1))
    num_envs = draw(st.integers(1, 5))
    # up to ~3 full episodes per environment, more with a long prompt
    num_steps = draw(st.integers(1, 3 * (max_length + 1) + 2))
    # a small vocabulary and repeated tokens make the repetition rule fire often
    action = st.integers(0, vocab_size - 1)
    actions = draw(
        st.lists(st.lists(action, min_size=num_envs, max_size=num_envs), min_size=num_steps, max_size=num_steps)
    )
    return kwargs, prompt, num_envs, np.array(actions, dtype=np.int64)


def reset_options(prompt):
    return None if prompt is None else {"prompt": prompt}


def assert_vector_info_matches(info, scalar_infos):
    """``info`` (Gymnasium vector) holds, for every environment i, exactly ``scalar_infos[i]``."""
    num_envs = len(scalar_infos)

    def check(vector, singles):
        keys = {key for key in vector if not key.startswith("_")}
        assert keys == set().union(*singles), (keys, singles)
        assert {key for key in vector if key.startswith("_")} == {f"_{key}" for key in keys}
        for key in keys:
            mask = vector[f"_{key}"]
            assert mask.shape == (num_envs,) and mask.dtype == bool
            assert mask.tolist() == [key in single for single in singles], key
            if any(isinstance(single.get(key), dict) for single in singles):
                check(vector[key], [single.get(key, {}) for single in singles])
                continue
            for i, single in enumerate(singles):
                if key in single:
                    assert vector[key][i] == single[key], (key, i, vector[key][i], single[key])
                    assert type(vector[key][i].item()) is type(single[key])

    check(info, scalar_infos)


# --------------------------------------------------------------------------------------------
# TextGenVectorEnv (Gymnasium, NEXT_STEP autoreset) == N scalar envs
# --------------------------------------------------------------------------------------------


@PROPERTY_SETTINGS
@given(scenarios())
def test_property_gymnasium_vector_env_equals_scalar_envs(scenario):
    kwargs, prompt, num_envs, actions = scenario
    vector = TextGenVectorEnv(num_envs=num_envs, **kwargs)
    scalars = [TextGenEnv(**kwargs) for _ in range(num_envs)]

    obs, info = vector.reset(seed=0, options=reset_options(prompt))
    expected = [env.reset(options=reset_options(prompt)) for env in scalars]
    assert np.array_equal(obs, np.stack([o for o, _ in expected]))
    assert obs.dtype == np.int64
    assert_vector_info_matches(info, [i for _, i in expected])

    needs_reset = [False] * num_envs
    for step_actions in actions:
        obs, reward, terminated, truncated, info = vector.step(step_actions)
        expected_obs, expected_infos = [], []
        for i, env in enumerate(scalars):
            if needs_reset[i]:  # NEXT_STEP: the action is ignored, the env restarts
                event("autoreset")
                o, inf = env.reset(options=reset_options(prompt))
                r, term = 0.0, False
            else:
                o, r, term, trunc, inf = env.step(int(step_actions[i]))
                assert trunc is False
                event(f"repeated={inf['repeated']}, forbidden={inf['forbidden']}, prompt={bool(prompt)}")
            needs_reset[i] = term
            assert reward[i] == r
            assert terminated[i] == term
            expected_obs.append(o)
            expected_infos.append(inf)
        assert np.array_equal(obs, np.stack(expected_obs))
        assert not truncated.any()
        assert reward.dtype == np.float64 and terminated.dtype == bool and truncated.dtype == bool
        assert_vector_info_matches(info, expected_infos)
        assert obs in vector.observation_space


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_property_gymnasium_vector_env_equals_sync_vector_env(scenario):
    """The native env and Gymnasium's own SyncVectorEnv of scalar envs: same arrays, same info dicts."""
    kwargs, prompt, num_envs, actions = scenario
    native = TextGenVectorEnv(num_envs=num_envs, **kwargs)
    sync = SyncVectorEnv([lambda: TextGenEnv(**kwargs) for _ in range(num_envs)])
    assert sync.metadata["autoreset_mode"] == native.metadata["autoreset_mode"] == AutoresetMode.NEXT_STEP

    def same(a, b):
        if isinstance(a, dict):
            assert a.keys() == b.keys()
            for key in a:
                same(a[key], b[key])
        else:
            assert np.array_equal(a, b) and a.dtype == b.dtype, (a, b)

    # SyncVectorEnv's autoreset calls reset() without options: the prompt stays
    for x, y in zip(
        native.reset(seed=3, options=reset_options(prompt)), sync.reset(seed=3, options=reset_options(prompt))
    ):
        same(x, y)
    for step_actions in actions:
        for x, y in zip(native.step(step_actions), sync.step(step_actions)):
            same(x, y)


def test_next_step_autoreset_by_hand():
    envs = TextGenVectorEnv(num_envs=2, max_length=2)
    envs.reset(options={"prompt": [9]})
    obs, reward, terminated, truncated, info = envs.step(np.array([4, 9]))
    assert obs.tolist() == [[9, 4], [9, 9]]
    assert reward.tolist() == [1.0, 0.5]
    assert terminated.tolist() == [True, True] and truncated.tolist() == [False, False]
    # the next step ignores the actions and restarts from the prompt
    obs, reward, terminated, truncated, info = envs.step(np.array([0, 1]))
    assert obs.tolist() == [[9, 50], [9, 50]]
    assert reward.tolist() == [0.0, 0.0]
    assert terminated.tolist() == [False, False]
    assert info["length"].tolist() == [1, 1] and info["_length"].all()
    assert info["diversity"].tolist() == [1.0, 1.0]
    assert "reward_components" not in info and "_reward_components" not in info  # as after TextGenEnv.reset
    # then the actions count again
    obs, reward, terminated, _, info = envs.step(np.array([0, 9]))
    assert obs.tolist() == [[9, 0], [9, 9]]
    assert reward.tolist() == [1.0, 0.5] and terminated.all()
    assert info["reward_components"]["diversity"].tolist() == [1.0, 0.5]
    assert info["_reward_components"].all()


def test_prompt_persists_over_autoresets_and_resets_until_another_is_given():
    envs = TextGenVectorEnv(num_envs=2, max_length=3)
    obs, info = envs.reset(options={"prompt": [1]})
    assert obs.tolist() == [[1, 50, 50]] * 2
    assert set(info) == {
        "length",
        "_length",
        "diversity",
        "_diversity",
        "repeated",
        "_repeated",
        "forbidden",
        "_forbidden",
    }
    for _ in range(3):  # two steps to finish, one autoreset step; twice over
        envs.step(np.array([2, 2]))
        envs.step(np.array([3, 2]))
        obs, reward, terminated, _, _ = envs.step(np.array([4, 4]))
        assert obs.tolist() == [[1, 50, 50]] * 2 and reward.tolist() == [0.0, 0.0] and not terminated.any()
    obs, _ = envs.reset()  # the prompt stays at a reset without options, as in the scalar env
    assert obs.tolist() == [[1, 50, 50]] * 2
    obs, _ = envs.reset(options={"prompt": None})  # None drops it
    assert obs.tolist() == [[50, 50, 50]] * 2
    obs, *_ = envs.step(np.array([5, 6]))
    assert obs.tolist() == [[5, 50, 50], [6, 50, 50]]


def test_vector_env_step_before_reset():
    with pytest.raises(ValueError, match=r"reset\(\)"):
        TextGenVectorEnv(num_envs=2).step(np.array([0, 0]))


def test_vector_env_render_ansi():
    envs = TextGenVectorEnv(num_envs=2, render_mode="ansi")
    envs.reset(options={"prompt": "the"})
    envs.step(np.array([5, 6]))
    assert envs.render() == ("the model", "the learns")
    assert TextGenVectorEnv(num_envs=1).render() is None
    with pytest.raises(ValueError, match="render_mode"):
        TextGenVectorEnv(num_envs=1, render_mode="human")


def test_vector_env_seeding_is_reproducible():
    a, b = TextGenVectorEnv(num_envs=4), TextGenVectorEnv(num_envs=4)
    a.reset(seed=11)
    b.reset(seed=11)
    a.action_space.seed(11)
    b.action_space.seed(11)
    samples_a = [a.action_space.sample() for _ in range(5)]
    samples_b = [b.action_space.sample() for _ in range(5)]
    assert all(np.array_equal(x, y) for x, y in zip(samples_a, samples_b))
    assert np.array_equal(a.np_random.random(3), b.np_random.random(3))


# --------------------------------------------------------------------------------------------
# TextGenVecEnv (SB3, same-step autoreset) == N scalar envs
# --------------------------------------------------------------------------------------------


@PROPERTY_SETTINGS
@given(scenarios())
def test_property_sb3_vec_env_equals_scalar_envs(scenario):
    kwargs, prompt, num_envs, actions = scenario
    venv = TextGenVecEnv(num_envs, seed=0, **kwargs)
    scalars = [TextGenEnv(**kwargs) for _ in range(num_envs)]
    if prompt is not None:
        venv.set_options({"prompt": prompt})
    obs = venv.reset()
    assert np.array_equal(obs, np.stack([env.reset(options=reset_options(prompt))[0] for env in scalars]))

    for step_actions in actions:
        obs, reward, done, infos = venv.step(step_actions)
        assert reward.dtype == np.float32 and done.dtype == bool
        assert len(infos) == num_envs
        for i, env in enumerate(scalars):
            o, r, term, trunc, inf = env.step(int(step_actions[i]))
            assert reward[i] == np.float32(r)
            assert done[i] == (term or trunc)
            if term:  # same-step autoreset: the new episode's first observation, the last one in info
                assert set(infos[i]) == {"terminal_observation", "length", "diversity", "TimeLimit.truncated"}
                assert np.array_equal(infos[i]["terminal_observation"], o)
                assert infos[i]["length"] == inf["length"]
                event(f"ended by the end token: {inf['length'] < kwargs['max_length']}")
                assert infos[i]["diversity"] == inf["diversity"]
                assert infos[i]["TimeLimit.truncated"] is False
                o, _ = env.reset(options=reset_options(prompt))  # the prompt persists
            else:
                assert infos[i] == {}
            assert np.array_equal(obs[i], o)


def test_sb3_vec_env_is_a_vec_env_with_the_right_spaces():
    venv = TextGenVecEnv(3, vocab_size=7, max_length=4)
    assert isinstance(venv, VecEnv)
    assert venv.num_envs == 3
    assert venv.action_space == gym.spaces.Discrete(7)
    assert venv.observation_space == gym.spaces.Box(0, 7, (4,), np.int64)
    assert venv.get_attr("render_mode") == [None] * 3
    assert venv.get_attr("num_envs", indices=[0, 2]) == [3, 3]
    assert venv.env_is_wrapped(gym.Wrapper) == [False] * 3
    with pytest.raises(AttributeError, match="set_attr"):
        venv.set_attr("x", 1)
    with pytest.raises(AttributeError, match="env_method"):
        venv.env_method("reset")
    with pytest.raises(ValueError, match=r"render_mode: expected None or one of \['rgb_array'\]"):
        TextGenVecEnv(2, render_mode="ansi")  # SB3's vectorised environments render images


def test_sb3_vec_env_prompt_from_set_options_and_seeded_action_space():
    venv = TextGenVecEnv(2, seed=5, max_length=3)
    venv.set_options({"prompt": "the model"})
    assert venv.reset().tolist() == [[3, 5, 50]] * 2
    obs, reward, done, infos = venv.step(np.array([6, 5]))
    assert done.all()
    assert obs.tolist() == [[3, 5, 50]] * 2  # the prompt is kept at autoreset
    assert [info["terminal_observation"].tolist() for info in infos] == [[3, 5, 6], [3, 5, 5]]
    assert reward.tolist() == [1.0, np.float32(2 / 3)]
    assert venv.reset().tolist() == [[3, 5, 50]] * 2  # a prompt stays until another is given
    venv.set_options([{"prompt": None}, {"prompt": [7]}])  # one per environment
    assert venv.reset().tolist() == [[50, 50, 50], [7, 50, 50]]
    other = TextGenVecEnv(2, seed=5)
    assert [venv.action_space.sample() for _ in range(20)] == [other.action_space.sample() for _ in range(20)]


@pytest.mark.parametrize("prompt", [[1, 2, 3, 4], "unknown-word"])
def test_sb3_vec_env_bad_prompt(prompt):
    venv = TextGenVecEnv(2, max_length=4)
    with pytest.raises(ValueError, match="prompt|unknown words"):
        venv.set_options({"prompt": prompt})  # checked when given


def test_sb3_dummy_vec_env_of_scalar_envs_gives_the_same():
    num_envs, kwargs = 6, {"vocab_size": 5, "max_length": 4, "forbidden_tokens": [0], "repetition_window": 2}
    dummy = DummyVecEnv([lambda: gym.make("TextGen-v0", **kwargs) for _ in range(num_envs)])
    native = TextGenVecEnv(num_envs, **kwargs)
    assert np.array_equal(dummy.reset(), native.reset())
    rng = np.random.default_rng(0)
    dones = 0
    for _ in range(30):
        actions = rng.integers(0, 5, size=num_envs)
        obs_d, rew_d, done_d, infos_d = dummy.step(actions)
        obs_n, rew_n, done_n, infos_n = native.step(actions)
        assert np.array_equal(obs_d, obs_n)
        assert np.array_equal(rew_d, rew_n) and rew_d.dtype == rew_n.dtype
        assert np.array_equal(done_d, done_n)
        for info_d, info_n in zip(infos_d, infos_n):
            assert ("terminal_observation" in info_d) == ("terminal_observation" in info_n)
            if "terminal_observation" in info_n:
                assert np.array_equal(info_d["terminal_observation"], info_n["terminal_observation"])
                for key in ("length", "diversity", "TimeLimit.truncated"):
                    assert info_d[key] == info_n[key]
        dones += done_n.sum()
    assert dones == num_envs * (30 // 4)  # every env finishes an episode every 4 steps


def test_ppo_trains_on_the_sb3_vec_env():
    from stable_baselines3 import PPO

    venv = make_textgen_vec_env(8, seed=0)
    assert isinstance(venv, VecMonitor)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # SB3 accepts the environment without complaint
        model = PPO("MlpPolicy", venv, n_steps=32, seed=0, device="cpu")
        model.learn(256)
    assert model.num_timesteps == 256
    # 256 steps / 8 envs / 20 steps per episode: at least 8 finished episodes recorded by VecMonitor
    assert len(model.ep_info_buffer) >= 8
    for episode in model.ep_info_buffer:
        assert episode["l"] == 20
        assert -30.0 <= episode["r"] <= 20.0 + 1e-4
    action, _ = model.predict(venv.reset(), deterministic=True)
    assert action.shape == (8,) and ((action >= 0) & (action < 50)).all()


# --------------------------------------------------------------------------------------------
# Bad batched actions
# --------------------------------------------------------------------------------------------

BAD_ACTIONS = [
    (np.array([0, 1, 2]), r"actions: expected shape \(4,\)"),
    (np.array([[0, 1, 2, 3]]), r"actions: expected shape \(4,\)"),
    (np.array(1), r"actions: expected shape \(4,\)"),
    (3, r"actions: expected shape \(4,\)"),
    (np.array([0, 1, 2, 10]), r"actions: token ids must lie in \[0, 9\], got \[10\]"),
    (np.array([-1, 1, 2, 3]), r"actions: token ids must lie in \[0, 9\], got \[-1\]"),
    (np.array([0.0, 1.5, 2.0, 3.0]), r"actions: expected integral token ids.*\[1.5\]"),
    (np.array([0.0, np.nan, 2.0, 3.0]), r"actions: expected integral token ids"),
    (np.array([True, False, True, False]), r"actions: expected integer token ids, got dtype bool"),
    (["a", "b", "c", "d"], r"actions: expected integer token ids"),
]


@pytest.mark.parametrize(("actions", "match"), BAD_ACTIONS)
def test_bad_actions_gymnasium_vector_env(actions, match):
    envs = TextGenVectorEnv(num_envs=4, vocab_size=10)
    envs.reset()
    with pytest.raises(ValueError, match=match):
        envs.step(actions)
    # nothing was appended
    assert envs.sequences.lengths.tolist() == [0, 0, 0, 0]


@pytest.mark.parametrize(("actions", "match"), BAD_ACTIONS)
def test_bad_actions_sb3_vec_env(actions, match):
    venv = TextGenVecEnv(4, vocab_size=10)
    venv.reset()
    with pytest.raises(ValueError, match=match):
        venv.step(actions)


@pytest.mark.parametrize("actions", [[1, 2, 3, 4], np.array([1.0, 2.0, 3.0, 4.0]), np.array([1, 2, 3, 4], np.uint8)])
def test_accepted_batched_action_forms(actions):
    envs = TextGenVectorEnv(num_envs=4, vocab_size=10)
    envs.reset()
    obs, reward, *_ = envs.step(actions)
    assert obs[:, 0].tolist() == [1, 2, 3, 4] and reward.tolist() == [1.0] * 4
    venv = TextGenVecEnv(4, vocab_size=10)
    venv.reset()
    assert venv.step(actions)[0][:, 0].tolist() == [1, 2, 3, 4]


def test_invalid_vector_arguments():
    with pytest.raises(ValueError, match="num_envs"):
        TextGenVectorEnv(num_envs=0)
    with pytest.raises(ValueError, match="num_envs"):
        TextGenVecEnv(0)
    with pytest.raises(ValueError, match="forbidden_tokens"):
        TextGenVecEnv(2, forbidden_tokens=[0, 1], vocab_size=2)
    with pytest.raises(ValueError, match="max_length"):
        TextGenVectorEnv(num_envs=2, max_length=0)
