"""The training dashboard: its plots in one PNG."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from verl_sb3.app.files import replace_with


def moving_average(values: Sequence[float], window: int) -> np.ndarray:
    """Trailing mean over ``window`` values (shorter at the start)."""
    values = np.asarray(values, dtype=float)
    if not len(values):
        return values
    cumulative = np.cumsum(np.insert(values, 0, 0.0))
    index = np.arange(1, len(values) + 1)
    start = np.maximum(index - window, 0)
    return (cumulative[index] - cumulative[start]) / (index - start)


def _legend(ax, **kwargs) -> None:
    """A legend, when the plot has labelled artists (e.g. no episode or update yet: none, and no warning)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**kwargs)


def plot_dashboard(
    episode_timesteps: Sequence[int],
    episode_returns: Sequence[float],
    updates: Sequence[dict],
    path: str | Path,
    optimum: float | None = None,
    random_baseline: float | None = None,
    evaluations: Sequence[dict] = (),
    target_entropy: float | None = None,
    kl_threshold: float | None = None,
    random_repetition: float | None = None,
    gold_history: Sequence[dict] = (),
    gold_label: str = "gold score",
) -> Path:
    """The training dashboard, saved to ``path``: episode rewards (raw and moving average), the
    periodic evaluations (return and repetition, against the uniform random policy's), policy
    entropy (with its target), the exact KL of each update (with its threshold), the training
    loss and the verification rate, and the reward distribution early against late in training; with
    ``gold_history`` (:class:`verl_sb3.rlhf.GoldScoreCallback`'s), a row of proxy reward against gold score."""
    path = Path(path)
    fig, axes = plt.subplots(4 if gold_history else 3, 2, figsize=(13, 16 if gold_history else 12))
    (ax_reward, ax_eval), (ax_entropy, ax_kl), (ax_loss, ax_rate) = axes[:3]
    if gold_history:
        from verl_sb3.rlhf.overoptimisation import draw_overoptimisation

        draw_overoptimisation(axes[3], gold_history, gold_label)
    returns = np.asarray(episode_returns, dtype=float)
    steps = np.asarray(episode_timesteps, dtype=float)
    if gold_history:  # the episodes' rewards are the reward model's: TextGen-v0's optimum and baseline do not apply
        _plot_rewards(ax_reward, steps, returns, None, None)
        ax_reward.set_title("Episode rewards: the reward model's (proxy)")
    else:
        _plot_rewards(ax_reward, steps, returns, optimum, random_baseline)
    _plot_evaluations(ax_eval, evaluations, optimum, random_baseline, random_repetition)
    _plot_update_figure(
        ax_entropy, updates, "entropy", "Policy entropy (nats)", "mean entropy", target_entropy, "target"
    )
    _plot_update_figure(ax_kl, updates, "kl", "KL of each update", "exact KL(old || new)", kl_threshold, "threshold")
    _plot_losses(ax_loss, updates)
    _plot_verification(ax_rate, updates)
    _plot_distribution(
        ax_rate.inset_axes([0.07, 0.3, 0.4, 0.45]), returns, None if gold_history else optimum
    )  # the rate's panel is mostly empty
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    replace_with(path, lambda temporary: fig.savefig(temporary, dpi=100))
    plt.close(fig)
    return path


def _plot_task_evaluations(ax, evaluations: Sequence[dict]) -> None:
    """A task's periodic evaluations on its test split: exact matches and the mean score."""
    steps = [e["timesteps"] for e in evaluations]
    ax.plot(steps, [e["pass@1"] for e in evaluations], "o-", color="tab:blue", ms=3, label="pass@1 (exact match)")
    ax.plot(steps, [e["pass@k"] for e in evaluations], "s--", color="tab:cyan", ms=3,
            label=f"pass@{evaluations[0]['k']}")  # fmt: skip
    ax.plot(steps, [e["mean_score"] for e in evaluations], "^-", color="tab:orange", ms=3, label="mean score")
    ax.axhline(0.95, color="gray", ls="--", lw=1, label="target pass@1 0.95")
    ax.set(title="Periodic evaluations (test split)", xlabel="timesteps", ylabel="share of answers", ylim=(0, 1.02))
    ax.legend(loc="lower right", fontsize=8)


def _plot_evaluations(ax, evaluations: Sequence[dict], optimum, random_baseline, random_repetition) -> None:
    if evaluations and "pass@1" in evaluations[0]:
        _plot_task_evaluations(ax, evaluations)
        return
    steps = [e["timesteps"] for e in evaluations]
    ax.plot(steps, [e["mean_return"] for e in evaluations], "o-", color="tab:blue", ms=3, label="mean return")
    if optimum is not None:
        ax.axhline(optimum, color="tab:green", ls="--", lw=1, label=f"optimum {optimum:g}")
    if random_baseline is not None:
        ax.axhline(random_baseline, color="tab:blue", ls=":", lw=1, label=f"random policy's return {random_baseline:g}")
    ax.set(title="Periodic evaluations", xlabel="timesteps", ylabel="mean return")
    twin = ax.twinx()
    repetition = [100 * e["repetition_rate"] for e in evaluations]
    twin.plot(steps, repetition, "s-", color="tab:red", ms=3, label="repetition")
    if random_repetition is not None:
        twin.axhline(100 * random_repetition, color="tab:red", ls=":", lw=1,
                     label=f"random policy's repetition {random_repetition:.3%}")  # fmt: skip
    twin.set_ylabel("repetition (% of sequences)", color="tab:red")
    # the random policy's line below the top, apart from the optimum's
    top = max([*repetition, 0.0, 150 * random_repetition if random_repetition is not None else 0.0])
    twin.set_ylim(0, 1.1 * top if top > 0 else 1.0)
    handles = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    if handles:
        ax.legend(handles=handles, loc="lower right", bbox_to_anchor=(1.0, 0.08), fontsize=8)  # above the zeros


def _plot_update_figure(
    ax, updates: Sequence[dict], key: str, title: str, label: str, line: float | None, line_name: str
) -> None:
    steps = [u["timesteps"] for u in updates]
    ax.plot(steps, [u.get(key, np.nan) for u in updates], lw=1.2, color="tab:purple", label=label)
    if line is not None:
        ax.axhline(line, color="gray", ls="--", lw=1, label=f"{line_name} {line:g}")
    ax.set(title=title, xlabel="timesteps")
    _legend(ax, fontsize=8)


def _plot_rewards(
    ax, steps: np.ndarray, returns: np.ndarray, optimum: float | None, random_baseline: float | None
) -> None:
    ax.plot(steps, returns, ".", ms=1.5, alpha=0.25, color="tab:blue", label="episode return")
    window = max(1, len(returns) // 50)
    # Episodes of all environments end on the same timesteps: one point per timestep (the average after
    # its last episode), or the line would draw a vertical bar at each of them.
    last_of_step = np.flatnonzero(np.append(np.diff(steps) != 0, True)) if len(steps) else np.zeros(0, dtype=int)
    average = moving_average(returns, window)[last_of_step]
    ax.plot(steps[last_of_step], average, color="tab:blue", lw=2, label=f"moving average ({window} episodes)")
    if optimum is not None:
        ax.axhline(optimum, color="tab:green", ls="--", lw=1, label=f"optimum {optimum:g}")
    if random_baseline is not None:
        ax.axhline(random_baseline, color="tab:red", ls=":", lw=1, label=f"uniform random {random_baseline:g}")
    if len(returns):
        # "is not None", not "or": an optimum or a baseline of 0.0 is a real value
        low = min([np.percentile(returns, 1), *([random_baseline] if random_baseline is not None else [])])
        high = max([returns.max(), *([optimum] if optimum is not None else [])])
        ax.set_ylim(low - 0.5, high + 0.5)
    ax.set(title="Episode rewards", xlabel="timesteps", ylabel="return")
    _legend(ax, loc="lower right", fontsize=8)


def _plot_losses(ax, updates: Sequence[dict]) -> None:
    update_steps = [u["timesteps"] for u in updates]
    shown = []
    for key, label in (
        ("loss", "total loss"),
        ("value_loss", "value loss"),
        ("policy_gradient_loss", "policy-gradient loss"),
    ):
        values = np.asarray([u.get(key, np.nan) for u in updates], dtype=float)
        if np.isfinite(values).any():
            ax.plot(update_steps, values, lw=1.2, label=label)
            shown.append(values[np.isfinite(values)])
    title = "Training loss (accepted updates)"
    if shown:  # the first updates' losses (an untrained critic's) would flatten the rest: the range of the others
        later = np.concatenate([values[len(values) // 10 + 1 :] for values in shown])
        if len(later):
            low, high = later.min(), later.max()
            margin = 0.1 * (high - low) or 0.1
            ax.set_ylim(low - margin, high + margin)
            if any(values.min() < low - margin or values.max() > high + margin for values in shown):
                title += ", the first updates' off the chart"
    ax.set(title=title, xlabel="timesteps", ylabel="loss")
    _legend(ax, fontsize=8)


def _plot_verification(ax, updates: Sequence[dict]) -> None:
    update_steps = [u["timesteps"] for u in updates]
    accepted = np.array([float(u["accepted"] and u["backtracks"] == 0) for u in updates])
    running = np.cumsum(accepted) / np.arange(1, len(accepted) + 1) if len(accepted) else accepted
    ax.plot(update_steps, running * 100, color="tab:purple", lw=2, label="accepted at full step (running)")
    rolled = [s for s, u in zip(update_steps, updates) if u["rolled_back"]]
    backtracked = [s for s, u in zip(update_steps, updates) if u["accepted"] and u["backtracks"]]
    ax.plot(rolled, [2] * len(rolled), "v", color="tab:red", label=f"rolled back ({len(rolled)})")
    ax.plot(backtracked, [5] * len(backtracked), "^", color="tab:orange", label=f"backtracked ({len(backtracked)})")
    undone_counts = [u.get("n_undone", 0) for u in updates]
    undone = [s for s, before, now in zip(update_steps[1:], undone_counts, undone_counts[1:]) if now > before]
    if undone:  # at the update that followed each undone one
        label = f"undone on the next rollout ({undone_counts[-1]})"
        ax.plot(undone, [8] * len(undone), "x", color="tab:brown", label=label)
    ax.axhline(95, color="gray", ls="--", lw=1, label="target 95 %")
    ax.set(title="Verification rate", xlabel="timesteps", ylabel="% of updates", ylim=(0, 105))
    _legend(ax, loc="center right", fontsize=8)


def _plot_distribution(ax, returns: np.ndarray, optimum: float | None) -> None:
    tenth = max(1, len(returns) // 10)
    early, late = returns[:tenth], returns[-tenth:]
    if len(returns):
        low = np.percentile(returns, 1)
        high = max(returns.max(), optimum if optimum is not None else returns.max()) + 1e-9
        bins = np.linspace(low, high, 30)
        ax.hist(early, bins=bins, alpha=0.6, color="tab:red", label=f"first 10 % (mean {early.mean():.2f})")
        ax.hist(late, bins=bins, alpha=0.6, color="tab:green", label=f"last 10 % (mean {late.mean():.2f})")
    ax.set_title("Episode returns, early vs late", fontsize=8)
    ax.tick_params(labelsize=7)
    _legend(ax, fontsize=7)
