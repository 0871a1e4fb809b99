"""Smoke test of ``benchmarks/rllib.py``: ``--quick`` runs RLlib with 1 and 2 env runners and SB3, prints the table."""

from __future__ import annotations

import json
import re

import pytest
from _scripts import REPO_ROOT, run_python

pytest.importorskip("ray.rllib")

SCRIPT = REPO_ROOT / "benchmarks" / "rllib.py"


def test_quick_benchmark_prints_the_table_and_writes_json_and_plot(tmp_path):
    output = tmp_path / "rllib.json"
    result = run_python(SCRIPT, "--quick", "--output", str(output))
    assert result.returncode == 0, result.stderr
    for run in ("rllib-1", "rllib-2", "sb3"):
        assert re.search(rf"^{run} +[\d,]+ +[\d.]+ +[\d.]+% +\d+$", result.stdout, flags=re.MULTILINE), result.stdout
    assert re.search(r"2 env runners / 1: [\d.]+x env steps per second", result.stdout)
    results = json.loads(output.read_text())["results"]
    assert [r["run"] for r in results] == ["rllib-1", "rllib-2", "sb3"]
    for r in results:
        steps = [p["timesteps"] for p in r["points"]]
        assert steps == sorted(steps) and steps[0] == 0 and steps[-1] >= 800 and r["steps_per_s"] > 0
    assert output.with_suffix(".png").stat().st_size > 10_000
