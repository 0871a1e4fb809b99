"""Add your own reward component to TextGen-v0 (the RLHF hook), and train the verified SLM on it.

The environment's reward is a weighted sum of named components: the built-in ``diversity``,
``repetition`` and ``forbidden``, plus the user components given as ``reward_fns`` (name ->
``fn(tokens, lengths)``, called once per batched step), each weighted by ``reward_weights``
(default 1.0). ``info["reward_components"]`` holds each weighted contribution, so they sum to the
reward. This example adds a ``topic`` component: a bonus for each first use of a topic word
(nature words), computed either by a numpy function (:func:`topic_bonus`) or, with
``--reward-model``, by a tiny hand-initialised torch reward model wrapped in
``textenv_gym.TorchRewardModel`` (:class:`BagOfWordsRewardModel`, where a learned RLHF reward model
would plug in). It trains briefly and prints the mean reward components per episode before and
after training.

    python examples/custom_reward.py [--reward-model] [--topic-weight 1.0] [--total-timesteps 24000]
                                     [--seed 0] [--episodes 64]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch as th
from stable_baselines3.common.utils import set_random_seed
from stable_baselines3.common.vec_env import VecEnv

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from textenv_gym import DEFAULT_VOCABULARY, Tokenizer, TorchRewardModel
from textenv_gym.sb3_vec_env import make_textgen_vec_env
from verl_sb3 import VerifiedRecurrentPPO

VOCAB_SIZE = len(DEFAULT_VOCABULARY)
TOPIC_WORDS = ("river", "mountain", "forest", "ocean", "light", "sound", "world", "dream")
TOPIC_IDS = tuple(sorted(Tokenizer(DEFAULT_VOCABULARY).encode(" ".join(TOPIC_WORDS))))
TOPIC_BONUS = 0.25


def topic_bonus(tokens: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """``TOPIC_BONUS`` for each sequence whose newest token is a topic word used for the first time
    (so that the bonus never rewards repeating a word), else 0.

    :param tokens: int64 ``(N, max_length)``, the sequences just extended, padded with ``vocab_size``.
    :param lengths: int64 ``(N,)``, their lengths (the newest token is ``tokens[i, lengths[i] - 1]``).
    :return: ``N`` rewards.
    """
    rows = np.arange(len(lengths))
    newest = tokens[rows, lengths - 1]
    earlier = np.arange(tokens.shape[1]) < (lengths - 1)[:, None]
    first_use = ~np.any((tokens == newest[:, None]) & earlier, axis=1)
    return np.where(np.isin(newest, TOPIC_IDS) & first_use, TOPIC_BONUS, 0.0)


class BagOfWordsRewardModel(th.nn.Module):
    """A toy sequence reward model: ``score = linear(multi-hot of the tokens present)``.

    Its weights are set by hand (``bonus`` for the preferred tokens, 0 elsewhere) instead of being
    learned from preferences. As a per-step reward it returns ``score(sequence) - score(sequence
    without its newest token)``, so an episode's return from it is the score of the final sequence.
    With these weights the step reward is ``bonus`` at the first use of a preferred token, as
    :func:`topic_bonus`.

    :param vocab_size: number of tokens (the padding id is ``vocab_size``).
    :param preferred_ids: the token ids that earn ``bonus``.
    :param bonus: the weight of each preferred token.
    """

    def __init__(self, vocab_size: int, preferred_ids: tuple[int, ...], bonus: float) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.score = th.nn.Linear(vocab_size, 1, bias=False)
        with th.no_grad():
            self.score.weight.zero_()
            self.score.weight[0, list(preferred_ids)] = bonus

    def present(self, tokens: th.Tensor, lengths: th.Tensor) -> th.Tensor:
        """``(N, vocab_size)``: 1.0 where the token occurs in the first ``lengths[i]`` tokens of sequence ``i``."""
        inside = th.arange(tokens.shape[1], device=tokens.device) < lengths[:, None]
        one_hot = th.nn.functional.one_hot(tokens, self.vocab_size + 1)[..., : self.vocab_size]  # padding dropped
        return (one_hot * inside[..., None]).amax(dim=1).float()

    def forward(self, tokens: th.Tensor, lengths: th.Tensor) -> th.Tensor:
        return self.score(self.present(tokens, lengths)) - self.score(self.present(tokens, lengths - 1))


def reward_settings(reward_model: bool, topic_weight: float) -> dict[str, Any]:
    """The environment arguments adding the ``topic`` component (a numpy function or the torch model)."""
    topic = TorchRewardModel(BagOfWordsRewardModel(VOCAB_SIZE, TOPIC_IDS, TOPIC_BONUS)) if reward_model else topic_bonus
    return {"reward_fns": {"topic": topic}, "reward_weights": {"topic": topic_weight}}


def mean_components(
    model: VerifiedRecurrentPPO, env_kwargs: dict[str, Any], n_episodes: int, seed: int
) -> dict[str, float]:
    """Mean reward per episode, by component and in total, over ``n_episodes`` sampled episodes."""
    set_random_seed(seed)
    env: VecEnv = make_textgen_vec_env(min(n_episodes, 16), seed=seed, **env_kwargs)
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
    parser.add_argument(
        "--reward-model",
        action="store_true",
        help="compute the topic component with a torch reward model (TorchRewardModel)",
    )
    parser.add_argument("--topic-weight", type=float, default=1.0, help="reward_weights['topic'] (default 1.0)")
    args = parser.parse_args(argv)
    if args.total_timesteps < 1 or args.episodes < 1:
        parser.error("--total-timesteps and --episodes must be >= 1")
    th.set_num_threads(1)

    env_kwargs = reward_settings(args.reward_model, args.topic_weight)
    try:
        env = make_textgen_vec_env(8, seed=args.seed, **env_kwargs)
    except ValueError as error:  # e.g. a non-finite --topic-weight
        parser.error(str(error))
    model = VerifiedRecurrentPPO(
        "SLMLstmPolicy",
        env,
        n_steps=20,
        batch_size=80,
        n_epochs=4,
        learning_rate=1e-3,
        gamma=1.0,
        seed=args.seed,
        policy_kwargs=dict(lstm_hidden_size=64, n_lstm_layers=1, embedding_dim=32),
    )
    source = "torch reward model (TorchRewardModel)" if args.reward_model else "numpy function"
    print(
        f"Topic words (+{TOPIC_BONUS} x weight {args.topic_weight:g} each, first use; {source}): "
        f"{', '.join(TOPIC_WORDS)}"
    )
    before = mean_components(model, env_kwargs, args.episodes, seed=args.seed + 1)
    start = time.perf_counter()
    model.learn(args.total_timesteps)
    seconds = time.perf_counter() - start
    after = mean_components(model, env_kwargs, args.episodes, seed=args.seed + 1)

    print(
        f"Trained {model.num_timesteps} timesteps in {seconds:.1f} s; "
        f"verification rate {model.verification_rate:.1%} over {len(model.verification_log)} updates."
    )
    print(f"Mean reward per episode by component ({args.episodes} sampled episodes):")
    print(f"  {'component':<12}{'before':>10}{'after':>10}")
    for name in before:
        print(f"  {name:<12}{before[name]:>10.3f}{after[name]:>10.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
