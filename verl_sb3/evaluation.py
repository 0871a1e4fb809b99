"""Evaluation of a trained model: sequences sampled from it and their figures (the targets they are
held to are the application's, :mod:`verl_sb3.app.targets`)."""

from __future__ import annotations

import math

from stable_baselines3.common.base_class import BaseAlgorithm

from verl_sb3.generation import generate, optimal_return, textgen_config
from verl_sb3.metrics import sequence_metrics


def evaluate_model(
    model: BaseAlgorithm,
    n_sequences: int = 200,
    seed: int = 0,
    prompt: str | list[int] | None = None,
    temperature: float = 1.0,
) -> dict[str, float]:
    """Sample ``n_sequences`` from ``model`` and measure them.

    Returns diversity, repetition_rate, violation_rate, distinct_sequences, distinct_2 (see
    :func:`verl_sb3.metrics.sequence_metrics`; over the whole sequences, prompt included, except
    violation_rate, over the generated tokens), mean_return, optimal_return, entropy (mean
    per-token policy entropy, nats) and verification_rate (of training; NaN for an unverified model).
    """
    config = textgen_config(model)
    generation = generate(model, prompt, num_sequences=n_sequences, temperature=temperature, seed=seed)
    figures = sequence_metrics(generation.tokens, config.forbidden_tokens, config.repetition_window)
    # The model answers only for what it generated: a forbidden token in the prompt is no violation.
    figures["violation_rate"] = sequence_metrics(generation.generated, config.forbidden_tokens)["violation_rate"]
    figures.update(
        mean_return=float(generation.returns.mean()),
        optimal_return=optimal_return(config, prompt),
        entropy=generation.entropy,
        verification_rate=float(getattr(model, "verification_rate", math.nan)),
        n_sequences=n_sequences,
    )
    return figures
