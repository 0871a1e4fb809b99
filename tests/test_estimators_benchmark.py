"""Smoke test of ``benchmarks/estimators.py`` (``--quick``) and its entropy-return fit."""

from __future__ import annotations

import importlib.util
import json
import math
import re
import sys

import numpy as np
import pytest
from _scripts import REPO_ROOT, run_python

SCRIPT = REPO_ROOT / "benchmarks" / "estimators.py"
NUMBER = r"-?\d[\d,]*(?:\.\d+)?(?:e[+-]?\d+)?"
REACH = rf"(?:not reached|{NUMBER}s/{NUMBER})"


def load_benchmark():
    spec = importlib.util.spec_from_file_location("estimators_benchmark", SCRIPT)
    if spec.name not in sys.modules:
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    return sys.modules[spec.name]


def test_the_fit_recovers_a_and_b_of_r_equals_minus_a_exp_h_plus_b():
    benchmark = load_benchmark()
    entropy = np.linspace(1.0, 3.5, 8)
    evaluations = [{"entropy": h, "mean_return": -0.05 * math.exp(h) + 20.1} for h in entropy]
    a, b = benchmark.entropy_fit(evaluations)
    assert a == pytest.approx(0.05) and b == pytest.approx(20.1)
    assert all(math.isnan(x) for x in benchmark.entropy_fit(evaluations[:1]))


def test_quick_run_prints_the_table_and_writes_the_outputs(tmp_path):
    result = run_python(SCRIPT, "--quick", "--estimators", "gae,grpo", "--output-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    for run in ("gae", "grpo"):
        row = re.search(rf"^{run}\s+{NUMBER}\s+{NUMBER}\*?\s+({REACH}\s+){{3}}.*$", result.stdout, re.MULTILINE)
        assert row, result.stdout
        cells = row.group(0).split()
        assert cells[-4] in ("yes", "no", "n/a") and math.isfinite(float(cells[-1]))
    data = json.loads((tmp_path / "estimators.json").read_text())
    assert [run["key"] for run in data["runs"]] == ["gae", "grpo"] and set(data["fits"]) == {"gae", "grpo"}
    for run in data["runs"]:
        steps = [e["timesteps"] for e in run["evaluations"]]
        assert steps == sorted(steps) and steps[-1] >= 3_000 and run["rolled_back_updates"] is not None
    assert (tmp_path / "estimators.png").stat().st_size > 10_000


def test_bad_arguments_are_refused():
    result = run_python(SCRIPT, "--estimators", "ppo")
    assert result.returncode == 2 and "--estimators: expected a comma-separated subset" in result.stderr
