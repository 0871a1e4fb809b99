"""The whole RLHF loop, small: pairs, a simulated labeller, a Bradley-Terry reward model, verified RL against it.

The labeller's hidden preference, the gold score the learner never sees: a completion earns one
point for each distinct nature word it names (river, mountain, forest, ocean) and loses half a
point for each word that repeats one before it. Of two completions the labeller prefers the one
with the higher gold score, and calls equal scores a tie.

1. The initial policy is the untrained verified SLM on TextGen-v0 (also the KL reference).
2. ``--pairs`` pairs of its completions are sampled (:func:`verl_sb3.rlhf.sample_pairs`) and
   labelled by the simulated labeller (:func:`verl_sb3.rlhf.label_pairs`) into ``preferences.jsonl``.
3. A :class:`~verl_sb3.rlhf.SequenceRewardModel` is fitted to them with the Bradley-Terry loss, a
   held-out split and early stopping, saved (``config.json`` and ``model.safetensors``) and loaded
   back as a reward component.
4. The verified SLM trains on TextGen-v0 whose reward is only the reward model's score of each
   finished sequence (the built-in components weighted 0), with the reference-KL penalty
   (``--ref-kl-coef``) and the default run's settings but for 32 sequences per rollout (more
   updates per step); every ``--eval-freq`` steps the proxy reward, the gold score and the KL to
   the reference are measured on fresh samples.
5. It prints the held-out preference accuracy, the gold score and the proxy reward before and after,
   the KL to the reference and a few completions, and writes ``results.json`` and
   ``overoptimisation.png``. Given several ``--ref-kl-coef``, step 4 runs once for each from the
   same initial policy and reward model, and ``sweep.png`` puts their gold scores side by side.

    python examples/rlhf.py [--short] [--pairs 4000] [--total-timesteps 200000] [--ref-kl-coef 0.2 ...]
                            [--n-envs 32] [--seed 0] [--output-dir results/rlhf]

``--short`` runs every step on a few hundred pairs and steps (about a minute).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

import torch as th

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from textenv_gym.dynamics import TextGenConfig
from textenv_gym.sb3_vec_env import make_textgen_vec_env
from verl_sb3 import VerifiedRecurrentPPO
from verl_sb3.app.config import TrainConfig
from verl_sb3.generation import generate
from verl_sb3.rlhf import (
    GoldScoreCallback,
    environment_settings,
    fit_reward_model,
    label_pairs,
    load_reward_model,
    plot_overoptimisation,
    read_preferences,
    sample_pairs,
    save_reward_model,
)
from verl_sb3.warmup import CriticWarmupCallback

NATURE_WORDS = frozenset({"river", "mountain", "forest", "ocean"})
BUILT_IN = ("diversity", "repetition", "forbidden")


def gold_score(prompt: str, completion: str) -> float:
    """The hidden preference: +1 per distinct nature word, -0.5 per word repeating an earlier one."""
    words = completion.split()
    return len(NATURE_WORDS & set(words)) - 0.5 * (len(words) - len(set(words)))


def simulated_labeller(prompt: str, a: str, b: str) -> str:
    """The person the example plays: the completion with the higher gold score, or a tie."""
    gold_a, gold_b = gold_score(prompt, a), gold_score(prompt, b)
    return "a" if gold_a > gold_b else "b" if gold_b > gold_a else "tie"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--short", action="store_true", help="a quick run: 300 pairs, 10,240 steps")
    parser.add_argument("--pairs", type=int, help="pairs to label (default 4000; --short 300)")
    parser.add_argument("--total-timesteps", type=int, help="RL steps (default 200000; --short 10240)")
    parser.add_argument("--eval-freq", type=int, help="steps between measurements (default 10240; --short 2560)")
    parser.add_argument(
        "--ref-kl-coef", type=float, nargs="+", default=[0.2], help="KL penalty to the reference (default 0.2)"
    )
    parser.add_argument("--n-envs", type=int, default=32, help="sequences per rollout (default 32)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", default="results/rlhf")
    args = parser.parse_args(argv)
    args.pairs = args.pairs or (300 if args.short else 4000)
    args.total_timesteps = args.total_timesteps or (10_240 if args.short else 200_000)
    args.eval_freq = args.eval_freq or (2560 if args.short else 10_240)
    return args


def job_settings(args: argparse.Namespace, ref_kl_coef: float) -> TrainConfig:
    """The default run's settings, with the example's size and KL coefficient."""
    quick = dict(critic_warmup=2) if args.short else {}  # updates of the policy within the short run
    return TrainConfig(
        total_timesteps=args.total_timesteps, seed=args.seed, ref_kl_coef=ref_kl_coef, n_envs=args.n_envs, **quick
    )


def initial_model(settings: TrainConfig, environment: TextGenConfig) -> VerifiedRecurrentPPO:
    """The untrained verified SLM (the same weights for every seed-equal call)."""
    model = VerifiedRecurrentPPO(
        "SLMLstmPolicy",
        make_textgen_vec_env(settings.n_envs, seed=settings.seed, **environment.as_kwargs()),
        **settings.ppo_kwargs(),
        **settings.estimator_kwargs(),
        **settings.verification_kwargs(),
    )
    model.env_kwargs = environment.as_kwargs()  # generation and evaluation on the environment without the proxy
    return model


def label_and_fit(args: argparse.Namespace, environment: TextGenConfig, output: Path) -> dict:
    """Steps 1-3: pairs from the initial policy, labelled, and the reward model fitted, saved and loaded."""
    preferences_file = output / "preferences.jsonl"
    preferences_file.unlink(missing_ok=True)
    model = initial_model(job_settings(args, args.ref_kl_coef[0]), environment)
    label_pairs(sample_pairs(model, args.pairs, seed=args.seed), simulated_labeller, preferences_file, "simulated")
    preferences = read_preferences(preferences_file)
    ties = sum(preference.choice == "tie" for preference in preferences)
    print(f"labelled {len(preferences)} pairs ({ties} ties) in {preferences_file}", flush=True)
    fit = fit_reward_model(preferences, environment, seed=args.seed)
    save_reward_model(
        fit.module, output / "reward_model", environment_settings(environment), fit.summary(), overwrite=True
    )
    accuracy = fit.best["held_out_accuracy"]
    print(
        f"reward model: held-out preference accuracy {100 * accuracy:.1f} % on {fit.n_held_out} pairs "
        f"(best epoch {fit.best_epoch})",
        flush=True,
    )
    return {"pairs": len(preferences), "ties": ties, "held_out_accuracy": accuracy, "held_out_pairs": fit.n_held_out}


def train_against(args: argparse.Namespace, environment: TextGenConfig, ref_kl_coef: float, output: Path) -> dict:
    """Step 4 for one KL coefficient: RL on the reward model alone, with proxy, gold and KL measured."""
    settings = job_settings(args, ref_kl_coef)
    model = initial_model(settings, environment)
    reward_model = load_reward_model(output / "reward_model")
    proxy_environment = {
        **environment.as_kwargs(),
        "reward_fns": {"reward_model": reward_model},
        "reward_weights": dict.fromkeys(BUILT_IN, 0.0),
    }
    model.set_env(make_textgen_vec_env(settings.n_envs, seed=args.seed, **proxy_environment))
    samples = 200 if args.short else 500
    gold = GoldScoreCallback(reward_model, gold_score, args.eval_freq, samples, seed=args.seed, verbose=1)
    model.learn(args.total_timesteps, callback=[CriticWarmupCallback(settings.critic_warmup), gold])
    before, after = gold.history[0], gold.history[-1]
    peak = max(gold.history, key=lambda row: row["gold"])
    texts = generate(model, num_sequences=5, seed=args.seed).texts
    report = model.verification_report
    return {
        "ref_kl_coef": ref_kl_coef,
        "timesteps": model.num_timesteps,
        "gold_before": before["gold"],
        "gold_after": after["gold"],
        "gold_peak": peak["gold"],
        "gold_peak_timesteps": peak["timesteps"],
        "proxy_before": before["proxy"],
        "proxy_after": after["proxy"],
        "kl_after": after["kl"],
        "updates": report.n_verified,
        "updates_rolled_back": report.n_rolled_back,
        "updates_undone": report.n_undone,
        "rolled_back_by": dict(
            Counter(
                failed_check
                for record in model.verification_log
                if record["rolled_back"]
                for failed_check in failed_checks(record)
            )
        ),
        "samples": [{"text": text, "gold": gold_score("", text)} for text in texts],
        "history": gold.history,
    }


def failed_checks(record: dict) -> list[str]:
    """The checks an update of the verification log failed at its full step."""
    return [name for name, check in record["checks"].items() if not check["passed"]]


def plot_sweep(runs: list[dict], path: Path) -> None:
    """Gold score and proxy reward against sqrt(KL to the reference), one colour per KL coefficient."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    figure, (ax_gold, ax_proxy) = plt.subplots(1, 2, figsize=(11, 4.2))
    for run in runs:
        root_kl = np.sqrt([max(row["kl"], 0.0) for row in run["history"]])
        label = f"ref_kl_coef {run['ref_kl_coef']:g}"
        ax_gold.plot(root_kl, [row["gold"] for row in run["history"]], "o", ms=4, alpha=0.7, label=label)
        ax_proxy.plot(root_kl, [row["proxy"] for row in run["history"]], "o", ms=4, alpha=0.7, label=label)
    for ax, name in ((ax_gold, "gold score (the labeller's rule)"), (ax_proxy, "proxy reward (the reward model)")):
        ax.set(xlabel="sqrt(KL to the reference), nats^0.5", ylabel=name, title=f"{name.split(' (')[0]} against KL")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    th.set_num_threads(1)
    started = time.perf_counter()
    environment = TextGenConfig(**job_settings(args, args.ref_kl_coef[0]).textgen.as_kwargs())
    results = label_and_fit(args, environment, output)
    results["runs"] = [train_against(args, environment, coefficient, output) for coefficient in args.ref_kl_coef]
    results["seconds"] = time.perf_counter() - started
    (output / "results.json").write_text(json.dumps(results, indent=2))
    plot_overoptimisation(results["runs"][0]["history"], output / "overoptimisation.png", "gold: the labeller's rule")
    if len(results["runs"]) > 1:
        plot_sweep(results["runs"], output / "sweep.png")
    for run in results["runs"]:
        for sample in run["samples"][:3]:
            print(f"  gold {sample['gold']:+.1f}: {sample['text']}")
        print(
            f"ref_kl_coef {run['ref_kl_coef']:g}: gold score {run['gold_before']:.3f} -> {run['gold_after']:.3f} "
            f"(peak {run['gold_peak']:.3f} at {run['gold_peak_timesteps']} steps); proxy {run['proxy_before']:.3f} "
            f"-> {run['proxy_after']:.3f}; KL to the reference {run['kl_after']:.3f} nats; "
            f"{run['updates_rolled_back']} of {run['updates']} updates rolled back"
        )
    print(f"{results['seconds']:.0f} s; outputs in {output}/")
    return results


if __name__ == "__main__":
    main()
