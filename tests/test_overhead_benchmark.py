"""Smoke test of ``benchmarks/verification_overhead.py``: it runs with ``--quick`` and prints its ratios."""

from __future__ import annotations

import re

from _scripts import REPO_ROOT, run_python

SCRIPT = REPO_ROOT / "benchmarks" / "verification_overhead.py"


def test_quick_overhead_benchmark_prints_every_ratio():
    result = run_python(SCRIPT, "--quick")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    parents = [float(x) for x in re.findall(r"parent\s+([\d.]+) us/step", out)]
    verified = [float(x) for x in re.findall(r"verified\s+([\d.]+) us/step", out)]
    ratios = re.findall(r"ratio\s+([\d.]+)\s+overhead ([+-][\d.]+)% \(target <= 5%\): (MET|NOT MET)", out)
    assert len(parents) == len(verified) == len(ratios) == 3, out
    for parent, mine, (ratio, overhead, verdict) in zip(parents, verified, ratios):
        assert parent > 0 and mine > 0
        assert abs(float(ratio) - mine / parent) < 0.002 + 1e-3 * float(ratio)
        if float(overhead) != 5.0:  # the printed figure is rounded: 5.0 can be either side
            assert (verdict == "MET") == (float(overhead) < 5.0)
    assert ("all targets met" in out) == all(verdict == "MET" for *_, verdict in ratios)
