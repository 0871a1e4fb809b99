"""TextGen-v0's judge of the next rollout: the probability of reusing a token already in the sequence.

On TextGen-v0 a token already in the sequence lowers its diversity; an update that made the
policy reuse tokens more, on the sequences it now writes itself, is the failure the judge catches
(see :mod:`verl_sb3.verification.judgement`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch as th
from stable_baselines3.common.base_class import BaseAlgorithm

from verl_sb3._validation import require_number
from verl_sb3.tokens import require_token_sequences
from verl_sb3.verification.judgement import CollectedRollout, Measurement


def reuse_mass(logits: th.Tensor, tokens: th.Tensor, n_tokens: int) -> th.Tensor:
    """Per state, the probability the policy puts on tokens already in the state's sequence.

    ``logits``: (states, ``n_tokens``) action logits; ``tokens``: (states, length) token ids,
    padding ids ``>= n_tokens``. A uniform policy over 50 tokens has 0.17 on average over its
    own sequences of 20, one that never reuses a token 0. Each distinct token is counted once
    (found by sorting each sequence), from log-probabilities gathered at the sequence's tokens,
    so the memory is (states, length), not (states, vocabulary) nor (states, length, length).
    """
    tokens = tokens.long().sort(dim=1).values
    distinct = th.ones_like(tokens, dtype=th.bool)
    distinct[:, 1:] = tokens[:, 1:] != tokens[:, :-1]
    counted = distinct & (tokens < n_tokens)
    log_probs = logits.gather(1, tokens.clamp(max=n_tokens - 1)) - logits.logsumexp(dim=1, keepdim=True)
    return (log_probs.exp() * counted).sum(dim=1)


@dataclass(frozen=True)
class ReuseMassJudge:
    """Undo an update when the reuse mass of the next rollout rose by more than ``max_rise``
    standard errors of the difference (standard errors across environments).

    :param max_rise: the rise that undoes an update, in standard errors, >= 0 (``max_reuse_rise``).
    """

    max_rise: float
    name: str = "reuse"

    def __post_init__(self) -> None:
        object.__setattr__(self, "max_rise", require_number("max_reuse_rise", self.max_rise, 0.0))

    def validate(self, model: BaseAlgorithm) -> None:
        require_token_sequences("max_reuse_rise", model)
        if model.n_envs < 2:
            raise ValueError(
                f"max_reuse_rise: needs at least 2 environments (the standard error is taken across them), got "
                f"{model.n_envs}"
            )

    def measure(self, rollout: CollectedRollout) -> Measurement:
        """The mean reuse mass over the rollout, and its standard error across environments."""
        logits = rollout.logits
        n_envs, n_steps, n_tokens = logits.shape
        observations = th.as_tensor(rollout.observations, device=logits.device)  # (steps, envs, length)
        tokens = observations.transpose(0, 1).reshape(n_envs * n_steps, -1)
        with th.no_grad():
            per_env = (
                reuse_mass(logits.reshape(n_envs * n_steps, -1), tokens, n_tokens).reshape(n_envs, n_steps).mean(1)
            )
        return per_env.mean().item(), per_env.std().item() / math.sqrt(n_envs)

    def verdict(self, before: Measurement, after: Measurement) -> str | None:
        (mean_before, se_before), (mean_after, se_after) = before, after
        if not mean_after - mean_before > self.max_rise * math.hypot(se_before, se_after):
            return None
        return (
            f"reuse mass {mean_before:.4g} -> {mean_after:.4g} (standard errors {se_before:.2g}, {se_after:.2g}; "
            f"more than {self.max_rise:g} of the difference)"
        )
