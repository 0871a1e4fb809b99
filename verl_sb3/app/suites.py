"""What the training job measures on its environment: TextGen-v0's sequence figures, or a task's answers.

An :class:`EvaluationSuite` evaluates a model (periodically with ``eval_sequences``, at the end
with ``final_eval_sequences``), names the figure the best model is kept for, the targets the
final evaluation is held to and the line a progress report shows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from verl_sb3.app.targets import DEFAULT_RUN_TARGETS, TARGETS, TASK_TARGETS, Target


@dataclass(frozen=True)
class EvaluationSuite:
    evaluate: Callable[..., dict[str, float]]  # (model, samples, seed, temperature=1.0) -> figures
    best: str  # the figure the best model maximises
    targets: tuple[Target, ...]
    progress: Callable[[dict[str, float]], str]
    logged: tuple[str, ...]  # the figures recorded in SB3's logger (eval/...)


def _textgen(model: Any, samples: int, seed: int, temperature: float = 1.0) -> dict[str, float]:
    from verl_sb3.evaluation import evaluate_model

    return evaluate_model(model, n_sequences=samples, seed=seed, temperature=temperature)


def _task(model: Any, samples: int, seed: int, temperature: float = 1.0) -> dict[str, float]:
    from verl_sb3.task_evaluation import evaluate_task

    figures = evaluate_task(model, k=samples, seed=seed, temperature=temperature)
    figures["pass@k"] = figures.pop(f"pass@{samples}")
    return figures


TEXTGEN_SUITE = EvaluationSuite(
    _textgen,
    "mean_return",
    TARGETS + DEFAULT_RUN_TARGETS,
    lambda f: f"return {f['mean_return']:.3f}, repetition {f['repetition_rate']:.1%}, entropy {f['entropy']:.2f}",
    ("mean_return", "repetition_rate", "entropy", "diversity"),
)
TASK_SUITE = EvaluationSuite(
    _task,
    "pass@1",
    TASK_TARGETS,
    lambda f: f"test pass@1 {f['pass@1']:.1%}, pass@{f['k']} {f['pass@k']:.1%}, score {f['mean_score']:.3f}",
    ("pass@1", "pass@k", "mean_score", "mean_answer_length", "ended", "entropy"),
)


def suite_for(model: Any) -> EvaluationSuite:
    """The suite of the environment ``model`` was trained on (a task's when its ``env_id`` is one)."""
    from textenv_gym.tasks import TASKS

    return TASK_SUITE if getattr(model, "env_id", None) in TASKS else TEXTGEN_SUITE
