"""The main command's wall time against the same command at an earlier revision, side by side in one run.

    python benchmarks/main_job.py --baseline 445af08      # both jobs at once, 1 torch thread each

Checks the baseline revision out into a temporary git worktree, then runs ``python
examples/train.py --threads 1 --no-progress-bar --output-dir <tmp>`` from this checkout and from
the baseline's at the same time (each gets one of two cores), and prints each command's wall
time, steps, evaluation and the ratio. The baseline runs with this checkout's installed packages
(its own ``verl_sb3`` and ``textenv_gym`` first on ``PYTHONPATH``). Output also goes to
``<output-dir>/main_job.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT = Path(__file__).resolve().parent / "output"


def run_job(checkout: Path, output: Path, extra: list[str]) -> dict[str, Any]:
    """``examples/train.py`` of ``checkout``: its wall time and its evaluation."""
    env = dict(os.environ, PYTHONPATH=str(checkout), MPLBACKEND="Agg")
    command = [sys.executable, str(checkout / "examples" / "train.py"), "--threads", "1", "--no-progress-bar"]
    start = time.perf_counter()
    done = subprocess.run(
        [*command, "--output-dir", str(output), *extra], cwd=checkout, env=env, capture_output=True, text=True
    )
    seconds = time.perf_counter() - start
    evaluation = output / "evaluation.json"
    figures = json.loads(evaluation.read_text())["figures"] if evaluation.is_file() else {}
    return {
        "checkout": str(checkout),
        "exit_code": done.returncode,
        "seconds": seconds,
        "timesteps": figures.get("timesteps"),
        "train_seconds": figures.get("train_seconds"),
        "mean_return": figures.get("mean_return"),
        "entropy": figures.get("entropy"),
        "repetition_rate": figures.get("repetition_rate"),
        "last_lines": done.stdout.strip().splitlines()[-3:] + done.stderr.strip().splitlines()[-2:],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", required=True, help="the git revision to compare with (e.g. a commit)")
    parser.add_argument("--output-dir", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--total-timesteps", type=int, help="passed to both jobs (default: each one's own default)")
    args = parser.parse_args(argv)
    extra = [] if args.total_timesteps is None else ["--total-timesteps", str(args.total_timesteps)]
    with tempfile.TemporaryDirectory(prefix="verl-sb3-main-job-") as tmp:
        baseline = Path(tmp) / "baseline"
        subprocess.run(["git", "worktree", "add", "--detach", str(baseline), args.baseline], cwd=REPO_ROOT, check=True)
        try:
            print(f"running the main command of this checkout and of {args.baseline} side by side...", flush=True)
            with ThreadPoolExecutor(2) as pool:
                current = pool.submit(run_job, REPO_ROOT, Path(tmp) / "current", extra)
                old = pool.submit(run_job, baseline, Path(tmp) / "old", extra)
                results = {"current": current.result(), "baseline": old.result()}
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(baseline)], cwd=REPO_ROOT, check=False)
    for name, r in results.items():
        print(
            f"{name:9s} exit {r['exit_code']}  {r['seconds']:7.1f} s for the command, {r['timesteps']} steps, "
            f"{r['train_seconds']} s of training; return {r['mean_return']}, entropy {r['entropy']}, "
            f"repetition {r['repetition_rate']}"
        )
    ratio = results["current"]["seconds"] / results["baseline"]["seconds"]
    print(f"wall time of the main command, this checkout / {args.baseline}: {ratio:.1%}")
    args.output_dir.mkdir(parents=True, exist_ok=True)
    path = args.output_dir / "main_job.json"
    path.write_text(json.dumps({"baseline": args.baseline, "ratio": ratio, **results}, indent=2) + "\n")
    print(f"wrote {path}")
    return 0 if all(r["exit_code"] in (0, 1) for r in results.values()) else 2


if __name__ == "__main__":
    sys.exit(main())
