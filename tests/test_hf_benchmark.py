"""Smoke test of ``benchmarks/hf_policy.py``: ``--quick`` prints both measurements and writes the CSV."""

from __future__ import annotations

import csv
import re

import pytest
from _scripts import REPO_ROOT, run_python

pytest.importorskip("transformers")

SCRIPT = REPO_ROOT / "benchmarks" / "hf_policy.py"
STEP = r"^rollout step, L= +{length}, V=2,000, 2 sequences: +([\d.]+) ms with the cache, +([\d.]+) ms re-reading"
KL = r"^exact KL, 256 states x 2,000 tokens \(\d+ MB of distributions\), {mode}: \+(-?\d+) MB peak"


def test_quick_benchmark_prints_the_figures_and_writes_the_csv(tmp_path):
    output = tmp_path / "hf_policy.csv"
    result = run_python(SCRIPT, "--quick", "--output", str(output))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    with open(output, newline="") as file:
        rows = list(csv.DictReader(file))
    runs = ["cache", "cache", "task", "kl_chunked", "kl_one_pass", "update", "update_one_pass_kl"]
    assert [row["run"] for row in rows] == runs
    for row, length in zip(rows, (8, 16)):
        match = re.search(STEP.format(length=length), out, flags=re.MULTILINE)
        assert match, out
        assert float(row["cached_ms_per_step"]) > 0 and float(row["full_prefix_ms_per_step"]) > 0
        assert float(row["max_logit_difference"]) < 1e-4  # the cache gives the same logits
    assert re.search(r"^rollout step on TextGen-Reverse-v0 .* \d+ restarts in 12 steps\): +[\d.]+ ms with", out, re.M)
    for row, mode in zip(rows[3:5], ("chunked ", "one pass")):
        match = re.search(KL.format(mode=mode), out, flags=re.MULTILINE)
        assert match and abs(float(match.group(1)) - float(row["extra_peak_mb"])) <= 1, out
    assert "same mean KL: True" in out
    updates = re.findall(r"^verified update, 16 states x 2,000 tokens .* KL ([\d.e-]+)$", out, flags=re.MULTILINE)
    assert len(updates) == 2 and updates[0] == updates[1]  # the same update, whichever way the KL is summed
