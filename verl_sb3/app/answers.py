"""``verl-sb3 generate`` for a task's model: answers to prompts of its test split (or to the prompt given)."""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np

from verl_sb3.task_evaluation import sample_answers, task_prompts


def print_answers(model: Any, args: argparse.Namespace, prompt: Any) -> int:
    """Print ``args.num_sequences`` answers: to ``prompt``, or each to a prompt drawn from the test split."""
    if args.length is not None:
        raise ValueError("--length: a task's answers end with the end token (or at max_length)")
    if prompt is None:
        records = task_prompts(model, "test")
        rng = np.random.default_rng(args.seed)
        prompts = [records[i] for i in rng.choice(len(records), size=args.num_sequences, replace=True)]
        answers = sample_answers(model, prompts, k=1, temperature=args.temperature, seed=args.seed,
                                 deterministic=args.deterministic)  # fmt: skip
        rows = [(answers.prompts[i], answers.answers[i][0], answers.scores[i, 0]) for i in range(len(prompts))]
    else:
        answers = sample_answers(model, [prompt], k=args.num_sequences, temperature=args.temperature,
                                 seed=args.seed, deterministic=args.deterministic, score=False)  # fmt: skip
        rows = [(answers.prompts[0], text, None) for text in answers.answers[0]]
    for index, (record, answer, score) in enumerate(rows, 1):
        print(f"--- Answer {index} of {len(rows)} ---")
        print(f"Prompt: {record.text}")
        print(f"Answer: {answer}")
        if score is not None:
            verdict = "correct" if score >= 1.0 else "wrong"
            print(f"Reference: {record.ground_truth}  score {score:.3f} ({verdict})")
        print()
    return 0
