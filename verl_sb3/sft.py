"""A supervised warm start: fit a policy to (prompt, answer) records by teacher forcing, before RL.

:func:`supervised_warm_start` trains any of the policies (the LSTM and transformer SLMs,
:class:`verl_sb3.hf.HFCausalLMPolicy`) to give each answer token, after the prompt and the
answer's earlier tokens, the highest probability: the mean negative log-likelihood of the answer
tokens (the end token included), veRL's SFT loss. Afterwards the model goes on with RL as it is:
a reference policy for KL control (``ref_kl_*``) is set to the warm-started policy, which is then
the policy RL starts from, as in RLHF.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch as th
from stable_baselines3.common.base_class import BaseAlgorithm
from tqdm.auto import tqdm

from textenv_gym.dynamics import TextGenConfig
from verl_sb3._validation import require_int, require_number
from verl_sb3.generation import textgen_config
from verl_sb3.rollout import distribution_validation, policy_kind


@dataclass
class TeacherForcing:
    """The answers' tokens as states and actions: ``observations[i]`` the padded sequence before
    ``actions[i]``; ``records[i]`` its record, ``steps[i]`` its position in the answer."""

    observations: np.ndarray
    actions: np.ndarray
    records: np.ndarray
    steps: np.ndarray
    answer_lengths: list[int] = field(default_factory=list)


@dataclass
class WarmStartResult:
    """The answer loss (mean negative log-likelihood per answer token, nats) before, after each epoch."""

    loss_before: float
    epoch_losses: list[float]
    n_records: int
    n_tokens: int

    @property
    def loss_after(self) -> float:
        return self.epoch_losses[-1] if self.epoch_losses else self.loss_before


def teacher_forcing(config: TextGenConfig, records: Sequence[Any]) -> TeacherForcing:
    """The states and actions of ``records``: dicts with ``prompt`` and ``answer`` (or veRL's
    ``ground_truth``), each a text (encoded by the environment's tokenizer) or token ids; the end
    token is appended to each answer when the environment has one."""
    if isinstance(records, (str, bytes)) or not isinstance(records, Sequence) or not records:
        raise ValueError("records: expected a non-empty list of {'prompt', 'answer'} dicts")
    observations, actions, rows, steps, lengths = [], [], [], [], []
    for index, record in enumerate(records):
        prompt, answer = _record_fields(record, index)
        try:
            prompt_ids = config.encode_prompt(prompt).tolist()
        except (TypeError, ValueError) as error:
            raise ValueError(f"records[{index}]: {error}") from None
        answer_ids = _answer_ids(config, answer, index)
        if config.eos_id is not None:
            answer_ids = [*answer_ids, config.eos_id]
        if len(prompt_ids) + len(answer_ids) > config.max_length:
            raise ValueError(
                f"records[{index}]: prompt and answer hold {len(prompt_ids) + len(answer_ids)} tokens (end token "
                f"included), more than max_length={config.max_length}"
            )
        sequence = prompt_ids + answer_ids
        for step, token in enumerate(answer_ids):
            observation = np.full(config.max_length, config.pad_id, dtype=np.int64)
            observation[: len(prompt_ids) + step] = sequence[: len(prompt_ids) + step]
            observations.append(observation)
            actions.append(token)
            rows.append(index)
            steps.append(step)
        lengths.append(len(answer_ids))
    return TeacherForcing(np.stack(observations), np.array(actions), np.array(rows), np.array(steps), lengths)


def _answer_ids(config: TextGenConfig, answer: Any, index: int) -> list[int]:
    """An answer's token ids: a text encoded by the environment's tokenizer, or ids (integers in range)."""
    if isinstance(answer, str):
        try:
            return config.tokenizer.encode(answer)
        except ValueError as error:
            raise ValueError(f"records[{index}]: {error}") from None
    ids = list(answer) if isinstance(answer, (Sequence, np.ndarray)) else None
    if ids is None or not all(isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in ids):
        raise ValueError(f"records[{index}]: the answer must be a text or a list of token ids, got {answer!r}")
    if not ids or any(not 0 <= t < config.vocab_size for t in ids):
        raise ValueError(
            f"records[{index}]: the answer must be tokens in [0, {config.vocab_size - 1}], at least one, got {answer!r}"
        )
    return [int(t) for t in ids]


def _record_fields(record: Any, index: int) -> tuple[Any, Any]:
    if not isinstance(record, dict) or "prompt" not in record or not ("answer" in record or "ground_truth" in record):
        raise ValueError(
            f"records[{index}]: expected a dict with 'prompt' and 'answer' (or 'ground_truth'), got {record!r}"
        )
    return record["prompt"], record.get("answer", record.get("ground_truth"))


def answer_loss(model: BaseAlgorithm, data: TeacherForcing, records: np.ndarray | None = None) -> th.Tensor:
    """Mean negative log-likelihood of the answer tokens of ``records`` (default: all), with gradients."""
    policy, device = model.policy, model.device
    chosen = np.arange(len(data.answer_lengths)) if records is None else records
    if policy_kind(policy).recurrent:
        return _recurrent_loss(model, data, chosen)
    rows = np.flatnonzero(np.isin(data.records, chosen))
    observations = th.as_tensor(data.observations[rows], device=device)
    actions = th.as_tensor(data.actions[rows], device=device)
    return -policy.get_distribution(observations).log_prob(actions).mean()


def _recurrent_loss(model: BaseAlgorithm, data: TeacherForcing, chosen: np.ndarray) -> th.Tensor:
    """The loss of a recurrent policy: each record's answer as one sequence from a fresh state,
    padded to the longest with its last state (left out of the mean)."""
    policy = model.policy
    width = max(data.answer_lengths[r] for r in chosen)
    index = np.zeros((len(chosen), width), dtype=np.int64)
    real = np.zeros((len(chosen), width), dtype=bool)
    starts = np.flatnonzero(data.steps == 0)
    for row, record in enumerate(chosen):
        n = data.answer_lengths[record]
        index[row] = starts[record] + np.minimum(np.arange(width), n - 1)
        real[row, :n] = True
    flat = index.reshape(-1)
    observations = th.as_tensor(data.observations[flat], device=model.device)
    actions = th.as_tensor(data.actions[flat], device=model.device)
    episode_starts = th.as_tensor((np.arange(width) == 0)[None].repeat(len(chosen), 0).reshape(-1), device=model.device)
    lstm = policy.lstm_actor
    shape = (lstm.num_layers, len(chosen), lstm.hidden_size)
    states = (th.zeros(shape, device=model.device), th.zeros(shape, device=model.device))
    distribution, _ = policy.get_distribution(observations, states, episode_starts.float())
    log_prob = distribution.log_prob(actions)
    return -log_prob[th.as_tensor(real.reshape(-1), device=model.device)].mean()


def supervised_warm_start(
    model: BaseAlgorithm,
    records: Sequence[Any],
    epochs: int = 3,
    batch_size: int = 32,
    learning_rate: float = 1e-3,
    seed: int = 0,
    progress: bool = False,
) -> WarmStartResult:
    """Fit ``model``'s policy to ``records`` (see :func:`teacher_forcing`) by teacher forcing.

    Adam over the policy's trainable parameters (the policy's own optimizer is left as it was),
    ``epochs`` passes over the records in shuffled minibatches of ``batch_size`` records. Then the
    reference policy of KL control, if any, becomes the warm-started policy (also in place of a
    ``reference=`` given to the model: RL is then held near the warm start, as in RLHF). The losses are
    computed in evaluation mode (no dropout). A warm start whose loss ends non-finite or higher
    than it started is undone (the policy restored exactly) and raises a ValueError.

    :return: the answer loss over all records before and after each epoch.
    """
    epochs = require_int("epochs", epochs, 1)
    batch_size = require_int("batch_size", batch_size, 1)
    learning_rate = require_number("learning_rate", learning_rate, 0.0, math.inf, open_low=True, open_high=True)
    data = teacher_forcing(textgen_config(model), records)
    policy = model.policy
    initial = copy.deepcopy(policy.state_dict())  # what a diverging warm start returns to
    optimizer = th.optim.Adam([p for p in policy.parameters() if p.requires_grad], lr=learning_rate)
    rng = np.random.default_rng(seed)
    was_training = policy.training
    policy.set_training_mode(False)
    try:
        with distribution_validation(False):  # a non-finite loss is caught below, not by torch
            with th.no_grad():
                before = float(answer_loss(model, data))
            losses = []
            for _ in tqdm(range(epochs), desc="warm start", disable=not progress, mininterval=5.0):
                order = rng.permutation(len(data.answer_lengths))
                for start in range(0, len(order), batch_size):
                    loss = answer_loss(model, data, order[start : start + batch_size])
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
                with th.no_grad():
                    losses.append(float(answer_loss(model, data)))
    finally:
        policy.set_training_mode(was_training)
    if not all(math.isfinite(loss) for loss in losses) or losses[-1] > before:
        policy.load_state_dict(initial)
        raise ValueError(
            f"learning_rate: the warm start diverged (answer loss {before:.4g} -> {losses}); the policy is restored "
            "as it was: lower learning_rate"
        )
    _hand_over(model)
    return WarmStartResult(before, losses, len(data.answer_lengths), len(data.actions))


def _hand_over(model: BaseAlgorithm) -> None:
    """The warm-started policy as RL's start: the reference of KL control and the last verified state."""
    reference = getattr(model, "ref_policy", None)
    if reference is not None:
        reference.load_state_dict(model.policy.state_dict())
    if hasattr(model, "_last_verified"):
        model._last_verified = None
