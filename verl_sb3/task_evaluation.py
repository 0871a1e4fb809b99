"""Evaluation on a task's prompts: k answers sampled per prompt, each scored by the task's ``compute_score``.

An answer is *correct* when its score is 1.0 (veRL's rule-based scorers and the registered tasks
give 1.0 for an exact match). The figures: ``pass@1`` (the share of correct answers, the unbiased
estimate of pass@1), ``pass@k`` (the share of prompts with a correct answer among their ``k``),
``mean_score``, ``mean_answer_length`` (tokens, the end token left out), ``ended`` (the share of
answers that end with the end token), ``distinct_answers`` (distinct answers per prompt over
``k``), ``entropy`` (mean per-token policy entropy over the answers' tokens, nats).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch as th
from stable_baselines3.common.base_class import BaseAlgorithm

from textenv_gym.dynamics import SequenceBatch, TextGenConfig
from textenv_gym.prompts import PromptRecord, PromptSource
from verl_sb3._validation import require_int
from verl_sb3.generation import (
    PolicyStepper,
    check_generation_args,
    evaluation_mode,
    sample_tokens,
    sampling_generator,
    textgen_config,
)


@dataclass
class TaskAnswers:
    """``k`` answers to each prompt: ``answers[p][j]`` the text of answer ``j`` to prompt ``p``, its score."""

    prompts: list[PromptRecord]
    answers: list[list[str]]
    scores: np.ndarray  # (prompts, k)
    lengths: np.ndarray  # (prompts, k): answer tokens, the end token left out
    ended: np.ndarray  # (prompts, k): the answer ends with the end token
    entropy: float


def task_prompts(model: BaseAlgorithm, split: str = "test") -> list[PromptRecord]:
    """The prompts of ``split`` of the task ``model`` was trained on (``model.env_id`` and
    ``model.task_kwargs``, which the training job records), or of its own prompt source."""
    from textenv_gym.tasks import TASKS, task_kwargs

    env_id = getattr(model, "env_id", None)
    config = textgen_config(model)
    if env_id in TASKS:
        kwargs = task_kwargs(env_id, **{**(getattr(model, "task_kwargs", None) or {}), "split": split})
        source = PromptSource(kwargs["prompts"], config.encode_prompt, config.tokenizer.decode)
    elif config.prompt_source is not None and len(config.prompt_source):
        source = config.prompt_source
    else:
        raise ValueError("model: trained on no task with a prompt list; give the prompts to evaluate on")
    return list(source.records)


@th.no_grad()
def sample_answers(
    model: BaseAlgorithm,
    prompts: list[Any],
    k: int = 1,
    temperature: float = 1.0,
    seed: int | None = 0,
    deterministic: bool = False,
    score: bool = True,
) -> TaskAnswers:
    """``k`` answers to each of ``prompts`` (texts, id lists, records), each until the end token or
    ``max_length``, scored with the environment's ``compute_score`` (``score=False``: not scored,
    NaN, for prompts without a reference answer)."""
    check_generation_args(k, temperature, seed, name="k")
    config: TextGenConfig = textgen_config(model)
    if not score:
        config = dataclasses.replace(config, compute_score=None, prompts=None)
    elif config.compute_score is None:
        raise ValueError("model: its environment has no compute_score to score answers with")
    source = PromptSource(prompts, config.encode_prompt, config.tokenizer.decode)
    records = list(source.records)
    rows = len(records) * k
    sequences = SequenceBatch(config, rows)
    for row in range(rows):
        sequences.set_row_prompt(row, records[row // k])
    sequences.reset()
    scores, done = np.zeros(rows), np.zeros(rows, dtype=bool)
    stepper = PolicyStepper(model, rows)
    generator = sampling_generator(seed)
    entropy_sum, entropy_count = 0.0, 0
    with evaluation_mode(model):
        while not done.all():
            logits = stepper.logits(sequences.tokens).cpu().double()
            active = np.flatnonzero(~done)
            entropy = th.distributions.Categorical(logits=logits[active]).entropy()
            entropy_sum, entropy_count = entropy_sum + float(entropy.sum()), entropy_count + len(active)
            actions = sample_tokens(logits, temperature, deterministic, generator).numpy().astype(np.int64)
            outcome = sequences.append(actions[active], active)
            scores[active] = outcome.components["score"] if score else np.nan
            done[active] = outcome.terminated
    answers = [sequences.answer_ids(row) for row in range(rows)]
    last = sequences.tokens[np.arange(rows), sequences.lengths - 1]
    ended = (sequences.lengths > sequences.prompt_lengths) & (last == config.eos_id)
    texts = [config.tokenizer.decode(a) for a in answers]
    shape = (len(records), k)
    return TaskAnswers(
        records,
        [texts[p * k : (p + 1) * k] for p in range(len(records))],
        scores.reshape(shape),
        np.array([len(a) for a in answers]).reshape(shape),
        ended.reshape(shape),
        entropy_sum / max(entropy_count, 1),
    )


def evaluate_task(
    model: BaseAlgorithm,
    prompts: list[Any] | None = None,
    k: int = 8,
    temperature: float = 1.0,
    seed: int = 0,
    max_prompts: int | None = None,
) -> dict[str, float]:
    """The module's figures for ``k`` answers to each prompt (default: the task's test split).

    :param max_prompts: evaluate on the first ``max_prompts`` prompts only.
    """
    prompts = task_prompts(model) if prompts is None else prompts
    if max_prompts is not None:
        prompts = list(prompts)[: require_int("max_prompts", max_prompts, 1)]
    answers = sample_answers(model, prompts, k=k, temperature=temperature, seed=seed)
    correct = answers.scores >= 1.0
    return {
        "pass@1": float(correct.mean()),
        f"pass@{k}": float(correct.any(axis=1).mean()),
        "mean_score": float(answers.scores.mean()),
        "mean_answer_length": float(answers.lengths.mean()),
        "ended": float(answers.ended.mean()),
        "distinct_answers": float(np.mean([len(set(a)) / k for a in answers.answers])),
        "entropy": answers.entropy,
        "n_prompts": len(answers.prompts),
        "k": k,
        "verification_rate": float(getattr(model, "verification_rate", float("nan"))),
    }
