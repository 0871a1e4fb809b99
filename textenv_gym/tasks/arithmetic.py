"""TextGen-Arithmetic-v0: write the sum of small numbers in digits, then the end token.

A prompt is ``n_terms`` numbers from 0 to ``max_value`` written digit by digit and joined by
``+``, followed by ``=``: ``1 2 + 7 =``; the answer is ``1 9 <end>``. The vocabulary is the ten
digits, ``+``, ``=`` and ``<end>``. Every such sum is a prompt; a seeded hash puts each in the
train or the test split.
"""

from __future__ import annotations

import itertools
from typing import Any

from textenv_gym.tasks.splits import require_positive_int, require_prompts, require_seed, require_split, split_of

DATA_SOURCE = "textgen/arithmetic"
PLUS, SEPARATOR, END = "+", "=", "<end>"
DIGITS = [str(d) for d in range(10)]
MAX_PROMPTS = 200_000


def digits(number: int) -> str:
    return " ".join(str(number))


def compute_score(data_source: str | None, solution_str: str, ground_truth: str, extra_info: Any = None) -> float:
    """1.0 for the exact sum; else, for a number, half of how close it is (0.5 at a distance of 0,
    0 at 10 or more: never reached, since the exact sum scores 1.0); 0.0 for anything else."""
    answer, reference = solution_str.split(), ground_truth.split()
    if answer == reference:
        return 1.0
    if not answer or not all(token in DIGITS for token in answer):
        return 0.0
    distance = abs(int("".join(answer)) - int("".join(reference)))
    return 0.5 * max(0.0, 1.0 - distance / 10)


def arithmetic_task(split: str = "train", n_terms: int = 2, max_value: int = 9, seed: int = 0) -> dict[str, Any]:
    """The TextGenEnv arguments of the task (vocabulary, prompts with their answers, scoring)."""
    require_split(split)
    seed = require_seed(seed)
    n_terms = require_positive_int("n_terms", n_terms, 1, 8)
    max_value = require_positive_int("max_value", max_value, 1, 999)
    if (max_value + 1) ** n_terms > MAX_PROMPTS:
        raise ValueError(f"n_terms, max_value: {(max_value + 1) ** n_terms:,} prompts, more than {MAX_PROMPTS:,}")
    prompts = []
    for terms in itertools.product(range(max_value + 1), repeat=n_terms):
        text = f" {PLUS} ".join(digits(term) for term in terms)
        if split_of(text, seed) == split:
            prompts.append({"prompt": f"{text} {SEPARATOR}", "ground_truth": digits(sum(terms)),
                            "data_source": DATA_SOURCE})  # fmt: skip
    prompt_tokens = n_terms * len(str(max_value)) + n_terms  # the numbers, the pluses and "="
    return {
        "vocabulary": [*DIGITS, PLUS, SEPARATOR, END],
        "max_length": prompt_tokens + len(str(n_terms * max_value)) + 1,
        "eos_token": END,
        "prompts": require_prompts(prompts, split, f"n_terms={n_terms}, max_value={max_value}, seed={seed}"),
        "compute_score": compute_score,
        "reward_weights": {"diversity": 0.0, "repetition": 0.0},
    }
