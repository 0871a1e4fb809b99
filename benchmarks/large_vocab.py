"""Steps per second and peak memory of TextGen-v0 and its verified training, default size against a large vocabulary.

    python benchmarks/large_vocab.py                          # full run (about 2 to 4 minutes on 2 cores)
    python benchmarks/large_vocab.py --quick                  # smoke test: tiny runs (well under a minute)
    python benchmarks/large_vocab.py --sizes 50x20 1000x64    # other (vocab_size x max_length) pairs
    python benchmarks/large_vocab.py --runs env lstm          # a subset of the runs

For every size ``VxL`` (default ``50x20``, the environment's default, and ``5000x128``) and run:

- ``env``: the SB3 vec env alone (``TextGenVecEnv``, ``--num-envs`` environments, default 64),
  random valid actions generated before timing; median of ``--repeats`` runs of ``--seconds``;
- ``lstm``: the default training (``verl_sb3.app.training.build_model``: ``VerifiedRecurrentPPO`` +
  ``SLMLstmPolicy``, 128 environments, 20 steps, batch 320, 4 epochs) at that size;
- ``transformer``: ``VerifiedPPO`` + ``SLMTransformerPolicy`` (default policy arguments) with the same
  environments and hyper-parameters, when ``verl_sb3.policies`` is importable.

A training figure is environment steps per second of ``model.learn`` (collection, update and
verification) over ``--updates`` rollouts, after one warm-up rollout. Each (size, run) runs in a
fresh subprocess (1 torch thread) that reports its peak resident memory (``ru_maxrss``: it includes
the warm-up) and its increase over the resident memory right after the imports. The table gives,
for each size after the first, the ratio to the first size. A CSV goes to ``benchmarks/output/``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
OUTPUT_DIR = REPO_ROOT / "benchmarks" / "output"
RUNS = ("env", "lstm", "transformer")
RUN_NAMES = {
    "env": "TextGenVecEnv, random actions",
    "lstm": "VerifiedRecurrentPPO + SLMLstmPolicy",
    "transformer": "VerifiedPPO + SLMTransformerPolicy",
}
DEFAULT_SIZES = ("50x20", "5000x128")
ACTION_BLOCKS = 256  # pre-generated batches of actions, cycled through
RESULT_PREFIX = "RESULT "
MB = 1024 * 1024
CSV_FIELDS = [
    "run",
    "vocab_size",
    "max_length",
    "num_envs",
    "steps_per_s",
    "peak_rss_mb",
    "rss_after_imports_mb",
    "rss_increase_mb",
    "ratio_steps_per_s",
    "ratio_peak_rss",
    "ratio_rss_increase",
    "timesteps",
    "seconds",
    "updates_accepted",
    "load_average",
]


def size(text: str) -> tuple[int, int]:
    """``"5000x128"`` as ``(5000, 128)``, or an argparse error."""
    try:
        vocab_size, max_length = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected VOCABxLENGTH such as 5000x128, got {text!r}") from None
    if vocab_size < 2 or max_length < 1:
        raise argparse.ArgumentTypeError(f"expected vocab_size >= 2 and max_length >= 1, got {text!r}")
    return vocab_size, max_length


# --------------------------------------------------------------------------- in the subprocess


def peak_rss_bytes() -> float:
    """Peak resident memory of the process (``ru_maxrss``: kilobytes on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return float(peak) * (1 if sys.platform == "darwin" else 1024)


def bench_env(args: argparse.Namespace, vocab_size: int, max_length: int) -> dict[str, Any]:
    import numpy as np

    from textenv_gym.sb3_vec_env import TextGenVecEnv

    env = TextGenVecEnv(args.num_envs, seed=0, vocab_size=vocab_size, max_length=max_length)
    env.reset()
    rng = np.random.default_rng(0)
    actions = list(rng.integers(0, vocab_size, size=(ACTION_BLOCKS, args.num_envs), dtype=np.int64))

    def run(calls: int) -> float:
        start = time.perf_counter()
        for k in range(calls):
            env.step(actions[k % ACTION_BLOCKS])
        return time.perf_counter() - start

    calls, elapsed = 1, run(1)  # warm-up, which also estimates the cost of one call
    while elapsed < min(0.2, args.seconds):
        calls *= 2
        elapsed = run(calls)
    calls = max(1, round(calls * args.seconds / elapsed))
    times = [run(calls) for _ in range(args.repeats)]
    rates = [calls * args.num_envs / t for t in times]
    return dict(
        num_envs=args.num_envs,
        steps_per_s=statistics.median(rates),
        timesteps=calls * args.num_envs * args.repeats,
        seconds=sum(times),
    )


def build_training(run: str, args: argparse.Namespace, vocab_size: int, max_length: int):
    from verl_sb3 import VerifiedPPO
    from verl_sb3.app.config import TrainConfig
    from verl_sb3.app.training import build_env, build_model

    config = TrainConfig(vocab_size=vocab_size, max_length=max_length, n_envs=args.train_envs, progress_bar=False)
    if run == "lstm":
        return build_model(config)
    from verl_sb3.policies import SLMTransformerPolicy

    # the default training's settings; the LSTM's policy_kwargs do not apply to the transformer
    kwargs = {**config.ppo_kwargs(), "policy_kwargs": None}
    return VerifiedPPO(SLMTransformerPolicy, build_env(config), **kwargs, **config.verification_kwargs())


def bench_training(run: str, args: argparse.Namespace, vocab_size: int, max_length: int) -> dict[str, Any]:
    model = build_training(run, args, vocab_size, max_length)
    rollout = model.n_envs * model.n_steps
    model.learn(rollout)  # warm-up
    start = time.perf_counter()
    model.learn(args.updates * rollout, reset_num_timesteps=False)
    seconds = time.perf_counter() - start
    timesteps = model.num_timesteps - rollout
    accepted = sum(entry["accepted"] for entry in model.verification_log)
    return dict(
        num_envs=model.n_envs,
        steps_per_s=timesteps / seconds,
        timesteps=timesteps,
        seconds=seconds,
        updates_accepted=f"{accepted}/{len(model.verification_log)}",
    )


def worker(args: argparse.Namespace) -> dict[str, Any]:
    """Runs one (run, size) and returns its figures; the imports are the same for every run."""
    import numpy  # noqa: F401
    import torch as th

    sys.path.insert(0, str(REPO_ROOT))
    import textenv_gym.sb3_vec_env  # noqa: F401
    import verl_sb3.app.training
    import verl_sb3.policies  # noqa: F401

    th.set_num_threads(1)
    ((vocab_size, max_length),) = args.sizes
    after_imports = peak_rss_bytes()
    if args.worker == "env":
        result = bench_env(args, vocab_size, max_length)
    else:
        result = bench_training(args.worker, args, vocab_size, max_length)
    peak = peak_rss_bytes()
    result.update(
        peak_rss_mb=peak / MB, rss_after_imports_mb=after_imports / MB, rss_increase_mb=(peak - after_imports) / MB
    )
    return result


# --------------------------------------------------------------------------- in the parent


def run_worker(run: str, vocab_size: int, max_length: int, args: argparse.Namespace) -> dict[str, Any]:
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        run,
        "--sizes",
        f"{vocab_size}x{max_length}",
        "--num-envs",
        str(args.num_envs),
        "--train-envs",
        str(args.train_envs),
        "--updates",
        str(args.updates),
        "--seconds",
        str(args.seconds),
        "--repeats",
        str(args.repeats),
    ]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=str(REPO_ROOT))
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if done.returncode != 0 or not lines:
        raise RuntimeError(
            f"{run} at {vocab_size}x{max_length} failed (exit {done.returncode}):\n{done.stderr[-3000:]}"
        )
    return json.loads(lines[-1][len(RESULT_PREFIX) :])


def progress(total: int):
    """A tqdm bar on stderr (a no-op stand-in when tqdm is not installed)."""
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover

        class _Silent:
            def update(self, n: int = 1) -> None: ...
            def set_description_str(self, text: str) -> None: ...
            def close(self) -> None: ...

        return _Silent()
    return tqdm(total=total, file=sys.stderr, unit="run", leave=False, dynamic_ncols=True)


def ratio(value: float, reference: float) -> float:
    return value / reference if reference else float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny runs, for a smoke test")
    parser.add_argument(
        "--sizes",
        type=size,
        nargs="+",
        default=None,
        help=f"VOCABxLENGTH pairs, the first is the reference of the ratios (default {' '.join(DEFAULT_SIZES)})",
    )
    parser.add_argument("--runs", choices=RUNS, nargs="+", default=list(RUNS), help="which runs (default all)")
    parser.add_argument("--num-envs", type=int, default=64, help="environments of the env run (default 64)")
    parser.add_argument(
        "--train-envs", type=int, default=None, help="environments of the training runs (default 128, quick 16)"
    )
    parser.add_argument(
        "--updates", type=int, default=None, help="timed rollouts + updates per training run (default 8, quick 1)"
    )
    parser.add_argument(
        "--seconds", type=float, default=None, help="duration of one timed env run (default 0.5, quick 0.05)"
    )
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed env runs, median reported (default 5, quick 2)"
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help="CSV file (default benchmarks/output/large_vocab.csv, quick: large_vocab_quick.csv)",
    )
    parser.add_argument("--worker", choices=RUNS, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.sizes = args.sizes or [size(text) for text in DEFAULT_SIZES]
    defaults = dict(train_envs=(16, 128), updates=(1, 8), seconds=(0.05, 0.5), repeats=(2, 5))
    for name, (quick, full) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    if min(args.num_envs, args.train_envs, args.updates, args.repeats) < 1 or args.seconds <= 0:
        parser.error("--num-envs, --train-envs, --updates and --repeats must be at least 1, --seconds positive")

    if args.worker:
        if len(args.sizes) != 1:
            parser.error("--worker takes exactly one size")
        print(RESULT_PREFIX + json.dumps(worker(args)), flush=True)
        return 0

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    sizes_text = ", ".join(f"{v}x{n}" for v, n in args.sizes)
    print(
        f"Large vocabularies: steps/s and peak memory at {sizes_text} (VOCABxLENGTH); each row a fresh process, "
        f"1 torch thread; training: {args.train_envs} envs, {args.updates} timed update(s) after 1 warm-up; "
        f"env: {args.num_envs} envs, median of {args.repeats} x {args.seconds:g} s; load average {load:.2f} at start"
    )
    rows: list[dict[str, Any]] = []
    bar = progress(len(args.runs) * len(args.sizes))
    try:
        for run in args.runs:
            for vocab_size, max_length in args.sizes:
                bar.set_description_str(f"{run} {vocab_size}x{max_length}")
                result = run_worker(run, vocab_size, max_length, args)
                rows.append(
                    dict(run=run, vocab_size=vocab_size, max_length=max_length, load_average=round(load, 2), **result)
                )
                bar.update()
    finally:
        bar.close()

    header = f"{'run':<38}{'V x L':>11}{'envs':>6}{'steps/s':>13}{'peak RSS MB':>13}{'+MB':>9}"
    print(header)
    print("-" * len(header))
    for run in args.runs:
        reference = None
        for row in (r for r in rows if r["run"] == run):
            label = f"{RUN_NAMES[run]}"
            sizes = f"{row['vocab_size']}x{row['max_length']}"
            print(
                f"{label:<38}{sizes:>11}{row['num_envs']:>6}{row['steps_per_s']:>13,.0f}"
                f"{row['peak_rss_mb']:>13.1f}{row['rss_increase_mb']:>9.1f}"
            )
            if reference is None:
                reference = row
                continue
            row["ratio_steps_per_s"] = ratio(row["steps_per_s"], reference["steps_per_s"])
            row["ratio_peak_rss"] = ratio(row["peak_rss_mb"], reference["peak_rss_mb"])
            row["ratio_rss_increase"] = ratio(row["rss_increase_mb"], reference["rss_increase_mb"])
            print(
                f"  ratio {sizes} / {reference['vocab_size']}x{reference['max_length']}: "
                f"steps/s {row['ratio_steps_per_s']:.3f}x, peak RSS {row['ratio_peak_rss']:.2f}x, "
                f"+MB {row['ratio_rss_increase']:.2f}x"
            )

    output = args.output or OUTPUT_DIR / ("large_vocab_quick.csv" if args.quick else "large_vocab.csv")
    output.parent.mkdir(parents=True, exist_ok=True)
    with open(output, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(
            {name: round(value, 4) if isinstance(value, float) else value for name, value in row.items()}
            for row in rows
        )
    print(f"CSV: {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
