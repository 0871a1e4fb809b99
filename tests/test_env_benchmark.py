"""Smoke test of ``benchmarks/env_throughput.py``: it runs with ``--quick`` and prints every figure."""

from __future__ import annotations

import re

from _scripts import REPO_ROOT, run_python

SCRIPT = REPO_ROOT / "benchmarks" / "env_throughput.py"
RATE = r"([\d,]+) steps/s"


def rate(text: str) -> float:
    return float(text.replace(",", ""))


def test_quick_benchmark_prints_the_figures():
    result = run_python(SCRIPT, "--quick")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    scalar = re.search(r"scalar gym.make \(1 env\)\s+" + RATE, out)
    assert scalar and rate(scalar.group(1)) > 0, out
    sections = re.split(r"^N = (\d+)$", out, flags=re.MULTILINE)
    # [header, "64", body, "1024", body]
    assert sections[1::2] == ["64", "1024"], out
    ratios = {}
    for num_envs, body in zip(sections[1::2], sections[2::2]):
        rates = {}
        for name in ("DummyVecEnv", "TextGenVectorEnv", "TextGenVecEnv"):
            match = re.search(rf"^  {name}\s+{RATE}$", body, flags=re.MULTILINE)
            assert match, (name, body)
            rates[name] = rate(match.group(1))
            assert rates[name] > 0
        for name in ("TextGenVectorEnv", "TextGenVecEnv"):
            match = re.search(rf"ratio {name} / DummyVecEnv:\s+([\d.]+)x", body)
            assert match, (name, body)
            printed = float(match.group(1))
            assert abs(printed - rates[name] / rates["DummyVecEnv"]) <= 0.05 + 0.01 * printed
            ratios[num_envs, name] = printed
    target = re.search(r"target \(TextGenVectorEnv >= 20x DummyVecEnv at 64 envs\): (MET|NOT MET) \(([\d.]+)x\)", out)
    assert target, out
    assert float(target.group(2)) == ratios["64", "TextGenVectorEnv"]
    assert (target.group(1) == "MET") == (ratios["64", "TextGenVectorEnv"] >= 20)
    # even with tiny, noisy timings the native batched envs beat a Python loop over 64 envs
    assert ratios["64", "TextGenVectorEnv"] > 2 and ratios["64", "TextGenVecEnv"] > 2


def test_benchmark_rejects_bad_flags():
    result = run_python(SCRIPT, "--seconds", "0")
    assert result.returncode == 2
    assert "--seconds" in result.stderr
