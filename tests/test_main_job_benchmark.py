"""Smoke test of ``benchmarks/main_job.py``: two short jobs side by side, this checkout against a revision."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
from _scripts import REPO_ROOT, run_python

SCRIPT = REPO_ROOT / "benchmarks" / "main_job.py"


def worktrees() -> str:
    return subprocess.run(["git", "worktree", "list"], cwd=REPO_ROOT, capture_output=True, text=True).stdout


@pytest.mark.skipif(
    shutil.which("git") is None or not (REPO_ROOT / ".git").exists(), reason="needs the git checkout of the project"
)
def test_two_short_jobs_side_by_side_give_a_ratio(tmp_path):
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    before = worktrees()
    result = run_python(
        SCRIPT, "--baseline", head.stdout.strip(), "--total-timesteps", "2560", "--output-dir", str(tmp_path)
    )
    assert result.returncode == 0, result.stdout + result.stderr
    data = json.loads((tmp_path / "main_job.json").read_text())
    for name in ("current", "baseline"):
        assert data[name]["exit_code"] in (0, 1) and data[name]["timesteps"] >= 2560 and data[name]["seconds"] > 0
    assert data["ratio"] == pytest.approx(data["current"]["seconds"] / data["baseline"]["seconds"])
    assert "wall time of the main command, this checkout /" in result.stdout
    assert worktrees() == before  # the baseline's worktree is removed again
