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
from typing import Any

import torch as th

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


#: :func:`categorical_kl` takes the rows in chunks of at most this many (row, action) terms, so that
#: its temporaries stay at 16 MB each (float32) whatever the vocabulary: 83 rows at 50,257 tokens.
KL_CHUNK_ELEMENTS = 1 << 22


def categorical_kl(log_p: th.Tensor, ref_log_p: th.Tensor, chunk_elements: int | None = None) -> th.Tensor:
    """KL(p || p_ref) per row of normalised log-probabilities; ``0 * log(0 / q) = 0``.

    The rows are taken ``chunk_elements // n_actions`` at a time (at least one; default
    :data:`KL_CHUNK_ELEMENTS`): the same sums, row by row, as one pass over the whole
    ``(rows, n_actions)`` tensors, without their temporaries at full size.
    """
    return in_row_chunks(_categorical_kl, log_p, ref_log_p, chunk_elements=chunk_elements)


def categorical_entropy(log_p: th.Tensor, chunk_elements: int | None = None) -> th.Tensor:
    """Entropy per row of normalised log-probabilities (a torch ``Categorical``'s ``logits``), as its
    ``entropy()`` computes it (the same operations, row by row), in chunks of rows as :func:`categorical_kl`."""
    return in_row_chunks(_categorical_entropy, log_p, chunk_elements=chunk_elements)


def non_finite_probabilities(logits: th.Tensor, chunk_elements: int | None = None) -> int:
    """How many probabilities ``softmax(logits)`` would make NaN or infinite, without making them."""
    sums = in_row_chunks(lambda x: th.softmax(x, dim=-1).sum(dim=-1), logits, chunk_elements=chunk_elements)
    if bool(th.isfinite(sums).all()):
        return 0
    counts = in_row_chunks(lambda x: (~th.isfinite(th.softmax(x, dim=-1))).sum(dim=-1), logits,
                           chunk_elements=chunk_elements)  # fmt: skip
    return int(counts.sum())


def in_row_chunks(reduce: Any, *tensors: th.Tensor, chunk_elements: int | None = None) -> th.Tensor:
    """``reduce(*tensors)`` (one value per row) computed over chunks of at most ``chunk_elements``
    (default :data:`KL_CHUNK_ELEMENTS`) terms: the same rows, the same operations, smaller temporaries."""
    first = tensors[0]
    width = max(int(first.shape[-1]), 1)
    step = max(1, int(KL_CHUNK_ELEMENTS if chunk_elements is None else chunk_elements) // width)
    if first.dim() != 2 or any(t.shape != first.shape for t in tensors) or first.shape[0] <= step:
        return reduce(*tensors)
    return th.cat([reduce(*(t[i : i + step] for t in tensors)) for i in range(0, first.shape[0], step)])


def _categorical_entropy(log_p: th.Tensor) -> th.Tensor:
    # torch.distributions.Categorical's: its probabilities are the softmax of its (normalised)
    # logits, whose -inf (a zero probability) is clamped to the smallest float: 0 * log 0 gives 0
    return -(log_p.clamp(min=th.finfo(log_p.dtype).min) * th.softmax(log_p, dim=-1)).sum(dim=-1)


def _categorical_kl(log_p: th.Tensor, ref_log_p: th.Tensor) -> th.Tensor:
    terms = log_p.exp() * (log_p - ref_log_p)
    kl = terms.sum(dim=-1)
    if bool(th.isfinite(kl.sum())):  # no zero probability: no (rows, actions) mask to build
        return kl
    # a zero probability (log-probability -inf) gives 0 * inf = NaN in its term
    return th.where(log_p == -math.inf, 0.0, terms).sum(dim=-1)


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
