"""The evaluation table: targets, formatting, relative bars and what counts as a violation."""

from __future__ import annotations

import json
import math

import pytest

from textenv_gym.dynamics import TextGenConfig
from textenv_gym.sb3_vec_env import make_textgen_vec_env
from verl_sb3 import VerifiedRecurrentPPO
from verl_sb3.app.targets import DEFAULT_RUN_TARGETS, TARGETS, Target, evaluation_table, markdown_table, save_evaluation
from verl_sb3.evaluation import evaluate_model
from verl_sb3.generation import generate

GOOD = dict(
    diversity=0.9,
    repetition_rate=0.0,
    violation_rate=0.0,
    verification_rate=1.0,
    mean_return=19.6,
    optimal_return=20.0,
    entropy=2.5,
    distinct_sequences=1.0,
    distinct_2=0.9,
)


def by_case(rows):
    return {row["test_case"]: row for row in rows}


def test_every_target_passes_and_fails_on_its_side_of_the_bar():
    assert all(row["passed"] for row in evaluation_table(GOOD))
    for changes, case in [
        (dict(diversity=0.7), "Diversity"),  # > 0.7: equal is not enough
        (dict(repetition_rate=0.05), "Repetition"),
        (dict(violation_rate=0.002), "Constraint violations"),
        (dict(verification_rate=0.95), "Verification success"),
        (dict(mean_return=19.49), "Return vs optimum"),
        (dict(repetition_rate=0.01), "Repetition (default run)"),
        (dict(entropy=1.99), "Per-token entropy"),
    ]:
        rows = by_case(evaluation_table({**GOOD, **changes}))
        assert not rows[case]["passed"], case
        assert sum(not row["passed"] for row in rows.values()) in (1, 2)  # repetition has two bars


def test_return_bar_follows_the_optimum():
    rows = by_case(evaluation_table(GOOD))
    assert rows["Return vs optimum"]["target"] == ">= 19.5"  # the default run's bar
    shorter = {**GOOD, "optimal_return": 10.0, "mean_return": 9.6}  # e.g. max_length 10, or a prompt
    row = by_case(evaluation_table(shorter))["Return vs optimum"]
    assert row["passed"] and row["target"] == ">= 9.5"
    assert not by_case(evaluation_table({**shorter, "mean_return": 9.4}))["Return vs optimum"]["passed"]
    with pytest.raises(ValueError, match="optimal_return"):
        Target("x", "mean_return", ">=", -0.5, relative_to="optimal_return").passed(1.0, {})


def test_nan_is_a_failure_shown_as_not_available():
    rows = by_case(evaluation_table({**GOOD, "verification_rate": math.nan}))  # an unverified model
    assert not rows["Verification success"]["passed"]
    assert rows["Verification success"]["actual"] == "n/a"
    assert "| verification_rate | n/a |" in markdown_table(list(rows.values()), {"verification_rate": math.nan})


def test_markdown_table_and_saved_files(tmp_path):
    figures = {**GOOD, "n_sequences": 200}
    rows = evaluation_table(figures)
    table = markdown_table(rows, figures)
    lines = table.splitlines()
    assert lines[0] == "| Test case | Metric | Target | Actual | Result |"
    assert len([line for line in lines if line.endswith("| pass |")]) == len(TARGETS + DEFAULT_RUN_TARGETS)
    assert "| Repetition | repetition_rate | < 5.0% | 0.0% | pass |" in lines
    assert "| n_sequences | 200 |" in lines
    markdown, data = save_evaluation(tmp_path / "out", figures, rows)
    assert markdown.read_text() == table + "\n"
    saved = json.loads(data.read_text())
    assert saved["all_passed"] is True and saved["figures"] == figures


def test_a_forbidden_prompt_token_is_not_a_violation_of_the_model():
    config = TextGenConfig(vocab_size=8, max_length=6, forbidden_tokens=[0])
    model = VerifiedRecurrentPPO(
        "SLMLstmPolicy",
        make_textgen_vec_env(2, seed=0, **config.as_kwargs()),
        n_steps=8,
        batch_size=16,
        seed=0,
        policy_kwargs=dict(lstm_hidden_size=8, n_lstm_layers=1, embedding_dim=4),
    )
    model.env_kwargs = config.as_kwargs()
    figures = evaluate_model(model, n_sequences=40, seed=0, prompt=[0, 1])
    generated = generate(model, [0, 1], num_sequences=40, seed=0).generated
    expected = sum(0 in row for row in generated) / 40  # the prompt's forbidden 0 is not counted
    assert figures["violation_rate"] == pytest.approx(expected) and expected < 1.0
