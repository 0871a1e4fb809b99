"""Registration of TextGen-v0 with Gymnasium: ``gym.make``, ``gym.make_vec`` and fresh interpreters."""

from __future__ import annotations

import importlib
import textwrap

import gymnasium as gym
import numpy as np
import pytest
from _scripts import run_python
from gymnasium.wrappers import OrderEnforcing, PassiveEnvChecker

import textenv_gym
from textenv_gym import TextGenEnv, TextGenVectorEnv


def run_fresh(code: str) -> str:
    """Run ``code`` in a new interpreter that can import textenv_gym (but has not); its stdout."""
    result = run_python("-c", textwrap.dedent(code), timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_import_registers_textgen_v0_in_a_fresh_interpreter():
    out = run_fresh(
        """
        import sys
        import gymnasium as gym
        assert "textenv_gym" not in sys.modules
        print("before", "TextGen-v0" in gym.registry)
        import textenv_gym
        spec = gym.registry["TextGen-v0"]
        print("after", spec.entry_point, spec.vector_entry_point)
        """
    )
    assert out.split("\n")[:2] == [
        "before False",
        "after textenv_gym.text_gen:TextGenEnv textenv_gym.vector:TextGenVectorEnv",
    ]


def test_make_with_module_prefix_without_importing_it_first():
    out = run_fresh(
        """
        import sys
        import gymnasium as gym
        assert "textenv_gym" not in sys.modules
        env = gym.make("textenv_gym:TextGen-v0", max_length=4)
        obs, info = env.reset(seed=0)
        obs, reward, terminated, truncated, info = env.step(3)
        print(type(env.unwrapped).__module__, type(env.unwrapped).__name__, obs.tolist(), reward)
        """
    )
    assert out.strip() == "textenv_gym.text_gen TextGenEnv [3, 50, 50, 50] 1.0"


def test_registered_spec():
    spec = gym.spec("TextGen-v0")
    assert spec.entry_point == "textenv_gym.text_gen:TextGenEnv"
    assert spec.vector_entry_point == "textenv_gym.vector:TextGenVectorEnv"
    assert spec.max_episode_steps is None  # the environment terminates by itself at max_length
    assert spec.kwargs == {}


def test_reimporting_does_not_fail_or_duplicate():
    spec = gym.registry["TextGen-v0"]
    importlib.reload(textenv_gym)
    assert gym.registry["TextGen-v0"] is spec


def test_make_returns_the_wrapped_scalar_env():
    env = gym.make("TextGen-v0")
    assert isinstance(env.unwrapped, TextGenEnv)
    assert isinstance(env, OrderEnforcing)
    assert isinstance(env.env, PassiveEnvChecker)
    obs, info = env.reset(seed=0)
    assert obs.tolist() == [50] * 20
    assert env.spec.id == "TextGen-v0"


def test_make_kwargs_reach_the_constructor():
    env = gym.make(
        "TextGen-v0",
        vocab_size=12,
        max_length=7,
        repetition_penalty=-0.25,
        repetition_window=4,
        forbidden_tokens=[1, 3],
        forbidden_penalty=-2.0,
        render_mode="ansi",
    )
    config = env.unwrapped.config
    assert (config.vocab_size, config.max_length, config.repetition_window) == (12, 7, 4)
    assert (config.repetition_penalty, config.forbidden_penalty, config.forbidden_tokens) == (-0.25, -2.0, (1, 3))
    assert env.unwrapped.render_mode == "ansi"
    assert env.action_space.n == 12 and env.observation_space.shape == (7,)
    env.reset()
    assert env.step(3)[1] == 1.0 - 2.0
    custom = gym.make("textenv_gym:TextGen-v0", vocabulary=["x", "y", "z"])
    assert custom.unwrapped.config.vocab_size == 3
    assert custom.unwrapped.tokenizer.vocabulary == ("x", "y", "z")


def test_make_vec_vector_entry_point_returns_the_native_vector_env():
    envs = gym.make_vec(
        "TextGen-v0", num_envs=5, vectorization_mode="vector_entry_point", max_length=6, forbidden_tokens=[2]
    )
    assert type(envs) is TextGenVectorEnv
    assert envs.num_envs == 5
    assert envs.config.max_length == 6 and envs.config.forbidden_tokens == (2,)
    assert envs.observation_space.shape == (5, 6) and envs.single_observation_space.shape == (6,)
    assert envs.action_space.shape == (5,) and envs.single_action_space.n == 50
    obs, _ = envs.reset(seed=1)
    assert obs.shape == (5, 6) and (obs == 50).all()
    _, reward, *_ = envs.step(np.array([2, 3, 2, 3, 2]))
    assert reward.tolist() == [0.0, 1.0, 0.0, 1.0, 0.0]


def test_make_vec_sync_mode_uses_the_scalar_env():
    envs = gym.make_vec("TextGen-v0", num_envs=3, vectorization_mode="sync", max_length=3)
    assert isinstance(envs, gym.vector.SyncVectorEnv)
    assert all(isinstance(env.unwrapped, TextGenEnv) for env in envs.envs)
    obs, _ = envs.reset(seed=0)
    assert obs.shape == (3, 3)


@pytest.mark.parametrize("num_envs", [0, -1])
def test_make_vec_invalid_num_envs(num_envs):
    with pytest.raises(ValueError, match="num_envs"):
        gym.make_vec("TextGen-v0", num_envs=num_envs, vectorization_mode="vector_entry_point")
