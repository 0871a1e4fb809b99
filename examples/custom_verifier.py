"""Add your own verification check to verified PPO by subclassing ``VerifiedRecurrentPPO``.

``VerifiedRecurrentPPO.verify(ctx)`` returns the results of every check on an update, by name; the
update is accepted when all pass, otherwise it is backtracked (shorter steps) and, if no step
passes, rolled back. Overriding ``verify`` and adding a result is all a new check takes. Here,
``max_kl_per_state``: the built-in ``kl`` check bounds the *mean* KL(old || new) over the rollout's
states; this one bounds the *largest* per-state KL (``ctx.kl.max()``), so that no single context
(prompt) can have its next-token distribution changed abruptly while the average stays small.

The script trains briefly, prints how many updates the check vetoed (from ``model.verification_log``),
then saves the model and reloads it with the subclass's ``load``: the bound and the log come back.

    python examples/custom_verifier.py [--total-timesteps 16000] [--max-kl-per-state 0.25] [--output-dir DIR]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch as th

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from textenv_gym.sb3_vec_env import make_textgen_vec_env
from verl_sb3 import CheckResult, UpdateContext, VerifiedRecurrentPPO
from verl_sb3.checkpoints import save_checkpoint

CHECK = "max_kl_per_state"


class MaxStateKLRecurrentPPO(VerifiedRecurrentPPO):
    """``VerifiedRecurrentPPO`` with one more check, ``max_kl_per_state``: the largest per-state
    KL(old || new) over the rollout must stay at most ``max_kl_per_state``.

    :param max_kl_per_state: the bound, > 0. Every other argument is ``VerifiedRecurrentPPO``'s.
    """

    def __init__(self, *args: Any, max_kl_per_state: float = 0.25, **kwargs: Any) -> None:
        if (
            isinstance(max_kl_per_state, bool)
            or not isinstance(max_kl_per_state, (int, float))
            or not math.isfinite(max_kl_per_state)
            or max_kl_per_state <= 0
        ):
            raise ValueError(f"max_kl_per_state: expected a finite number > 0, got {max_kl_per_state!r}")
        self.max_kl_per_state = float(max_kl_per_state)  # saved with the model, restored by load()
        super().__init__(*args, **kwargs)

    def verify(self, ctx: UpdateContext) -> dict[str, CheckResult]:
        results = super().verify(ctx)
        largest = ctx.kl.max().item() if ctx.kl.numel() else 0.0
        results[CHECK] = CheckResult(
            passed=math.isfinite(largest) and largest <= self.max_kl_per_state,
            value=largest,
            threshold=self.max_kl_per_state,
            message=f"largest per-state KL {largest:.4g}",
        )
        return results


def veto_counts(verification_log: list[dict[str, Any]], check: str = CHECK) -> dict[str, int]:
    """How many updates ``check`` failed at the full step, and what became of them."""
    vetoed = [entry for entry in verification_log if not entry["checks"][check]["passed"]]
    alone = [entry for entry in vetoed if all(r["passed"] for name, r in entry["checks"].items() if name != check)]
    return {
        "updates": len(verification_log),
        "vetoed": len(vetoed),
        "vetoed_alone": len(alone),
        "accepted_after_backtracking": sum(entry["accepted"] for entry in vetoed),
        "rolled_back": sum(entry["rolled_back"] for entry in vetoed),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--total-timesteps", type=int, default=16_000, help="training steps (default 16000)")
    parser.add_argument("--max-kl-per-state", type=float, default=0.25, help="bound of the new check (default 0.25)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", default="results/custom_verifier", help="where the model is saved")
    args = parser.parse_args(argv)
    if args.total_timesteps < 1:
        parser.error("--total-timesteps must be >= 1")
    th.set_num_threads(1)

    model = MaxStateKLRecurrentPPO(
        "SLMLstmPolicy",
        make_textgen_vec_env(8, seed=args.seed),
        max_kl_per_state=args.max_kl_per_state,
        n_steps=20,
        batch_size=80,
        n_epochs=4,
        learning_rate=1e-3,
        gamma=1.0,
        seed=args.seed,
        policy_kwargs=dict(lstm_hidden_size=64, n_lstm_layers=1, embedding_dim=32),
    )
    start = time.perf_counter()
    model.learn(args.total_timesteps)
    counts = veto_counts(model.verification_log)
    print(
        f"Trained {model.num_timesteps} timesteps in {time.perf_counter() - start:.1f} s, {counts['updates']} updates; "
        f"verification rate {model.verification_rate:.1%}."
    )
    print(
        f"'{CHECK}' (largest per-state KL <= {model.max_kl_per_state:g}) vetoed {counts['vetoed']} of "
        f"{counts['updates']} updates at the full step ({counts['vetoed_alone']} of them passed every other check): "
        f"{counts['accepted_after_backtracking']} accepted after backtracking, {counts['rolled_back']} rolled back."
    )
    example = next((e for e in model.verification_log if not e["checks"][CHECK]["passed"]), None)
    if example is not None:
        print(f"  e.g. update {example['update']}: {example['reason']}")

    path = save_checkpoint(model, Path(args.output_dir) / "max_kl_model.zip")
    loaded = MaxStateKLRecurrentPPO.load(path)
    assert type(loaded) is MaxStateKLRecurrentPPO and loaded.max_kl_per_state == model.max_kl_per_state
    assert veto_counts(loaded.verification_log) == counts
    print(
        f"Saved to {path} and reloaded with {type(loaded).__name__}.load: max_kl_per_state "
        f"{loaded.max_kl_per_state:g}, {len(loaded.verification_log)} log entries, "
        f"verification rate {loaded.verification_rate:.1%}."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
