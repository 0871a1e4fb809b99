"""Smoke test of ``benchmarks/large_vocab.py``: ``--quick`` prints every figure and writes the CSV."""

from __future__ import annotations

import csv
import re

from _scripts import REPO_ROOT, run_python

SCRIPT = REPO_ROOT / "benchmarks" / "large_vocab.py"
NAMES = {
    "env": "TextGenVecEnv, random actions",
    "lstm": "VerifiedRecurrentPPO + SLMLstmPolicy",
    "transformer": "VerifiedPPO + SLMTransformerPolicy",
}
ROW = r"^{name}\s+{size}\s+(\d+)\s+([\d,]+)\s+([\d.]+)\s+(-?[\d.]+)$"
RATIO = r"^  ratio 5000x128 / 50x20: steps/s ([\d.]+)x, peak RSS ([\d.]+)x, \+MB (-?[\d.]+|nan|inf)x$"


def test_quick_benchmark_prints_the_table_and_writes_the_csv(tmp_path):
    output = tmp_path / "large_vocab.csv"
    result = run_python(SCRIPT, "--quick", "--output", str(output))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert re.search(r"load average [\d.]+ at start", out), out
    with open(output, newline="") as file:
        rows = list(csv.DictReader(file))
    assert [(row["run"], row["vocab_size"], row["max_length"]) for row in rows] == [
        (run, v, n) for run in NAMES for v, n in (("50", "20"), ("5000", "128"))
    ]
    for row in rows:
        name, size = NAMES[row["run"]], f"{row['vocab_size']}x{row['max_length']}"
        match = re.search(ROW.format(name=re.escape(name), size=size), out, flags=re.MULTILINE)
        assert match, (name, size, out)
        envs, rate, peak, increase = match.groups()
        assert int(envs) == int(row["num_envs"]) == (64 if row["run"] == "env" else 16)
        assert float(rate.replace(",", "")) > 0 and abs(float(rate.replace(",", "")) - float(row["steps_per_s"])) <= 1
        assert float(peak) >= float(row["rss_after_imports_mb"]) > 0
        assert (
            abs(float(peak) - float(row["peak_rss_mb"])) <= 0.1
            and abs(float(increase) - float(row["rss_increase_mb"])) <= 0.1
        )
        if row["run"] != "env":
            updates, total = row["updates_accepted"].split("/")
            assert int(total) == 2 and 0 <= int(updates) <= 2  # warm-up + 1 timed update, all verified
    ratios = re.findall(RATIO, out, flags=re.MULTILINE)
    assert len(ratios) == 3, out
    for (steps, peak, _), large in zip(ratios, rows[1::2]):
        assert abs(float(steps) - float(large["ratio_steps_per_s"])) <= 0.001
        assert abs(float(peak) - float(large["ratio_peak_rss"])) <= 0.01
    # the env does no O(vocabulary) work per step: its throughput hardly depends on the size
    assert float(rows[1]["ratio_steps_per_s"]) > 0.3, out


def test_benchmark_rejects_bad_flags():
    result = run_python(SCRIPT, "--sizes", "5000")
    assert result.returncode == 2 and "VOCABxLENGTH" in result.stderr
    result = run_python(SCRIPT, "--seconds", "0")
    assert result.returncode == 2 and "--seconds" in result.stderr
