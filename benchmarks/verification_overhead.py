"""Wall time per environment step of the verified algorithms against their parents, same run.

Each pair trains on identical settings and seeds; runs alternate (parent, verified, parent, ...)
so that machine load affects both alike, and the median of the repeats is compared.

    python benchmarks/verification_overhead.py            # full
    python benchmarks/verification_overhead.py --quick    # smoke test
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch as th
from sb3_contrib import RecurrentPPO
from stable_baselines3 import PPO

from textenv_gym.sb3_vec_env import make_textgen_vec_env
from verl_sb3 import VerifiedPPO, VerifiedRecurrentPPO
from verl_sb3.app.config import TrainConfig
from verl_sb3.policies import SLMLstmPolicy

TARGET_OVERHEAD = 0.05


def recurrent_kwargs(config: TrainConfig) -> dict:
    """The default training run's settings (without verification-only arguments)."""
    return config.ppo_kwargs()


def seconds_per_step(cls, policy, config: TrainConfig, timesteps: int, n_envs: int, **kwargs) -> float:
    env = make_textgen_vec_env(n_envs, seed=config.seed)
    model = cls(policy, env, **kwargs)
    start = time.perf_counter()
    model.learn(timesteps)
    return (time.perf_counter() - start) / model.num_timesteps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny runs, for a smoke test")
    parser.add_argument("--timesteps", type=int, default=None, help="environment steps per run")
    parser.add_argument("--repeats", type=int, default=None, help="runs per algorithm")
    args = parser.parse_args()
    th.set_num_threads(1)
    config = TrainConfig()
    timesteps = args.timesteps or (3 * config.n_envs * config.n_steps if args.quick else 100_000)
    repeats = args.repeats or (1 if args.quick else 5)
    base = recurrent_kwargs(config)
    ppo = {k: v for k, v in base.items() if k != "policy_kwargs"}
    sb3_defaults = {"seed": config.seed}
    sb3_rollout = 8 * 2048  # SB3's PPO defaults on 8 environments: one rollout
    # (name, environments, steps per run, parent, verified)
    pairs = [
        (
            "RecurrentPPO + SLMLstmPolicy (default training)",
            config.n_envs,
            timesteps,
            (RecurrentPPO, SLMLstmPolicy, base),
            (
                VerifiedRecurrentPPO,
                SLMLstmPolicy,
                dict(base, **{**config.verification_kwargs(), "target_entropy": None}),
            ),
        ),
        (
            "PPO + MlpPolicy (default training settings)",
            config.n_envs,
            timesteps,
            (PPO, "MlpPolicy", ppo),
            (VerifiedPPO, "MlpPolicy", dict(ppo, kl_threshold=config.kl_threshold)),
        ),
        (
            "PPO + MlpPolicy (SB3's PPO defaults: 8 envs, n_steps 2048, batch 64, 10 epochs)",
            8,
            sb3_rollout * (1 if args.quick else 4),
            (PPO, "MlpPolicy", sb3_defaults),
            (VerifiedPPO, "MlpPolicy", dict(sb3_defaults, kl_threshold=config.kl_threshold)),
        ),
    ]
    print(f"Verification overhead: {repeats} runs each, alternated, 1 thread")
    failed = False
    for name, n_envs, steps, parent, verified in pairs:
        times = {"parent": [], "verified": []}
        for _ in range(repeats):
            for label, (cls, policy, kwargs) in (("parent", parent), ("verified", verified)):
                times[label].append(seconds_per_step(cls, policy, config, steps, n_envs, **kwargs))
        parent_time, verified_time = statistics.median(times["parent"]), statistics.median(times["verified"])
        overhead = verified_time / parent_time - 1
        failed |= overhead > TARGET_OVERHEAD
        print(f"{name}, {steps:,} steps per run")
        print(f"  parent    {parent_time * 1e6:8.1f} us/step   ({parent[0].__name__})")
        print(f"  verified  {verified_time * 1e6:8.1f} us/step   ({verified[0].__name__})")
        print(
            f"  ratio     {verified_time / parent_time:8.3f}   overhead {overhead:+.1%} (target <= "
            f"{TARGET_OVERHEAD:.0%}): "
            f"{'MET' if overhead <= TARGET_OVERHEAD else 'NOT MET'}"
        )
        pair_ratios = sorted(v / p for p, v in zip(times["parent"], times["verified"]))
        print(
            f"  spread    each verified run over the parent run before it: {pair_ratios[0]:.3f} .. "
            f"{pair_ratios[-1]:.3f}"
        )
    print("all targets met" if not failed else "some targets not met")


if __name__ == "__main__":
    main()
