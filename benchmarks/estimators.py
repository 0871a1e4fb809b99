"""PPO-GAE against GRPO, Dr. GRPO, RLOO and REINFORCE++ on TextGen-v0, side by side, with the same budgets and seeds.

Every run is the training job's model (``build_model(TrainConfig(...))``: VerifiedRecurrentPPO +
SLMLstmPolicy with the default training's settings) with another ``advantage_estimator``; the group
estimators train on groups of ``--group-size`` environments sharing the empty prompt, and no
critic warm-up (they train no critic). Each run is evaluated every ``--eval-every`` steps on
``--eval-sequences`` sequences (``benchmarks/learning.py``'s recorder, wall times without the
evaluations) and once at the end.

    python benchmarks/estimators.py --jobs 2            # five runs of 150,000 steps, two at a time
    python benchmarks/estimators.py --stress --jobs 2   # learning rate x3 and x10, verified against permissive
    python benchmarks/estimators.py --quick             # smoke test (about a minute)

The table gives, per run, the steps and wall time to the first evaluation with a mean return of
19.0 / 19.5 / 19.8 and a per-token entropy of at least 2 nats, the best and worst evaluation,
the final figures, whether every evaluation after the first stayed no worse than a uniform random
policy, and the fit of Cui et al. 2025 (arXiv 2505.22617), ``R = -a * exp(H) + b`` over the
run's evaluations (least squares): ``a``, ``b`` and the predicted ceiling ``b - a`` (the return
at entropy 0). ``--stress`` trains every estimator at ``--lr-factors`` times the default learning
rate, verified and with verification made permissive (``learning.py``'s ``b'``), and prints the
worst evaluation of each pair. The registered tasks: ``python benchmarks/tasks.py --runs
gae,grpo,dr_grpo,rloo,reinforce_plus_plus``. Output: a table, ``<output-dir>/estimators.json``
and ``estimators.png`` (``estimators_stress.*``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import multiprocessing
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import learning
import numpy as np
import torch as th
from stable_baselines3.common.callbacks import CallbackList

from verl_sb3 import CriticWarmupCallback
from verl_sb3.app.config import TrainConfig
from verl_sb3.app.training import build_model

ESTIMATORS = ("gae", "grpo", "dr_grpo", "rloo", "reinforce_plus_plus")
GROUP_ESTIMATORS = ("grpo", "dr_grpo", "rloo")
THRESHOLDS = learning.THRESHOLDS  # 19.0, 19.5, 19.8
MIN_ENTROPY = 2.0
DESCRIPTIONS = {
    "gae": "GAE with the critic (the default training)",
    "grpo": "GRPO",
    "dr_grpo": "Dr. GRPO",
    "rloo": "RLOO",
    "reinforce_plus_plus": "REINFORCE++",
}


def run_config(estimator: str, seed: int, factor: float, group_size: int, permissive: bool) -> TrainConfig:
    """The default training's configuration with ``estimator``, the learning rate times ``factor``."""
    default = TrainConfig(seed=seed)
    final = default.learning_rate_final
    settings: dict[str, Any] = dict(
        seed=seed,
        advantage_estimator=estimator,
        learning_rate=default.learning_rate * factor,
        learning_rate_final=None if final is None else final * factor,
    )
    if estimator != "gae":
        settings.update(critic_warmup=0)
    if estimator in GROUP_ESTIMATORS:
        settings.update(group_size=group_size)
    if permissive:
        settings.update(
            kl_threshold=learning.PERMISSIVE_KL,
            repeat_mass_factor=default.vocab_size,  # a bound of 1
            max_reuse_rise=None if default.max_reuse_rise is None else learning.PERMISSIVE_KL,
            verification=dict(learning.PERMISSIVE),
        )
    return TrainConfig(**settings)


def train_run(estimator: str, args: argparse.Namespace, factor: float, permissive: bool) -> dict[str, Any]:
    """One run's :class:`learning.RunResult` fields, with the entropy-return fit."""
    th.set_num_threads(args.threads)
    config = run_config(estimator, args.seed, factor, args.group_size, permissive)
    model = build_model(config)
    recorder = learning.EvaluationRecorder(
        args.eval_every, args.eval_sequences, args.seed, args.max_seconds, args.confirm_sequences
    )
    callbacks = [CriticWarmupCallback(config.critic_warmup), recorder]
    model.learn(args.steps, callback=CallbackList(callbacks))
    key = estimator + (" permissive" if permissive else "") + (f" x{factor:g}" if factor != 1.0 else "")
    result = learning.RunResult(
        key,
        estimator,
        f"{DESCRIPTIONS[estimator]}{', permissive checks' if permissive else ''}",
        factor,
        steps=int(model.num_timesteps),
        train_seconds=recorder.train_seconds,
        capped=recorder.capped,
        evaluations=recorder.evaluations,
        rolled_back=sum(1 for e in model.verification_log if not e["accepted"]),
        backtracked=sum(1 for e in model.verification_log if e["accepted"] and e["backtracks"]),
        undone=model.n_undone,
    )
    last = result.evaluations[-1]
    print(
        f"  run {key:28s} {result.steps:>9,} steps {result.train_seconds:7.1f} s  final return "
        f"{last['mean_return']:.3f}  entropy {last['entropy']:.2f}  repetition {last['repetition_rate']:.1%}",
        flush=True,
    )
    return dataclasses.asdict(result)


def entropy_fit(evaluations: list[dict[str, float]]) -> tuple[float, float]:
    """Least-squares ``a, b`` of ``R = -a * exp(H) + b`` over the evaluations (NaN with fewer than 2)."""
    entropy = np.array([e["entropy"] for e in evaluations])
    returns = np.array([e["mean_return"] for e in evaluations])
    if len(entropy) < 2 or np.ptp(entropy) == 0:
        return math.nan, math.nan
    design = np.stack([-np.exp(entropy), np.ones_like(entropy)], axis=1)
    (a, b), *_ = np.linalg.lstsq(design, returns, rcond=None)
    return float(a), float(b)


def first_reach(result: learning.RunResult, threshold: float) -> dict[str, float] | None:
    return next((e for e in result.evaluations if e["mean_return"] >= threshold and e["entropy"] >= MIN_ENTROPY), None)


COLUMNS = (
    "run",
    "steps",
    "time s",
    *(f"->{t:g}@H>=2 (s/steps)" for t in THRESHOLDS),
    "best",
    "worst",
    "final",
    "final rep",
    "final H",
    "never<random",
    "fit a",
    "fit b",
    "ceiling b-a",
)


def table(results: list[learning.RunResult]) -> str:
    rows = [list(COLUMNS)]
    for r in results:
        later = r.evaluations[1:] or r.evaluations
        best = max(r.evaluations, key=lambda e: e["mean_return"])
        worst = min(later, key=lambda e: e["mean_return"])
        last = r.evaluations[-1]
        a, b = entropy_fit(r.evaluations)
        reach = [first_reach(r, t) for t in THRESHOLDS]
        rows.append(
            [
                r.key,
                f"{r.steps:,}",
                f"{r.train_seconds:.1f}{'*' if r.capped else ''}",
                *("not reached" if e is None else f"{e['wall_time']:.1f}s/{e['timesteps']:,}" for e in reach),
                f"{best['mean_return']:.3f}",
                f"{worst['mean_return']:.3f}",
                f"{last['mean_return']:.3f}",
                f"{last['repetition_rate']:.1%}",
                f"{last['entropy']:.3f}",
                r.never_worse_than_random(),
                f"{a:.4g}",
                f"{b:.4g}",
                f"{b - a:.3f}",
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny budgets, for a smoke test")
    parser.add_argument("--stress", action="store_true", help="learning rate x3 and x10, verified and permissive")
    parser.add_argument("--estimators", default=",".join(ESTIMATORS), help="comma-separated subset")
    parser.add_argument("--steps", type=int, default=None, help="environment steps per run (default 150,000)")
    parser.add_argument("--max-seconds", type=float, default=None, help="wall-clock cap per run (default 600)")
    parser.add_argument("--eval-every", type=int, default=None, help="steps between evaluations (default 10,000)")
    parser.add_argument("--eval-sequences", type=int, default=None, help="sequences per evaluation (default 1000)")
    parser.add_argument("--confirm-sequences", type=int, default=None, help="near the random bars (default 20000)")
    parser.add_argument("--group-size", type=int, default=8, help="environments per group (default 8)")
    parser.add_argument("--lr-factors", default="3,10", help="learning-rate factors of --stress")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time, each in its own process")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--output-dir", type=Path, default=learning.DEFAULT_OUTPUT)
    args = parser.parse_args(argv)
    args.estimators = [name.strip() for name in args.estimators.split(",") if name.strip()]
    bad = [name for name in args.estimators if name not in ESTIMATORS]
    if bad or not args.estimators:
        parser.error(f"--estimators: expected a comma-separated subset of {','.join(ESTIMATORS)}, got {bad}")
    args.lr_factors = [float(f) for f in args.lr_factors.split(",") if f.strip()]
    for name in ("steps", "eval_every", "eval_sequences", "group_size", "jobs", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')}: expected an integer >= 1, got {value}")
    quick = args.quick
    args.steps = args.steps or (3_000 if quick else 150_000)
    args.max_seconds = args.max_seconds or (60.0 if quick else 600.0)
    args.eval_every = args.eval_every or (1_000 if quick else 10_000)
    args.eval_sequences = args.eval_sequences or (50 if quick else 1000)
    args.confirm_sequences = args.confirm_sequences or (100 if quick else learning.CONFIRM_SEQUENCES)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    factors = args.lr_factors if args.stress else [1.0]
    plan = [(name, factor, permissive) for factor in factors for name in args.estimators for permissive in (
        (False, True) if args.stress else (False,)
    )]  # fmt: skip
    print(
        f"Estimator benchmark ({'stress' if args.stress else 'default'}{', quick' if args.quick else ''}): "
        f"{len(plan)} runs of {args.steps:,} steps (<= {args.max_seconds:g} s), evaluation every "
        f"{args.eval_every:,} steps on {args.eval_sequences} sequences, groups of {args.group_size}, seed "
        f"{args.seed}, {args.threads} thread(s) per run, {args.jobs} at a time",
        flush=True,
    )
    if args.jobs == 1:
        fields = [train_run(name, args, factor, permissive) for name, factor, permissive in plan]
    else:
        with ProcessPoolExecutor(max_workers=args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = [pool.submit(train_run, name, args, factor, permissive) for name, factor, permissive in plan]
            fields = [future.result() for future in futures]
    results = [learning.RunResult(**f) for f in fields]
    print()
    print(table(results))
    print(
        "(->X@H>=2: wall time s / steps at the first evaluation with mean return >= X and entropy >= 2 nats; "
        f"never<random: return >= {learning.RANDOM_POLICY_RETURN} and repetition <= "
        f"{learning.RANDOM_REPETITION_BAR:.1%} at every evaluation after the first; fit: R = -a*exp(H) + b)"
    )
    for r in results:
        print(f"{r.key}: {r.rolled_back} updates rolled back, {r.backtracked} accepted after backtracking")
    if args.stress:
        for r in results:
            later = r.evaluations[1:] or r.evaluations
            low = min(later, key=lambda e: e["mean_return"])
            print(f"worst after the first evaluation, {r.key}: return {low['mean_return']:.3f} at {low['timesteps']:,}")
    stem = "estimators_stress" if args.stress else "estimators"
    png, data = args.output_dir / f"{stem}.png", args.output_dir / f"{stem}.json"
    learning.plot(results, png, f"TextGen-v0: advantage estimators, seed {args.seed}")
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    fits = {r.key: dict(zip(("a", "b"), entropy_fit(r.evaluations))) for r in results}
    data.write_text(json.dumps({"settings": settings, "fits": fits, "runs": [r.as_dict() for r in results]}, indent=2))
    print(f"wrote {png} and {data}")


if __name__ == "__main__":
    main()
