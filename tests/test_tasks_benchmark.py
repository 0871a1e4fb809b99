"""Smoke test of ``benchmarks/tasks.py``: it runs with ``--quick`` and writes its table, JSON and plot."""

from __future__ import annotations

import json
import re

from _scripts import REPO_ROOT, run_python

SCRIPT = REPO_ROOT / "benchmarks" / "tasks.py"


def test_quick_benchmark_writes_the_table_json_and_plot(tmp_path):
    output = tmp_path / "tasks.json"
    result = run_python(
        SCRIPT,
        *("--quick", "--threads", "1", "--tasks", "TextGen-Reverse-v0", "--output", str(output)),
        *("--runs", "verified", "unverified", "grpo", "warm_start", "--group-size", "4"),
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert re.search(r"^warm start: \d+ records \(\d+ answer tokens\), answer loss [\d.]+ -> [\d.]+", out, re.M), out
    for run in ("verified", "unverified", "grpo", "warm_start"):
        row = re.search(rf"^TextGen-Reverse-v0 +{run} +(.*)$", out, flags=re.MULTILINE)
        assert row, out
        assert len(re.findall(r"not reached|[\d,]+ \(\d+ s\)", row.group(1))) == 3, row.group(0)
    assert "seconds to 90 %, verified / unverified:" in out
    results = json.loads(output.read_text())["results"]
    assert [r["run"] for r in results] == ["verified", "unverified", "grpo", "warm_start"]
    for r in results:
        steps = [p["timesteps"] for p in r["points"]]
        assert steps == sorted(steps) and steps[0] == 0 and steps[-1] >= 1024
        assert all(0.0 <= p["pass@1"] <= 1.0 for p in r["points"])
        assert r["final"] == r["points"][-1]
    assert output.with_suffix(".png").stat().st_size > 10_000
