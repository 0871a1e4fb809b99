"""The training job's evaluation targets (on TextGen-v0, on a task), and the table that scores a model against them."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from verl_sb3.app.files import replace_text


@dataclass(frozen=True)
class Target:
    """A pass/fail bar: ``metric`` compared with ``value`` by ``op`` (">", ">=", "<", "<=", "==").

    With ``relative_to``, the bar is ``figures[relative_to] + value`` (e.g. the optimum minus a margin),
    so that it follows the environment's settings and the prompt.
    """

    test_case: str
    metric: str
    op: str
    value: float
    relative_to: str | None = None

    def threshold(self, figures: dict[str, float] | None = None) -> float:
        """The bar against ``figures`` (needed only with ``relative_to``)."""
        if self.relative_to is None:
            return self.value
        if figures is None or self.relative_to not in figures:
            raise ValueError(f"target {self.test_case!r}: needs the figure {self.relative_to!r}")
        return figures[self.relative_to] + self.value

    def passed(self, actual: float, figures: dict[str, float] | None = None) -> bool:
        value = self.threshold(figures)
        if math.isnan(actual) or math.isnan(value):
            return False
        return {
            ">": actual > value,
            ">=": actual >= value,
            "<": actual < value,
            "<=": actual <= value,
            "==": actual == value,
        }[self.op]


#: The uniform random policy's mean return on TextGen-v0 at its defaults (vocabulary 50, length 20).
RANDOM_POLICY_RETURN = 18.24
#: Its share of sequences with three identical tokens in a row there (exact: 0.705 %).
RANDOM_POLICY_REPETITION = 0.00705
#: The floor every trained model must clear.
TARGETS = (
    Target("Diversity", "diversity", ">", 0.7),
    Target("Repetition", "repetition_rate", "<", 0.05),
    Target("Constraint violations", "violation_rate", "==", 0.0),
    Target("Verification success", "verification_rate", ">", 0.95),
)
#: The bar of the default training run.
DEFAULT_RUN_TARGETS = (
    Target("Return vs optimum", "mean_return", ">=", -0.5, relative_to="optimal_return"),  # 19.5 with defaults
    Target("Repetition (default run)", "repetition_rate", "<", 0.01),
    Target("Per-token entropy", "entropy", ">=", 2.0),
)
#: The bar of a run on a registered task, on its test split.
TASK_TARGETS = (
    Target("Exact match (pass@1)", "pass@1", ">=", 0.95),
    Target("Answers end with the end token", "ended", ">=", 0.99),
)
PERCENT = {"repetition_rate", "violation_rate", "verification_rate", "distinct_sequences", "pass@1", "pass@k", "ended"}


def _format(metric: str, value: float) -> str:
    if value != value:  # NaN, e.g. the verification rate of an unverified model
        return "n/a"
    return f"{value:.1%}" if metric in PERCENT else f"{value:.3f}".rstrip("0").rstrip(".")


def evaluation_table(figures: dict[str, float], targets=TARGETS + DEFAULT_RUN_TARGETS) -> list[dict[str, Any]]:
    """One row per target: Test case, Metric, Target, Actual, Result."""
    rows = []
    for target in targets:
        actual = figures[target.metric]
        rows.append(
            {
                "test_case": target.test_case,
                "metric": target.metric,
                "target": f"{target.op} {_format(target.metric, target.threshold(figures))}",
                "actual": _format(target.metric, actual),
                "value": actual,
                "passed": target.passed(actual, figures),
            }
        )
    return rows


def markdown_table(rows: list[dict[str, Any]], figures: dict[str, float] | None = None) -> str:
    """The table in Markdown, followed by the other figures when given."""
    lines = ["| Test case | Metric | Target | Actual | Result |", "|---|---|---|---|---|"]
    lines += [
        f"| {r['test_case']} | {r['metric']} | {r['target']} | {r['actual']} | {'pass' if r['passed'] else 'FAIL'} |"
        for r in rows
    ]
    if figures:
        lines += ["", "| Figure | Value |", "|---|---|"]
        lines += [f"| {name} | {_format(name, value)} |" for name, value in figures.items()]
    return "\n".join(lines)


def save_evaluation(folder: str | Path, figures: dict[str, float], rows: list[dict[str, Any]]) -> tuple[Path, Path]:
    """Write ``evaluation.md`` and ``evaluation.json`` into ``folder``; return their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    markdown, data = folder / "evaluation.md", folder / "evaluation.json"
    replace_text(markdown, markdown_table(rows, figures) + "\n")
    replace_text(
        data,
        json.dumps({"figures": figures, "targets": rows, "all_passed": all(r["passed"] for r in rows)}, indent=2)
        + "\n",
    )
    return markdown, data
