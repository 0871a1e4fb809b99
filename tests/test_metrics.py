"""The quality figures of verl_sb3.metrics on hand-made sequences, with hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from verl_sb3.metrics import distinct_n, has_repetition, longest_run, sequence_metrics, unique_ratio, violates


@pytest.mark.parametrize(
    "sequence, expected",
    [([1, 2, 2, 3], 3 / 4), ([5, 5, 5, 5], 1 / 4), ([0, 1, 2, 3, 4], 1.0), ([7], 1.0), ([], 0.0)],
)
def test_unique_ratio(sequence, expected):
    assert unique_ratio(sequence) == pytest.approx(expected)


@pytest.mark.parametrize(
    "sequence, expected",
    [([1, 1, 2, 2, 2, 3], 3), ([1, 2, 1, 2], 1), ([4, 4], 2), ([9], 1), ([], 0), ([3, 1, 1, 1, 1], 4)],
)
def test_longest_run(sequence, expected):
    assert longest_run(sequence) == expected


def test_repetition_with_window_3():
    assert has_repetition([1, 1, 2, 2, 2], window=3)  # 2, 2, 2
    assert has_repetition([5, 5, 5])
    assert not has_repetition([1, 1, 2, 2, 1, 1], window=3)  # runs of two only
    assert not has_repetition([1, 2, 1, 2, 1, 2])  # the same tokens, never consecutive
    assert has_repetition([1, 1, 2, 2, 1, 1], window=2)
    assert not has_repetition([1, 1, 1], window=4)
    assert not has_repetition([])


def test_violations():
    assert violates([1, 2, 3], [3])
    assert violates([3], {3, 4})
    assert not violates([1, 2], [3])
    assert not violates([1, 2, 3], [])
    assert not violates([], [1])


def test_distinct_2_counts_bigrams_over_all_sequences():
    # bigrams (1,2) (2,3) (1,2) (2,4): three distinct out of four
    assert distinct_n([[1, 2, 3], [1, 2, 4]], 2) == pytest.approx(3 / 4)
    # (5,5) twice: one distinct of two
    assert distinct_n([[5, 5, 5]], 2) == pytest.approx(1 / 2)
    assert distinct_n([[1], [2]], 2) == 0.0  # no bigram at all
    assert distinct_n([[1, 1, 2]], 1) == pytest.approx(2 / 3)
    assert distinct_n([[1, 2, 3, 1, 2, 3]], 3) == pytest.approx(3 / 4)  # (1,2,3) (2,3,1) (3,1,2) (1,2,3)
    with pytest.raises(ValueError, match="n: expected an integer >= 1"):
        distinct_n([[1, 2]], 0)


SEQUENCES = [
    [1, 2, 3, 4],  # all distinct
    [5, 5, 5, 6],  # a run of three, and the forbidden token 6
    [1, 2, 3, 4],  # a duplicate of the first
    [7, 8, 7, 8],  # two distinct tokens, no run
]


def test_sequence_metrics_by_hand():
    figures = sequence_metrics(SEQUENCES, forbidden_tokens=[6], window=3)
    assert figures["diversity"] == pytest.approx((1 + 2 / 4 + 1 + 2 / 4) / 4)  # 0.75
    assert figures["repetition_rate"] == pytest.approx(1 / 4)
    assert figures["violation_rate"] == pytest.approx(1 / 4)
    assert figures["distinct_sequences"] == pytest.approx(3 / 4)
    # 12 bigrams; distinct: (1,2) (2,3) (3,4) (5,5) (5,6) (7,8) (8,7)
    assert figures["distinct_2"] == pytest.approx(7 / 12)
    assert set(figures) == {"diversity", "repetition_rate", "violation_rate", "distinct_sequences", "distinct_2"}


def test_sequence_metrics_window_and_forbidden_change_the_figures():
    assert sequence_metrics(SEQUENCES, forbidden_tokens=[], window=4)["repetition_rate"] == 0.0
    assert sequence_metrics(SEQUENCES, forbidden_tokens=[], window=4)["violation_rate"] == 0.0
    assert sequence_metrics(SEQUENCES, forbidden_tokens=[1, 7], window=2)["violation_rate"] == pytest.approx(3 / 4)
    assert sequence_metrics(SEQUENCES, forbidden_tokens=[], window=2)["repetition_rate"] == pytest.approx(1 / 4)


def test_sequence_metrics_accepts_numpy_rows():
    as_array = sequence_metrics(np.array(SEQUENCES, dtype=np.int64), forbidden_tokens=np.array([6]))
    assert as_array == pytest.approx(sequence_metrics(SEQUENCES, forbidden_tokens=[6]))


def test_sequence_metrics_of_no_sequence_is_an_error():
    with pytest.raises(ValueError, match="at least one sequence"):
        sequence_metrics([])
