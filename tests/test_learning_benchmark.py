"""Smoke test of ``benchmarks/learning.py``: ``--quick`` (and ``--quick --stress``) print the table
and write the outputs."""

from __future__ import annotations

import importlib.util
import json
import re
import sys

import pytest
import torch
from _scripts import REPO_ROOT, run_python

SCRIPT = REPO_ROOT / "benchmarks" / "learning.py"
NUMBER = r"\d[\d,]*(?:\.\d+)?"
REACH = rf"(?:not reached|{NUMBER}s/{NUMBER})"
ROW = re.compile(
    rf"^(?P<key>[a-e]'?(?: x[\d.]+)?)\s+(?P<steps>{NUMBER})\s+(?P<seconds>{NUMBER})(?P<capped>\*?)\s+"
    rf"(?P<us>{NUMBER})\s+"
    rf"(?P<r190>{REACH})\s+(?P<r195>{REACH})\s+(?P<r198>{REACH})\s+(?P<best>{NUMBER})\s+"
    rf"(?P<worst>{NUMBER}) \((?P<worst_rep>{NUMBER})%\)\s+(?P<final>{NUMBER})\s+(?P<final_rep>{NUMBER})%\s+"
    rf"(?P<entropy>{NUMBER})\s+(?P<never>yes|no|n/a)$",
    re.MULTILINE,
)


def load_benchmark():
    """``benchmarks/learning.py`` as a module (imported once for all tests)."""
    spec = importlib.util.spec_from_file_location("learning_benchmark", SCRIPT)
    if spec.name not in sys.modules:  # its dataclasses look their module up there
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    return sys.modules[spec.name]


def number(text: str) -> float:
    return float(text.replace(",", ""))


def parse_rows(out: str) -> dict[str, dict[str, str]]:
    return {match["key"]: match.groupdict() for match in ROW.finditer(out)}


def check_row(row: dict[str, str], run_data: dict) -> None:
    steps, seconds = number(row["steps"]), number(row["seconds"])
    assert steps == run_data["steps"] > 0
    assert seconds > 0 and abs(seconds - run_data["train_seconds"]) <= 0.051
    assert number(row["us"]) > 0
    returns = [e["mean_return"] for e in run_data["evaluations"]]
    best, worst, final = number(row["best"]), number(row["worst"]), number(row["final"])
    assert worst <= final <= best <= 20.0 + 1e-9
    assert abs(best - max(returns)) < 6e-4 and abs(worst - min(returns)) < 6e-4 and abs(final - returns[-1]) < 6e-4
    assert 0 <= number(row["worst_rep"]) <= 100 and 0 <= number(row["final_rep"]) <= 100
    assert 0 <= number(row["entropy"]) <= 3.92 + 1e-3  # at most log(50) nats
    for threshold, cell in ((19.0, row["r190"]), (19.5, row["r195"]), (19.8, row["r198"])):
        assert (cell == "not reached") == (max(returns) < threshold)
        if cell != "not reached":
            hit_seconds, hit_steps = (number(part) for part in cell.split("s/"))
            assert 0 < hit_steps <= steps and 0 <= hit_seconds <= seconds + 0.05
    evaluations = run_data["evaluations"]
    assert [e["timesteps"] for e in evaluations] == sorted(e["timesteps"] for e in evaluations)
    for e in evaluations:  # quick mode: 50 sequences, repeated on 200 when within 3 standard errors of a bar
        screened = e["screening"] or e
        near = (
            abs(screened["repetition_rate"] - 0.009) <= 3 * (0.009 * 0.991 / 50) ** 0.5
            or abs(screened["mean_return"] - 18.24) <= 3 * 1.106 / 50**0.5
        )
        assert near == (e["screening"] is not None)
        assert e["n_sequences"] == (200 if near else 50)
    assert evaluations[-1]["timesteps"] == steps
    if len(evaluations) < 2:
        assert row["never"] == "n/a"
    else:
        ok = all(e["mean_return"] >= 18.24 and e["repetition_rate"] <= 0.009 + 1e-12 for e in evaluations[1:])
        assert row["never"] == ("yes" if ok else "no")


def test_quick_default_mode(tmp_path):
    result = run_python(SCRIPT, "--quick", "--output-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    rows = parse_rows(out)
    assert sorted(rows) == sorted(["a", "b", "b'", "c", "d", "e"]), out
    data = json.loads((tmp_path / "learning.json").read_text())
    assert (tmp_path / "learning.png").stat().st_size > 10_000
    runs = {r["key"]: r for r in data["runs"]}
    assert sorted(runs) == sorted(rows)
    for key, row in rows.items():
        check_row(row, runs[key])
        # the quick budget: 4,000 steps, rounded up to whole rollouts, or 60 s of training
        assert runs[key]["steps"] >= 4_000 or (runs[key]["capped_by_max_seconds"] and runs[key]["train_seconds"] >= 60)
        assert (row["capped"] == "*") == runs[key]["capped_by_max_seconds"]
    overhead = re.search(
        rf"verification overhead \(a vs b'\): a ({NUMBER}) us/step, b' ({NUMBER}) us/step, "
        rf"ratio ({NUMBER}) \(([+-]{NUMBER})%\)",
        out,
    )
    assert overhead, out
    a_us, b_us, ratio = (number(overhead.group(i)) for i in (1, 2, 3))
    assert abs(ratio - a_us / b_us) <= 0.002 + 0.001 * ratio
    assert abs(a_us - 1e6 * runs["a"]["seconds_per_step"]) < 0.06


def test_quick_stress_mode(tmp_path):
    # two runs at a time, in worker processes: the results come back in the requested order
    result = run_python(SCRIPT, "--quick", "--stress", "--runs", "a,b", "--jobs", "2", "--output-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    rows = parse_rows(out)
    assert sorted(rows) == ["a x10", "a x3", "b x10", "b x3"], out
    data = json.loads((tmp_path / "learning_stress.json").read_text())
    assert (tmp_path / "learning_stress.png").stat().st_size > 10_000
    assert [r["key"] for r in data["runs"]] == ["a x3", "b x3", "a x10", "b x10"]
    assert "2 runs at a time" in out
    runs = {r["key"]: r for r in data["runs"]}
    for key, row in rows.items():
        check_row(row, runs[key])
        assert runs[key]["learning_rate_factor"] == float(key.split(" x")[1])
        verified = key.startswith("a")
        assert (runs[key]["undone_updates"] is not None) == verified
        if verified:
            assert re.search(
                rf"^{key}: {runs[key]['rolled_back_updates']} updates rolled back, "
                rf"{runs[key]['backtracked_updates']} accepted after backtracking, "
                rf"{runs[key]['undone_updates']} undone on the next rollout$",
                out,
                re.MULTILINE,
            ), out
    run_worst = rf"return ({NUMBER}) \(at ({NUMBER}) steps\), repetition ({NUMBER})% \(at ({NUMBER}) steps\)"
    for factor in ("3", "10"):
        line = re.search(
            rf"worst after the first evaluation, verified vs unverified \(lr x{factor}\): "
            rf"a {run_worst} vs b {run_worst}",
            out,
        )
        assert line, out
        for offset, run in ((0, "a"), (4, "b")):
            later = runs[f"{run} x{factor}"]["evaluations"][1:]
            assert later  # quick mode evaluates every 2,000 of 4,000 steps
            low = min(later, key=lambda e: e["mean_return"])
            high = max(later, key=lambda e: e["repetition_rate"])
            assert abs(number(line.group(offset + 1)) - low["mean_return"]) < 6e-4
            assert number(line.group(offset + 2)) == low["timesteps"]
            assert abs(number(line.group(offset + 3)) - 100 * high["repetition_rate"]) < 6e-3
            assert number(line.group(offset + 4)) == high["timesteps"]
    assert "verification overhead" not in out


def test_rejects_bad_flags(tmp_path):
    result = run_python(SCRIPT, "--runs", "a,f", "--output-dir", str(tmp_path))
    assert result.returncode == 2 and "--runs" in result.stderr
    result = run_python(SCRIPT, "--max-seconds", "0", "--output-dir", str(tmp_path))
    assert result.returncode == 2 and "--max-seconds" in result.stderr
    result = run_python(SCRIPT, "--jobs", "0", "--output-dir", str(tmp_path))
    assert result.returncode == 2 and "--jobs" in result.stderr
    result = run_python(SCRIPT, "--threads", "0", "--output-dir", str(tmp_path))
    assert result.returncode == 2 and "--threads" in result.stderr


@pytest.mark.parametrize("threads", [1, 2])
def test_a_run_trains_with_the_threads_asked_for(threads):
    # 2 differs from conftest's 1; 1 differs from the training job's default on 2 cores
    benchmark = load_benchmark()
    args = benchmark.parse_args(["--quick", "--runs", "a", "--threads", str(threads), "--steps", "2560"])
    before = torch.get_num_threads()
    seen = []
    try:
        result = benchmark.train_run("a", args, log=lambda line: seen.append(torch.get_num_threads()))
    finally:
        torch.set_num_threads(before)
    assert result.steps == 2560 and seen == [threads]


@pytest.mark.parametrize(
    "repetition, mean_return, near",
    [
        (0.0072, 18.60, True),  # a uniform policy's rate: within 3 standard errors (0.40 points) of 0.9 %
        (0.0125, 18.60, True),
        (0.0040, 18.60, False),
        (0.0140, 18.60, False),
        (0.0020, 18.20, True),  # return within 3 standard errors (0.047) of 18.24
        (0.0020, 18.18, False),
        (0.0020, 18.30, False),
    ],
)
def test_near_random_bars_at_5000_sequences(repetition, mean_return, near):
    assert load_benchmark().near_random_bars({"repetition_rate": repetition, "mean_return": mean_return}, 5000) is near
