"""Sums over the actions of categorical distributions, in chunks of states.

At a large vocabulary a ``(states, vocabulary)`` tensor is large (785 MB for 2,048 states of
50,257 tokens in float32), and every temporary of a sum over it is as large again. Each function
here takes the rows :data:`ROW_CHUNK_ELEMENTS` terms at a time (:func:`in_row_chunks`): the same
operations on the same rows, so the same values bit for bit, with temporaries of 16 MB.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch as th

#: The functions take the rows in chunks of at most this many (row, action) terms, so that their
#: temporaries stay at 16 MB each (float32) whatever the vocabulary: 83 rows at 50,257 tokens.
ROW_CHUNK_ELEMENTS = 1 << 22


def categorical_kl(log_p: th.Tensor, ref_log_p: th.Tensor, chunk_elements: int | None = None) -> th.Tensor:
    """KL(p || p_ref) per row of normalised log-probabilities; ``0 * log(0 / q) = 0``.

    The rows are taken ``chunk_elements // n_actions`` at a time (at least one; default
    :data:`ROW_CHUNK_ELEMENTS`): the same sums, row by row, as one pass over the whole
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


def in_row_chunks(
    reduce: Callable[..., th.Tensor], *tensors: th.Tensor, chunk_elements: int | None = None
) -> th.Tensor:
    """``reduce(*tensors)`` (one value per row) computed over chunks of at most ``chunk_elements``
    (default :data:`ROW_CHUNK_ELEMENTS`) terms: the same rows, the same operations, smaller temporaries."""
    first = tensors[0]
    width = max(int(first.shape[-1]), 1)
    step = max(1, int(ROW_CHUNK_ELEMENTS if chunk_elements is None else chunk_elements) // width)
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


def probability_mass(log_p: th.Tensor, tokens: list[int], chunk_elements: int | None = None) -> th.Tensor:
    """Per row, the probability ``softmax(log_p)`` gives ``tokens`` (as a ``Categorical``'s ``probs``)."""
    return in_row_chunks(lambda x: th.softmax(x, dim=-1)[:, tokens].sum(dim=-1), log_p, chunk_elements=chunk_elements)
