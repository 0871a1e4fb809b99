"""TextGen-Reverse-v0: write the prompt's symbols in reverse order, then the end token.

A prompt is ``length`` symbols followed by ``=``, e.g. ``c a f =``; the answer ``f a c <end>``.
The vocabulary is the first ``n_symbols`` letters, ``=`` and ``<end>``. Every sequence of
``length`` symbols is a prompt; a seeded hash puts each in the train or the test split.
"""

from __future__ import annotations

import itertools
import string
from typing import Any

from textenv_gym.tasks.splits import require_positive_int, require_prompts, require_seed, require_split, split_of

DATA_SOURCE = "textgen/reverse"
SEPARATOR, END = "=", "<end>"
#: Prompts are enumerated only up to this many sequences of symbols.
MAX_PROMPTS = 200_000


def compute_score(data_source: str | None, solution_str: str, ground_truth: str, extra_info: Any = None) -> float:
    """1.0 for the reversed symbols exactly; else half the share of positions right (of the longer
    of the answer and the reference): a wrong answer scores less than 0.5."""
    answer, reference = solution_str.split(), ground_truth.split()
    if answer == reference:
        return 1.0
    right = sum(a == b for a, b in zip(answer, reference))
    return 0.5 * right / max(len(answer), len(reference), 1)


def reverse_task(split: str = "train", length: int = 3, n_symbols: int = 8, seed: int = 0) -> dict[str, Any]:
    """The TextGenEnv arguments of the task (vocabulary, prompts with their answers, scoring)."""
    require_split(split)
    seed = require_seed(seed)
    length = require_positive_int("length", length, 1, 32)
    n_symbols = require_positive_int("n_symbols", n_symbols, 2, 26)
    if n_symbols**length > MAX_PROMPTS:
        raise ValueError(f"length, n_symbols: {n_symbols}**{length} prompts, more than {MAX_PROMPTS:,}")
    symbols = list(string.ascii_lowercase[:n_symbols])
    prompts = []
    for sequence in itertools.product(symbols, repeat=length):
        text = " ".join(sequence)
        if split_of(text, seed) == split:
            prompts.append({"prompt": f"{text} {SEPARATOR}", "ground_truth": " ".join(reversed(sequence)),
                            "data_source": DATA_SOURCE})  # fmt: skip
    return {
        "vocabulary": [*symbols, SEPARATOR, END],
        "max_length": 2 * length + 2,
        "eos_token": END,
        "prompts": require_prompts(prompts, split, f"length={length}, n_symbols={n_symbols}, seed={seed}"),
        "compute_score": compute_score,
        "reward_weights": {"diversity": 0.0, "repetition": 0.0},
    }
