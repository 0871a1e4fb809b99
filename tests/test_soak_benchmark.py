"""Smoke test of ``benchmarks/soak.py``: ``--quick`` prints its memory table, the log's cost and the bound check."""

from __future__ import annotations

import importlib.util
import re

from _scripts import REPO_ROOT, run_python

SCRIPT = REPO_ROOT / "benchmarks" / "soak.py"
ROW = re.compile(
    r"^\s*(?P<steps>[\d,]+)\s+(?P<updates>[\d,]+)\s+(?P<wall>[\d.]+)\s+(?P<rate>[\d,]+)\s+(?P<rss>[\d.]+)\s+"
    r"(?P<peak>[\d.]+)\s+(?P<entries>[\d,]+)\s+(?P<kb>[\d.]+)\s+(?P<per_entry>[\d.]+|nan)\s+(?P<accepted>[\d.]+)%$",
    re.MULTILINE,
)


def rows(out: str) -> list[dict[str, float]]:
    return [{k: float(v.replace(",", "")) for k, v in m.groupdict().items()} for m in ROW.finditer(out)]


def load_soak():
    spec = importlib.util.spec_from_file_location("soak", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_soak_reports_memory_and_an_unbounded_log(capsys):
    assert load_soak().main(["--quick", "--steps", "1600", "--interval", "480"]) == 0
    out = capsys.readouterr().out
    table = rows(out)
    assert [row["steps"] for row in table] == [480, 960, 1440, 1600]  # every interval, and the end
    for row in table:
        assert row["entries"] == row["updates"] == row["steps"] / 160  # one entry per update: unbounded
        assert row["rss"] > 0 and row["peak"] >= row["rss"] * 0.99 and row["kb"] > 0
    assert "the log is unbounded (max_log_entries=None)" in out
    entry = re.search(r"one log entry \((\d+) checks\): ([\d,]+) bytes pickled, ([\d,]+) bytes in memory", out)
    assert entry and int(entry[1]) >= 8 and 200 < int(entry[2].replace(",", "")) < 10_000
    assert ": BOUNDED" in out


def test_quick_soak_with_a_bounded_log_from_the_command_line():
    result = run_python(SCRIPT, "--quick", "--max-log-entries", "4", "--bound", "3")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    table = rows(out)
    assert len(table) == 10 and table[-1]["steps"] == 4800
    summary = re.search(r"^updates: (\d+); .* undone on the next rollout: (\d+);", out, re.MULTILINE)
    assert summary and int(summary[1]) == table[-1]["updates"]
    assert int(summary[1]) + int(summary[2]) == 30  # 30 rollouts: one update each, or undone and collected again
    assert [row["entries"] for row in table] == [3, 4, 4, 4, 4, 4, 4, 4, 4, 4]
    assert "the log is bounded: at most 4 entries" in out
    assert re.search(r"max_log_entries=3 check: 9 updates .*: BOUNDED$", out, re.MULTILINE)
