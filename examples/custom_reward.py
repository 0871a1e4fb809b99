"""Extend TextGen-v0's reward with your own component, and train the verified SLM on it.

The environment's reward is the sum of the components of ``textenv_gym.dynamics.reward_components``
(``diversity``, ``repetition``, ``forbidden``); ``info["reward_components"]`` holds them by name.
The extension point is a Gymnasium wrapper around ``TextGenEnv``: :class:`CustomRewardWrapper` calls
:func:`custom_reward_function` after every step, adds what it returns to the reward and to
``info["reward_components"]``, so the reward stays the sum of its components. This example adds a
``topic`` bonus for each new word of a topic list (nature words), trains briefly and prints the mean
reward components per episode before and after training.

    python examples/custom_reward.py [--total-timesteps 24000] [--seed 0] [--episodes 64]

Write your own ``custom_reward_function(base_reward, sequence, info)``: ``sequence`` is the token ids
so far (the new token last), ``info`` the environment's step info; return the new reward and a dict
of the extra components (name -> value).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch as th
from stable_baselines3.common.monitor import Monitor
from stable_baselines3.common.utils import set_random_seed
from stable_baselines3.common.vec_env import DummyVecEnv

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from textenv_gym import DEFAULT_VOCABULARY, TextGenEnv, Tokenizer  # noqa: E402
from verl_sb3 import VerifiedRecurrentPPO  # noqa: E402

TOPIC_WORDS = ("river", "mountain", "forest", "ocean", "light", "sound", "world", "dream")
TOPIC_IDS = frozenset(Tokenizer(DEFAULT_VOCABULARY).encode(" ".join(TOPIC_WORDS)))
TOPIC_BONUS = 0.25

RewardFunction = Callable[[float, list[int], dict[str, Any]], tuple[float, dict[str, float]]]


def custom_reward_function(base_reward: float, sequence: list[int], info: dict[str, Any]) -> tuple[float, dict[str, float]]:
    """The base reward plus extra components: a ``topic`` bonus when the new token is a topic word
    that was not in the sequence before (a first use, so the bonus never rewards repeating a word).

    :param base_reward: the environment's reward of the step (the sum of ``info["reward_components"]``).
    :param sequence: the token ids of the whole sequence, the token just appended last.
    :param info: the environment's step info.
    :return: the new reward and the extra components by name.
    """
    token = sequence[-1]
    first_use = token not in sequence[:-1]
    extra = {"topic": TOPIC_BONUS if token in TOPIC_IDS and first_use else 0.0}
    return base_reward + sum(extra.values()), extra


class CustomRewardWrapper(gym.Wrapper):
    """Adds the extra components of ``reward_function`` to a TextGen-v0 environment's reward and to
    ``info["reward_components"]``.

    :param env: a ``TextGenEnv`` (possibly wrapped).
    :param reward_function: ``f(base_reward, sequence, info) -> (reward, extra_components)``.
    """

    def __init__(self, env: gym.Env, reward_function: RewardFunction = custom_reward_function) -> None:
        super().__init__(env)
        self.reward_function = reward_function

    def step(self, action):
        observation, reward, terminated, truncated, info = self.env.step(action)
        reward, extra = self.reward_function(float(reward), self.env.unwrapped.sequence, info)
        clash = set(extra) & set(info["reward_components"])
        if clash:
            raise ValueError(f"reward_function: extra components {sorted(clash)} already exist in the environment's reward")
        info["reward_components"] = {**info["reward_components"], **extra}
        return observation, reward, terminated, truncated, info


def make_env(n_envs: int, **env_kwargs: Any) -> DummyVecEnv:
    """``n_envs`` wrapped TextGen-v0 environments in SB3's ``DummyVecEnv`` (with episode statistics)."""
    return DummyVecEnv([lambda: Monitor(CustomRewardWrapper(TextGenEnv(**env_kwargs)))] * n_envs)


def mean_components(model: VerifiedRecurrentPPO, n_episodes: int, seed: int) -> dict[str, float]:
    """Mean reward per episode, by component and in total, over ``n_episodes`` sampled episodes."""
    set_random_seed(seed)
    env = make_env(min(n_episodes, 16))
    observations = env.reset()
    states, starts = None, np.ones(env.num_envs, dtype=bool)
    running = [dict(total=0.0) for _ in range(env.num_envs)]
    finished: list[dict[str, float]] = []
    while len(finished) < n_episodes:
        actions, states = model.predict(observations, state=states, episode_start=starts, deterministic=False)
        observations, rewards, dones, infos = env.step(actions)
        for index, (reward, info) in enumerate(zip(rewards, infos)):
            episode = running[index]
            episode["total"] += float(reward)
            for name, value in info["reward_components"].items():
                episode[name] = episode.get(name, 0.0) + value
            if dones[index]:
                if not np.isclose(episode["total"], sum(v for k, v in episode.items() if k != "total"), atol=1e-4):
                    raise AssertionError(f"the reward is not the sum of its components: {episode}")
                finished.append(episode)
                running[index] = dict(total=0.0)
        starts = dones
    env.close()
    names = [name for name in finished[0] if name != "total"] + ["total"]
    return {name: float(np.mean([episode[name] for episode in finished[:n_episodes]])) for name in names}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--total-timesteps", type=int, default=24_000, help="training steps (default 24000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--episodes", type=int, default=64, help="episodes sampled to measure the components")
    args = parser.parse_args(argv)
    if args.total_timesteps < 1 or args.episodes < 1:
        parser.error("--total-timesteps and --episodes must be >= 1")
    th.set_num_threads(1)

    env = make_env(8)
    model = VerifiedRecurrentPPO(
        "SLMLstmPolicy", env, n_steps=20, batch_size=80, n_epochs=4, learning_rate=1e-3, gamma=1.0, seed=args.seed,
        policy_kwargs=dict(lstm_hidden_size=64, n_lstm_layers=1, embedding_dim=32),
    )
    print(f"Topic words (+{TOPIC_BONUS} each, first use): {', '.join(TOPIC_WORDS)}")
    before = mean_components(model, args.episodes, seed=args.seed + 1)
    start = time.perf_counter()
    model.learn(args.total_timesteps)
    seconds = time.perf_counter() - start
    after = mean_components(model, args.episodes, seed=args.seed + 1)

    print(f"Trained {model.num_timesteps} timesteps in {seconds:.1f} s; "
          f"verification rate {model.verification_rate:.1%} over {len(model.verification_log)} updates.")
    print(f"Mean reward per episode by component ({args.episodes} sampled episodes):")
    print(f"  {'component':<12}{'before':>10}{'after':>10}")
    for name in before:
        print(f"  {name:<12}{before[name]:>10.3f}{after[name]:>10.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
