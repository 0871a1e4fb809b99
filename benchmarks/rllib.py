"""TextGen-v0 on Ray RLlib (verified PPO learner, 1 and 2 env runners) against the SB3 training, at one step budget.

    python benchmarks/rllib.py             # 60,000 steps per run (a few minutes on 2 cores)
    python benchmarks/rllib.py --quick     # smoke test: tiny runs

Runs one after the other on a local Ray (``ray.init(num_cpus=2)``):

- ``rllib-1``, ``rllib-2``: ``verl_sb3.rllib.ppo_config`` with 1 and 2 env runners, learning rate
  ``--lr``, train batches of ``--batch`` steps in minibatches of ``--minibatch``, 4 epochs;
- ``sb3``: the training job's model (``VerifiedRecurrentPPO`` + ``SLMLstmPolicy``, the default
  settings, ``--threads`` torch threads) for the same number of environment steps.

Every ``--eval-every`` steps each run samples ``--sequences`` sequences from its policy and
measures their mean return and repetition rate (sequences where the repetition rule fired), against
the uniform random policy (return 18.24, repetition 0.705 %). The table gives environment steps per
second of training (sampling and updates, evaluations excluded) and the final figures; a plot of
return and repetition against steps and a JSON file go to ``benchmarks/output/``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch as th

REPO_ROOT = Path(__file__).resolve().parent.parent
OUTPUT = REPO_ROOT / "benchmarks" / "output" / "rllib.json"
RANDOM_RETURN, RANDOM_REPETITION = 18.24, 0.00705


def sample_sequences(logits_of: Any, n: int, seed: int) -> dict[str, float]:
    """Mean return and repetition rate of ``n`` TextGen-v0 sequences sampled from ``logits_of(obs)``."""
    from textenv_gym.sb3_vec_env import TextGenVecEnv
    from verl_sb3.metrics import sequence_metrics

    env = TextGenVecEnv(n, seed=seed)
    obs, returns, tokens = env.reset(), np.zeros(n), []
    generator = th.Generator().manual_seed(seed)
    for _ in range(env.config.max_length):
        with th.no_grad():
            logits = logits_of(th.as_tensor(obs))
        actions = th.multinomial(th.softmax(logits.double(), dim=-1), 1, generator=generator).squeeze(1).numpy()
        obs, rewards, _, _ = env.step(actions)
        returns += rewards
        tokens.append(actions)
    sequences = np.stack(tokens, axis=1).tolist()
    repetition = sequence_metrics(sequences, env.config.forbidden_tokens, env.config.repetition_window)[
        "repetition_rate"
    ]
    return {"return": float(returns.mean()), "repetition": float(repetition)}


def run_rllib(runners: int, args: argparse.Namespace) -> dict[str, Any]:
    from ray.rllib.core.columns import Columns

    from verl_sb3.rllib import ppo_config

    config = ppo_config(num_env_runners=runners).training(
        lr=args.lr, train_batch_size_per_learner=args.batch, minibatch_size=args.minibatch, num_epochs=4
    )
    algo = config.build_algo()
    module = algo.learner_group._learner.module["default_policy"]
    points, train_seconds, steps, rolled_back = [], 0.0, 0, 0
    try:
        while True:
            if steps >= len(points) * args.eval_every:
                figures = sample_sequences(
                    lambda o: module.forward_inference({Columns.OBS: o})[Columns.ACTION_DIST_INPUTS],
                    args.sequences,
                    len(points),
                )
                points.append({"timesteps": steps, "seconds": train_seconds, **figures})
                print(
                    f"  rllib-{runners} {steps:>8,} steps {train_seconds:6.1f} s  return {figures['return']:.3f} "
                    f"repetition {figures['repetition']:.2%}",
                    flush=True,
                )
            if steps >= args.timesteps:
                break
            start = time.perf_counter()
            results = algo.train()
            train_seconds += time.perf_counter() - start
            steps = int(results["env_runners"]["num_env_steps_sampled_lifetime"])
            rolled_back += int(results["learners"]["verl/rolled_back"])
    finally:
        algo.stop()
    return {"run": f"rllib-{runners}", "points": points, "steps_per_s": steps / train_seconds, "undone": rolled_back}


def run_sb3(args: argparse.Namespace) -> dict[str, Any]:
    from stable_baselines3.common.callbacks import BaseCallback

    from verl_sb3.app.config import TrainConfig
    from verl_sb3.app.training import build_model
    from verl_sb3.generation import PolicyStepper, evaluation_mode

    th.set_num_threads(args.threads)
    model = build_model(TrainConfig(total_timesteps=args.timesteps, progress_bar=False, threads=args.threads))
    points: list[dict[str, float]] = []
    clock = {"train": 0.0, "since": time.perf_counter()}

    def evaluate() -> None:
        clock["train"] += time.perf_counter() - clock["since"]
        stepper = PolicyStepper(model, args.sequences)
        with evaluation_mode(model):
            figures = sample_sequences(lambda o: stepper.logits(o.numpy()), args.sequences, len(points))
        points.append({"timesteps": model.num_timesteps, "seconds": clock["train"], **figures})
        print(
            f"  sb3     {model.num_timesteps:>8,} steps {clock['train']:6.1f} s  return {figures['return']:.3f} "
            f"repetition {figures['repetition']:.2%}",
            flush=True,
        )
        clock["since"] = time.perf_counter()

    class Evaluations(BaseCallback):
        def _on_rollout_start(self) -> None:
            if self.num_timesteps >= len(points) * args.eval_every:
                evaluate()

        def _on_step(self) -> bool:
            return True

    model.learn(args.timesteps, callback=Evaluations())
    evaluate()
    return {"run": "sb3", "points": points, "steps_per_s": model.num_timesteps / clock["train"], "undone": 0}


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
    for r in results:
        steps = [p["timesteps"] for p in r["points"]]
        left.plot(steps, [p["return"] for p in r["points"]], "o-", ms=3, label=r["run"])
        right.plot(steps, [100 * p["repetition"] for p in r["points"]], "o-", ms=3, label=r["run"])
    left.axhline(RANDOM_RETURN, color="gray", ls=":", label="uniform random")
    right.axhline(100 * RANDOM_REPETITION, color="gray", ls=":", label="uniform random")
    left.set(title="TextGen-v0: mean return", xlabel="environment steps", ylabel="return (optimum 20)")
    right.set(title="repetition", xlabel="environment steps", ylabel="% of sequences")
    for ax in (left, right):
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--timesteps", type=int, default=60_000)
    parser.add_argument("--eval-every", type=int, default=10_000)
    parser.add_argument("--sequences", type=int, default=500)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch", type=int, default=4000)
    parser.add_argument("--minibatch", type=int, default=500)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the SB3 run")
    parser.add_argument("--quick", action="store_true", help="tiny runs, for a smoke test")
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args(argv)
    if args.quick:
        args.timesteps, args.eval_every, args.sequences, args.batch, args.minibatch = 800, 400, 20, 400, 100
    import ray

    th.set_num_threads(1)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        results = [run_rllib(1, args), run_rllib(2, args)]
    finally:
        ray.shutdown()
    results.append(run_sb3(args))
    print()
    print(f"{'run':<8} {'env steps/s':>11} {'final return':>12} {'repetition':>10} {'undone':>6}")
    for r in results:
        final = r["points"][-1]
        print(
            f"{r['run']:<8} {r['steps_per_s']:>11,.0f} {final['return']:>12.3f} {final['repetition']:>10.2%} "
            f"{r['undone']:>6}"
        )
    one, two = results[0]["steps_per_s"], results[1]["steps_per_s"]
    sb3 = results[2]["steps_per_s"]
    print(f"  2 env runners / 1: {two / one:.2f}x env steps per second; sb3 / rllib-2: {sb3 / two:.2f}x")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(
        json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results}, indent=2)
    )
    plot(results, args.output.with_suffix(".png"))
    print(f"Wrote {args.output} and {args.output.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
