"""Steps and time to 50 %, 90 % and 99 % test accuracy on the registered tasks, verified against unverified.

    python benchmarks/tasks.py                 # both tasks, verified and unverified (about 15 to 25 minutes)
    python benchmarks/tasks.py --quick         # smoke test: tiny runs (about a minute)
    python benchmarks/tasks.py --tasks TextGen-Reverse-v0 --runs verified
    python benchmarks/tasks.py --runs verified grpo dr_grpo rloo reinforce_plus_plus   # the estimators
    python benchmarks/tasks.py --runs verified warm_start --timesteps 100000  # RL against warm start + RL

Each run trains the training job's model for the task (``TrainConfig.for_task``: ``VerifiedRecurrentPPO``
+ ``SLMLstmPolicy`` with the task defaults; ``unverified``: sb3-contrib's ``RecurrentPPO`` with the same
policy and settings, the baseline measured in the same run; ``grpo``, ``dr_grpo``, ``rloo``,
``reinforce_plus_plus``: the verified model with that ``advantage_estimator``, the group ones on
groups of ``--group-size`` environments answering the same prompts; ``warm_start``: the verified
model after a supervised warm start on ``--warm-start-share`` of the train split, whose seconds
count as training, with the same RL steps) for ``--timesteps`` steps or
``--seconds`` of training, whichever comes first, on the task's train split at its default
difficulty. Every ``--eval-every`` steps it answers every prompt of the test split ``--k`` times
(``verl_sb3.task_evaluation.evaluate_task``): pass@1 is the share of exact answers. Training time
excludes the evaluations. Runs are one after the other, each with ``--threads`` torch threads. The
table gives steps and seconds to each accuracy, the final test (and train) pass@1; a JSON file and a
plot of test pass@1 against steps go to ``benchmarks/output/``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
OUTPUT_DIR = REPO_ROOT / "benchmarks" / "output"
TASKS = ("TextGen-Reverse-v0", "TextGen-Arithmetic-v0")
RUNS = ("verified", "unverified")
#: ``warm_start``: the verified run after a supervised warm start on a share of the train split.
WARM_START_RUNS = ("warm_start",)
ESTIMATOR_RUNS = ("grpo", "dr_grpo", "rloo", "reinforce_plus_plus")
LEVELS = (0.5, 0.9, 0.99)


def build(env_id: str, run: str, args: argparse.Namespace) -> Any:
    from sb3_contrib import RecurrentPPO

    from verl_sb3.app.config import TrainConfig
    from verl_sb3.app.training import build_env, build_model, record_environment
    from verl_sb3.policies import SLMLstmPolicy

    settings: dict[str, Any] = {"n_envs": 16} if args.quick else {}
    if run in ESTIMATOR_RUNS:
        settings.update(advantage_estimator=run, group_size=args.group_size if run != "reinforce_plus_plus" else 1)
    if run == "warm_start":
        settings.update(warm_start_share=args.warm_start_share, warm_start_epochs=args.warm_start_epochs)
    config = TrainConfig.for_task(env_id, seed=args.seed, **settings)
    if run == "warm_start":
        import tempfile

        from verl_sb3.app.warm_start import run_warm_start

        model = build_model(config)
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as folder:
            run_warm_start(model, config, Path(folder))
        model.warm_start_seconds = time.perf_counter() - start  # counted as training time
        return model
    if run == "verified" or run in ESTIMATOR_RUNS:
        return build_model(config)
    return record_environment(RecurrentPPO(SLMLstmPolicy, build_env(config), **config.ppo_kwargs()), config)


def train_and_measure(env_id: str, run: str, args: argparse.Namespace) -> dict[str, Any]:
    from stable_baselines3.common.callbacks import BaseCallback

    from verl_sb3.task_evaluation import evaluate_task, task_prompts

    model = build(env_id, run, args)
    points: list[dict[str, float]] = []
    # a warm start's seconds count as training: it is part of the run's budget
    clock = {"train": getattr(model, "warm_start_seconds", 0.0), "since": time.perf_counter()}

    def evaluate() -> None:
        clock["train"] += time.perf_counter() - clock["since"]
        figures = evaluate_task(model, k=args.k, seed=len(points))
        points.append({"timesteps": model.num_timesteps, "seconds": clock["train"], **figures})
        line = (
            f"  {run:<10} {model.num_timesteps:>8,} steps {clock['train']:7.1f} s  test pass@1 {figures['pass@1']:6.1%}"
        )
        print(line, flush=True)
        clock["since"] = time.perf_counter()

    class Evaluations(BaseCallback):
        def _on_rollout_start(self) -> None:
            if self.num_timesteps >= len(points) * args.eval_every:
                evaluate()

        def _on_step(self) -> bool:
            return clock["train"] + time.perf_counter() - clock["since"] < args.seconds

    model.learn(args.timesteps, callback=Evaluations())
    evaluate()
    train_split = evaluate_task(model, prompts=task_prompts(model, "train"), k=1, seed=0, max_prompts=200)
    reached = {}
    for level in LEVELS:
        first = next((p for p in points if p["pass@1"] >= level), None)
        reached[f"{level:.0%}"] = (
            None if first is None else {"timesteps": first["timesteps"], "seconds": first["seconds"]}
        )
    return {
        "task": env_id,
        "run": run,
        "points": points,
        "reached": reached,
        "final": points[-1],
        "train_pass@1": train_split["pass@1"],
        "verification_rate": float(getattr(model, "verification_rate", float("nan"))),
    }


def _cell(reached: dict | None) -> str:
    return "not reached" if reached is None else f"{reached['timesteps']:,} ({reached['seconds']:.0f} s)"


def report(results: list[dict[str, Any]]) -> str:
    lines = [
        f"{'task':<22} {'run':<10} " + " ".join(f"{'to ' + f'{lv:.0%}':>20}" for lv in LEVELS)
        + f" {'final test':>10} {'train':>6} {'steps':>9} {'seconds':>8}"
    ]  # fmt: skip
    for r in results:
        final = r["final"]
        lines.append(
            f"{r['task']:<22} {r['run']:<10} "
            + " ".join(f"{_cell(r['reached'][f'{lv:.0%}']):>20}" for lv in LEVELS)
            + f" {final['pass@1']:>10.1%} {r['train_pass@1']:>6.1%} {final['timesteps']:>9,} {final['seconds']:>8.1f}"
        )
    by_key = {(r["task"], r["run"]): r for r in results}
    for task in dict.fromkeys(r["task"] for r in results):
        verified, unverified = by_key.get((task, "verified")), by_key.get((task, "unverified"))
        if verified and unverified:
            a, b = verified["reached"]["90%"], unverified["reached"]["90%"]
            ratio = f"{a['seconds'] / b['seconds']:.2f}x" if a and b else "n/a (one run did not reach 90 %)"
            lines.append(f"  {task}: seconds to 90 %, verified / unverified: {ratio}")
    return "\n".join(lines)


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["task"] for r in results))
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4.2), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for r in (r for r in results if r["task"] == task):
            steps = [p["timesteps"] for p in r["points"]]
            ax.plot(steps, [p["pass@1"] for p in r["points"]], "o-", ms=3, label=f"{r['run']} (test)")
        for level in LEVELS:
            ax.axhline(level, color="gray", ls=":", lw=0.8)
        ax.set(title=f"{task}: test pass@1", xlabel="environment steps", ylabel="exact answers", ylim=(0, 1.02))
        ax.legend(loc="center right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    parser.add_argument("--runs", nargs="+", choices=RUNS + ESTIMATOR_RUNS + WARM_START_RUNS, default=list(RUNS))
    parser.add_argument("--warm-start-share", type=float, default=0.1, help="warm_start: share of the train split")
    parser.add_argument("--warm-start-epochs", type=int, default=20, help="warm_start: passes over its records")
    parser.add_argument("--group-size", type=int, default=8, help="environments per group (default 8)")
    parser.add_argument("--timesteps", type=int, default=400_000, help="steps per run at most (default 400,000)")
    parser.add_argument("--seconds", type=float, default=600.0, help="training seconds per run at most (default 600)")
    parser.add_argument("--eval-every", type=int, default=20_000, help="steps between evaluations (default 20,000)")
    parser.add_argument("--k", type=int, default=4, help="answers per test prompt at each evaluation (default 4)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="torch threads per run")
    parser.add_argument("--quick", action="store_true", help="tiny runs, for a smoke test")
    parser.add_argument("--output", type=Path, default=OUTPUT_DIR / "tasks.json", help="the JSON file (and .png)")
    args = parser.parse_args(argv)
    if args.quick:
        args.timesteps, args.eval_every, args.k = 1_024, 512, 1
    import torch as th

    th.set_num_threads(args.threads)
    print(f"load average {os.getloadavg()[0]:.2f} at start; {args.threads} torch threads per run", flush=True)
    results = []
    for task in args.tasks:
        print(task, flush=True)
        results.extend(train_and_measure(task, run, args) for run in args.runs)
    print()
    print(report(results))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(
        json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results}, indent=2)
    )
    plot(results, args.output.with_suffix(".png"))
    print(f"\nWrote {args.output} and {args.output.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
