"""Quality figures of generated token sequences: pure functions over lists of token ids."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from verl_sb3._validation import require_int


def unique_ratio(sequence: Sequence[int]) -> float:
    """Distinct tokens / tokens (0.0 for an empty sequence)."""
    return len(set(sequence)) / len(sequence) if len(sequence) else 0.0


def longest_run(sequence: Sequence[int]) -> int:
    """Length of the longest run of identical consecutive tokens."""
    best = run = 0
    for index, token in enumerate(sequence):
        run = run + 1 if index and token == sequence[index - 1] else 1
        best = max(best, run)
    return best


def has_repetition(sequence: Sequence[int], window: int = 3) -> bool:
    """Whether ``window`` or more consecutive tokens are identical."""
    return longest_run(sequence) >= window


def violates(sequence: Sequence[int], forbidden_tokens: Iterable[int]) -> bool:
    """Whether the sequence holds a forbidden token."""
    return bool(set(sequence) & set(forbidden_tokens))


def distinct_n(sequences: Sequence[Sequence[int]], n: int = 2) -> float:
    """Distinct n-grams / n-grams over all sequences (distinct-n of Li et al., 2016); 0.0 without n-grams."""
    require_int("n", n, 1)
    ngrams = [tuple(seq[i : i + n]) for seq in sequences for i in range(len(seq) - n + 1)]
    return len(set(ngrams)) / len(ngrams) if ngrams else 0.0


def sequence_metrics(
    sequences: Sequence[Sequence[int]], forbidden_tokens: Iterable[int] = (), window: int = 3
) -> dict[str, float]:
    """Diversity, repetition rate, violation rate, distinct share and distinct-2 of ``sequences``.

    - ``diversity``: mean unique-token ratio per sequence;
    - ``repetition_rate``: share of sequences with ``window`` or more consecutive identical tokens;
    - ``violation_rate``: share of sequences holding a forbidden token;
    - ``distinct_sequences``: share of distinct sequences;
    - ``distinct_2``: distinct bigrams / bigrams.
    """
    if not len(sequences):
        raise ValueError("sequences: expected at least one sequence")
    forbidden = set(forbidden_tokens)
    sequences = [list(map(int, seq)) for seq in sequences]
    return {
        "diversity": float(np.mean([unique_ratio(seq) for seq in sequences])),
        "repetition_rate": float(np.mean([has_repetition(seq, window) for seq in sequences])),
        "violation_rate": float(np.mean([violates(seq, forbidden) for seq in sequences])),
        "distinct_sequences": len({tuple(seq) for seq in sequences}) / len(sequences),
        "distinct_2": distinct_n(sequences, 2),
    }
