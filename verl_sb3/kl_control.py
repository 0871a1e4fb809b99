"""KL to a reference policy: the per-token estimators and the coefficient controllers.

The names and formulas are those of veRL and TRL (``core_algos.kl_penalty``,
``FixedKLController``, ``AdaptiveKLController``), for KL(policy || reference) estimated on
actions sampled from the policy:

- ``k1``: ``log p(a) - log p_ref(a)``, unbiased, high variance, can be negative;
- ``k2``: ``(log p(a) - log p_ref(a))**2 / 2``, biased, never negative;
- ``k3``: ``r - log r - 1`` with ``r = p_ref(a) / p(a)``, unbiased, never negative, low variance
  (Schulman, "Approximating KL divergence", 2020);
- ``exact``: ``sum_a p(a) (log p(a) - log p_ref(a))`` over the whole action distribution.

How the penalty enters training lives in :mod:`verl_sb3.reference`.
"""

from __future__ import annotations

import math

import torch as th

from verl_sb3.categorical import categorical_kl

KL_ESTIMATORS = ("k1", "k2", "k3", "exact")


def kl_estimate(log_prob: th.Tensor, ref_log_prob: th.Tensor, estimator: str) -> th.Tensor:
    """Per-sample estimate of KL(policy || reference) from the sampled actions' log-probabilities.

    :param log_prob: log p(a) under the policy, for actions a sampled from it.
    :param ref_log_prob: log p_ref(a) under the reference, same shape.
    :param estimator: ``"k1"``, ``"k2"`` or ``"k3"`` (``"exact"`` needs the distributions: :func:`exact_kl`).
    """
    log_ratio = log_prob - ref_log_prob  # log p / p_ref
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio.square()
    if estimator == "k3":
        # r - log r - 1 with log r = -log_ratio; expm1 keeps precision when r is near 1.
        return th.expm1(-log_ratio) + log_ratio
    raise ValueError(f"estimator: expected one of {KL_ESTIMATORS[:3]} (use exact_kl for 'exact'), got {estimator!r}")


def exact_kl(logits: th.Tensor, ref_logits: th.Tensor) -> th.Tensor:
    """Exact KL(policy || reference) per row of categorical logits (any normalisation)."""
    return categorical_kl(th.log_softmax(logits, dim=-1), th.log_softmax(ref_logits, dim=-1))


class FixedKLController:
    """A constant KL coefficient ``value``."""

    def __init__(self, kl_coef: float) -> None:
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Nothing to adapt."""

    def __repr__(self) -> str:
        return f"FixedKLController(kl_coef={self.value!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FixedKLController) and vars(self) == vars(other)


class AdaptiveKLController:
    """Ziegler et al. (2019)'s proportional controller of the KL coefficient toward ``target_kl``.

    ``update(current_kl, n_steps)``: ``error = clip(current_kl / target_kl - 1, -0.2, 0.2)``,
    ``value *= 1 + error * n_steps / horizon``.
    """

    def __init__(self, init_kl_coef: float, target_kl: float, horizon: int) -> None:
        self.value = float(init_kl_coef)
        self.target = float(target_kl)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Move the coefficient after ``n_steps`` samples whose mean KL was ``current_kl``."""
        if not math.isfinite(current_kl):
            return  # a broken rollout says nothing about the KL; verification rejects it
        proportional_error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon

    def __repr__(self) -> str:
        return f"AdaptiveKLController(value={self.value!r}, target_kl={self.target!r}, horizon={self.horizon!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, AdaptiveKLController) and vars(self) == vars(other)
