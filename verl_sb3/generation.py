"""Sampling sequences from a trained policy on TextGen-v0, with a temperature and a seed."""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch as th
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.policies import BasePolicy

from textenv_gym.dynamics import SequenceBatch, TextGenConfig
from textenv_gym.sb3_vec_env import environment_config
from verl_sb3._validation import is_integer, require_int
from verl_sb3.rollout import policy_kind


@dataclass
class Generation:
    """Sequences sampled from a policy, with the environment's figures of each.

    ``tokens[i]`` is the whole sequence ``i`` (the prompt, then ``generated[i]``); ``returns[i]``
    the sum of the environment's rewards over the generated tokens; ``entropy`` the policy's mean
    per-token entropy (nats, at temperature 1) over the generated tokens.
    """

    prompt: list[int]
    tokens: list[list[int]]
    generated: list[list[int]]
    texts: list[str]
    returns: np.ndarray
    entropy: float


def textgen_config(model: BaseAlgorithm, **overrides: Any) -> TextGenConfig:
    """The environment settings recorded with ``model`` (``model.env_kwargs``, which the training job
    records; else those of the TextGen environment it has), with ``overrides``."""
    kwargs = dict(getattr(model, "env_kwargs", None) or _environment_kwargs(model))
    kwargs.update(overrides)
    config = TextGenConfig(**kwargs)
    expected = (config.max_length,)
    if model.observation_space.shape != expected or getattr(model.action_space, "n", None) != config.vocab_size:
        raise ValueError(
            f"env_kwargs: the model observes {model.observation_space.shape} and acts on "
            f"{model.action_space}, which does not fit vocab_size={config.vocab_size}, max_length={config.max_length}"
        )
    return config


def _environment_kwargs(model: BaseAlgorithm) -> dict[str, Any]:
    """The arguments of the TextGen environment ``model`` has (none without one)."""
    config = environment_config(model.get_env())
    return config.as_kwargs() if isinstance(config, TextGenConfig) else {}


def start_sequences(
    config: TextGenConfig, num_sequences: int, prompt: str | list[int] | None
) -> tuple[SequenceBatch, list[int], int]:
    """``num_sequences`` sequences reset to ``prompt``, the prompt's ids, and the room left after it."""
    sequences = SequenceBatch(config, num_sequences)
    sequences.set_prompt(prompt)
    sequences.reset()
    prompt_ids = sequences.tokens[0, : sequences.lengths[0]].tolist()
    return sequences, prompt_ids, config.max_length - len(prompt_ids)


def check_generation_args(num_sequences: int, temperature: float, seed: int | None, name="num_sequences") -> None:
    require_int(name, num_sequences, 1)
    finite = not isinstance(temperature, (bool, np.bool_)) and isinstance(
        temperature, (int, float, np.integer, np.floating)
    )
    if not finite or not np.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature: expected a finite number > 0, got {temperature!r}")
    if seed is not None:
        require_int("seed", seed, 0)


class PolicyStepper:
    """Steps a recurrent or feed-forward SB3 policy (``model``'s, or ``policy``) one token at a time over a batch."""

    def __init__(self, model: BaseAlgorithm, num_sequences: int, policy: BasePolicy | None = None) -> None:
        self.policy = model.policy if policy is None else policy
        self.recurrent = policy_kind(self.policy).recurrent
        if self.recurrent:
            lstm = self.policy.lstm_actor
            shape = (lstm.num_layers, num_sequences, lstm.hidden_size)
            self.states = (th.zeros(shape, device=self.policy.device), th.zeros(shape, device=self.policy.device))
        self.episode_starts = th.ones(num_sequences, device=self.policy.device)

    def logits(self, observations: np.ndarray) -> th.Tensor:
        obs = th.as_tensor(observations, device=self.policy.device)
        if self.recurrent:
            distribution, self.states = self.policy.get_distribution(obs, self.states, self.episode_starts)
        else:
            distribution = self.policy.get_distribution(obs)
        self.episode_starts = th.zeros_like(self.episode_starts)
        return distribution.distribution.logits


def sampling_generator(seed: int | None) -> th.Generator:
    """A CPU generator for sampling, seeded from ``seed``; None draws fresh OS entropy (an unseeded
    call must not reseed torch's global generator)."""
    generator = th.Generator(device="cpu")
    generator.manual_seed(int(np.random.SeedSequence(None if seed is None else int(seed)).generate_state(1)[0]))
    return generator


@contextlib.contextmanager
def evaluation_mode(model: BaseAlgorithm) -> Iterator[None]:
    """The policy in eval mode for the block (a loaded or just-trained policy is in training mode:
    dropout), then back in the mode it was in."""
    was_training = model.policy.training
    model.policy.set_training_mode(False)
    try:
        yield
    finally:
        model.policy.set_training_mode(was_training)


def sample_tokens(logits: th.Tensor, temperature: float, deterministic: bool, generator: th.Generator) -> th.Tensor:
    """One token per row of ``logits``: the most likely, or sampled at ``temperature``."""
    if deterministic:
        return logits.argmax(dim=1)
    # Shift by the maximum first: the scaled logits are then <= 0, so a tiny temperature gives a
    # one-hot distribution instead of inf / inf = NaN probabilities.
    scaled = (logits - logits.max(dim=1, keepdim=True).values) / float(temperature)
    return th.multinomial(th.softmax(scaled, dim=1), 1, generator=generator).squeeze(1)


@th.no_grad()
def generate(
    model: BaseAlgorithm,
    prompt: str | list[int] | None = None,
    num_sequences: int = 1,
    length: int | None = None,
    temperature: float = 1.0,
    seed: int | None = None,
    deterministic: bool = False,
) -> Generation:
    """Sample ``num_sequences`` continuations of ``prompt`` from ``model``'s policy.

    :param model: a model trained on TextGen-v0 (its ``env_kwargs`` give the environment settings).
    :param prompt: text (words of the vocabulary), token ids, or None for an empty start. The
        policy conditions on the whole prompt.
    :param num_sequences: how many sequences to sample.
    :param length: how many tokens to generate (default: up to the environment's ``max_length``).
    :param temperature: logits are divided by it before sampling, > 0.
    :param seed: seed of the sampler, for reproducible generations.
    :param deterministic: take the most likely token instead of sampling.
    """
    check_generation_args(num_sequences, temperature, seed)
    config = textgen_config(model)
    if prompt is not None and config.compute_score is not None:  # a prompt given here has no reference answer
        config = dataclasses.replace(config, compute_score=None, prompts=None)
    sequences, prompt_ids, room = start_sequences(config, num_sequences, prompt)
    length = room if length is None else length
    if not is_integer(length) or not 1 <= length <= room:
        raise ValueError(
            f"length: expected an integer in [1, {room}] (max_length {config.max_length} minus the prompt's "
            f"{len(prompt_ids)} tokens), got {length!r}"
        )
    generator = sampling_generator(seed)
    stepper = PolicyStepper(model, num_sequences)
    returns = np.zeros(num_sequences)
    entropies = []
    with evaluation_mode(model):
        for _ in range(length):
            logits = stepper.logits(sequences.tokens).cpu().double()
            entropies.append(th.distributions.Categorical(logits=logits).entropy().mean().item())
            actions = sample_tokens(logits, temperature, deterministic, generator)
            returns += sequences.append(actions.numpy().astype(np.int64)).reward
    tokens = [row[:n].tolist() for row, n in zip(sequences.tokens, sequences.lengths)]
    generated = [row[len(prompt_ids) :] for row in tokens]
    texts = [config.tokenizer.decode(row) for row in generated]
    return Generation(prompt_ids, tokens, generated, texts, returns, float(np.mean(entropies)))


def optimal_return(config: TextGenConfig, prompt: str | list[int] | None = None, length: int | None = None) -> float:
    """The best return reachable from ``prompt`` in ``length`` steps (default: until the sequence is full).

    Exact, for any penalties (including positive ones and vocabularies that are mostly forbidden):
    the reward depends on a sequence only through its length, its distinct allowed and forbidden
    token counts, the class (allowed / forbidden) of its last token and its trailing run length,
    so a dynamic programme over those states, one step at a time, finds the maximum. Each step
    can append a new allowed token, a new forbidden token, the last token again, or another
    already used allowed or forbidden token. ``reward_weights`` are taken into account; with user
    components (``reward_fns``) the optimum is unknown and NaN is returned.
    """
    sequences, prompt_ids, room = start_sequences(config, 1, prompt)
    length = room if length is None else length
    length = require_int("length", length, 0, room)
    if config.reward_fns:
        return math.nan
    weights = config.reward_weights or {}
    diversity_weight = weights.get("diversity", 1.0)
    repetition_penalty = weights.get("repetition", 1.0) * config.repetition_penalty
    forbidden_penalty = weights.get("forbidden", 1.0) * config.forbidden_penalty
    forbidden = config.forbidden_mask
    n_allowed, n_forbidden = int((~forbidden).sum()), int(forbidden.sum())
    window = config.repetition_window
    used = set(prompt_ids)
    last_forbidden = bool(forbidden[prompt_ids[-1]]) if prompt_ids else False
    # state: (distinct allowed used, distinct forbidden used, last token forbidden, trailing run capped at window)
    start = (
        sum(1 for t in used if not forbidden[t]),
        sum(1 for t in used if forbidden[t]),
        last_forbidden,
        min(int(sequences.run_length[0]), window),
    )
    best = {start: 0.0}
    for size in range(len(prompt_ids) + 1, len(prompt_ids) + length + 1):  # size: tokens after this step
        following: dict[tuple[int, int, bool, int], float] = {}
        for (allowed_used, forbidden_used, last_is_forbidden, run), total in best.items():
            distinct = allowed_used + forbidden_used
            if allowed_used < n_allowed:  # a new allowed token
                _offer(
                    following,
                    (allowed_used + 1, forbidden_used, False, 1),
                    total + diversity_weight * (distinct + 1) / size,
                )
            if forbidden_used < n_forbidden:  # a new forbidden token
                _offer(
                    following,
                    (allowed_used, forbidden_used + 1, True, 1),
                    total + diversity_weight * (distinct + 1) / size + forbidden_penalty,
                )
            if run > 0:  # the last token again
                repeat = min(run + 1, window)
                reward = diversity_weight * distinct / size + (repetition_penalty if repeat >= window else 0.0)
                reward += forbidden_penalty if last_is_forbidden else 0.0
                _offer(following, (allowed_used, forbidden_used, last_is_forbidden, repeat), total + reward)
            if allowed_used - (run > 0 and not last_is_forbidden) > 0:  # another used allowed token
                _offer(following, (allowed_used, forbidden_used, False, 1), total + diversity_weight * distinct / size)
            if forbidden_used - (run > 0 and last_is_forbidden) > 0:  # another used forbidden token
                _offer(
                    following,
                    (allowed_used, forbidden_used, True, 1),
                    total + diversity_weight * distinct / size + forbidden_penalty,
                )
        best = following
    return float(max(best.values()))


def _offer(best: dict[tuple[int, int, bool, int], float], state: tuple[int, int, bool, int], value: float) -> None:
    """Keep ``value`` for ``state`` when it beats the best value found for it so far."""
    if value > best.get(state, -np.inf):
        best[state] = value
