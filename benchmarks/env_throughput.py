"""Environment steps per second of TextGen-v0: scalar, SB3 DummyVecEnv and the two native batched envs.

    python benchmarks/env_throughput.py            # full run (~0.5 s per repeat, 5 repeats)
    python benchmarks/env_throughput.py --quick    # smoke test: tiny durations

Measured, for N = 64 and 1024 environments (``--num-envs``):

- ``scalar``: one ``gym.make("TextGen-v0")`` env (with Gymnasium's default wrappers), reset when done;
- ``DummyVecEnv``: SB3's ``DummyVecEnv`` of N ``gym.make`` scalar envs;
- ``TextGenVectorEnv``: Gymnasium's native vector env (``gym.make_vec(..., "vector_entry_point")``);
- ``TextGenVecEnv``: the native SB3 ``VecEnv``.

Actions are random valid token ids generated before timing. Each figure is the median over
``--repeats`` timed runs of about ``--seconds`` each, after a warm-up; one environment step is
one token appended to one sequence (a batched step of N environments counts N).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

try:
    import textenv_gym
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import textenv_gym  # noqa: F401

import gymnasium as gym
from stable_baselines3.common.vec_env import DummyVecEnv

from textenv_gym.sb3_vec_env import TextGenVecEnv

TARGET_RATIO = 20.0
TARGET_NUM_ENVS = 64
ACTION_BLOCKS = 512  # pre-generated batches of actions, cycled through


def measure(
    step: Callable[[object], None], actions: list, envs_per_call: int, seconds: float, repeats: int, warmup: float
) -> float:
    """Median environment steps per second of ``step`` over ``repeats`` runs of about ``seconds``."""
    count = len(actions)

    def run(calls: int) -> float:
        start = time.perf_counter()
        for k in range(calls):
            step(actions[k % count])
        return time.perf_counter() - start

    # warm-up, which also estimates the cost of one call
    calls, elapsed = 1, run(1)
    deadline = time.perf_counter() + warmup
    while time.perf_counter() < deadline or elapsed < 1e-3:
        calls *= 2
        elapsed = run(calls)
    calls = max(1, round(calls * seconds / elapsed))
    rates = [calls * envs_per_call / run(calls) for _ in range(repeats)]
    return statistics.median(rates)


def scalar_step(env: gym.Env) -> Callable[[int], None]:
    def step(action: int) -> None:
        if env.step(action)[2]:
            env.reset()

    return step


def bench_scalar(args: argparse.Namespace, rng: np.random.Generator) -> float:
    env = gym.make("TextGen-v0")
    env.reset(seed=0)
    actions = rng.integers(0, env.action_space.n, size=ACTION_BLOCKS * 16).tolist()
    return measure(scalar_step(env), actions, 1, args.seconds, args.repeats, args.warmup)


def bench_batched(num_envs: int, args: argparse.Namespace, rng: np.random.Generator) -> dict[str, float]:
    actions = list(rng.integers(0, 50, size=(ACTION_BLOCKS, num_envs), dtype=np.int64))
    results = {}

    dummy = DummyVecEnv([lambda: gym.make("TextGen-v0") for _ in range(num_envs)])
    dummy.reset()
    results["DummyVecEnv"] = measure(dummy.step, actions, num_envs, args.seconds, args.repeats, args.warmup)
    dummy.close()

    vector = gym.make_vec("TextGen-v0", num_envs=num_envs, vectorization_mode="vector_entry_point")
    assert type(vector).__name__ == "TextGenVectorEnv"
    vector.reset(seed=0)
    results["TextGenVectorEnv"] = measure(vector.step, actions, num_envs, args.seconds, args.repeats, args.warmup)

    sb3 = TextGenVecEnv(num_envs)
    sb3.reset()
    results["TextGenVecEnv"] = measure(sb3.step, actions, num_envs, args.seconds, args.repeats, args.warmup)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny durations, for a smoke test")
    parser.add_argument("--seconds", type=float, default=None, help="duration of one timed run (default 0.5)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per figure, median reported (default 5)")
    parser.add_argument("--num-envs", type=int, nargs="+", default=[64, 1024], help="batch sizes (default 64 1024)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the pre-generated actions")
    args = parser.parse_args(argv)
    if args.seconds is None:
        args.seconds = 0.01 if args.quick else 0.5
    if args.repeats is None:
        args.repeats = 3 if args.quick else 5
    if args.seconds <= 0 or args.repeats < 1:
        parser.error("--seconds must be positive and --repeats at least 1")
    args.warmup = min(0.2, args.seconds)
    rng = np.random.default_rng(args.seed)

    print(
        f"TextGen-v0 environment steps per second (median of {args.repeats} runs of ~{args.seconds:g} s; "
        f"numpy {np.__version__}, gymnasium {gym.__version__})"
    )
    print(f"{'scalar gym.make (1 env)':<34}{bench_scalar(args, rng):>14,.0f} steps/s")
    ratio_at_target = None
    for num_envs in args.num_envs:
        results = bench_batched(num_envs, args, rng)
        print(f"N = {num_envs}")
        for name, rate in results.items():
            print(f"  {name:<32}{rate:>14,.0f} steps/s")
        native, sb3 = (results[name] / results["DummyVecEnv"] for name in ("TextGenVectorEnv", "TextGenVecEnv"))
        print(f"  ratio TextGenVectorEnv / DummyVecEnv: {native:.1f}x")
        print(f"  ratio TextGenVecEnv / DummyVecEnv:    {sb3:.1f}x")
        if num_envs == TARGET_NUM_ENVS:
            ratio_at_target = native
    if ratio_at_target is None:
        print(f"target (TextGenVectorEnv >= {TARGET_RATIO:g}x DummyVecEnv at {TARGET_NUM_ENVS} envs): not measured")
    else:
        verdict = "MET" if ratio_at_target >= TARGET_RATIO else "NOT MET"
        print(
            f"target (TextGenVectorEnv >= {TARGET_RATIO:g}x DummyVecEnv at {TARGET_NUM_ENVS} envs): "
            f"{verdict} ({ratio_at_target:.1f}x)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
