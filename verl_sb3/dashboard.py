"""The training dashboard: four plots in one PNG."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


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
) -> Path:
    """Episode rewards (raw and moving average), training loss, verification rate, and the reward
    distribution early against late in training; saved to ``path``."""
    path = Path(path)
    fig, axes = plt.subplots(2, 2, figsize=(13, 8.5))
    ax_reward, ax_loss, ax_rate, ax_hist = axes.flat
    returns = np.asarray(episode_returns, dtype=float)
    steps = np.asarray(episode_timesteps, dtype=float)

    ax_reward.plot(steps, returns, ".", ms=1.5, alpha=0.25, color="tab:blue", label="episode return")
    window = max(1, len(returns) // 50)
    # Episodes of all environments end on the same timesteps: one point per timestep (the average after
    # its last episode), or the line would draw a vertical bar at each of them.
    last_of_step = np.flatnonzero(np.append(np.diff(steps) != 0, True)) if len(steps) else np.zeros(0, dtype=int)
    ax_reward.plot(steps[last_of_step], moving_average(returns, window)[last_of_step], color="tab:blue", lw=2,
                   label=f"moving average ({window} episodes)")
    if optimum is not None:
        ax_reward.axhline(optimum, color="tab:green", ls="--", lw=1, label=f"optimum {optimum:g}")
    if random_baseline is not None:
        ax_reward.axhline(random_baseline, color="tab:red", ls=":", lw=1, label=f"uniform random {random_baseline:g}")
    if len(returns):
        # "is not None", not "or": an optimum or a baseline of 0.0 is a real value
        low = min([np.percentile(returns, 1), *([random_baseline] if random_baseline is not None else [])])
        high = max([returns.max(), *([optimum] if optimum is not None else [])])
        ax_reward.set_ylim(low - 0.5, high + 0.5)
    ax_reward.set(title="Episode rewards", xlabel="timesteps", ylabel="return")
    _legend(ax_reward, loc="lower right", fontsize=8)

    update_steps = [u["timesteps"] for u in updates]
    for key, label in (("loss", "total loss"), ("value_loss", "value loss"), ("policy_gradient_loss", "policy-gradient loss")):
        values = [u.get(key, np.nan) for u in updates]
        if np.isfinite(values).any():
            ax_loss.plot(update_steps, values, lw=1.2, label=label)
    ax_loss.set(title="Training loss (accepted updates)", xlabel="timesteps", ylabel="loss")
    _legend(ax_loss, fontsize=8)

    accepted = np.array([float(u["accepted"] and u["backtracks"] == 0) for u in updates])
    running = np.cumsum(accepted) / np.arange(1, len(accepted) + 1) if len(accepted) else accepted
    ax_rate.plot(update_steps, running * 100, color="tab:purple", lw=2, label="accepted at full step (running)")
    rolled = [s for s, u in zip(update_steps, updates) if u["rolled_back"]]
    backtracked = [s for s, u in zip(update_steps, updates) if u["accepted"] and u["backtracks"]]
    ax_rate.plot(rolled, [2] * len(rolled), "v", color="tab:red", label=f"rolled back ({len(rolled)})")
    ax_rate.plot(backtracked, [5] * len(backtracked), "^", color="tab:orange", label=f"backtracked ({len(backtracked)})")
    undone_counts = [u.get("n_undone", 0) for u in updates]
    undone = [s for s, before, now in zip(update_steps[1:], undone_counts, undone_counts[1:]) if now > before]
    if undone:  # at the update that followed each undone one
        ax_rate.plot(undone, [8] * len(undone), "x", color="tab:brown", label=f"undone on the next rollout ({undone_counts[-1]})")
    ax_rate.axhline(95, color="gray", ls="--", lw=1, label="target 95 %")
    ax_rate.set(title="Verification rate", xlabel="timesteps", ylabel="% of updates", ylim=(0, 105))
    _legend(ax_rate, loc="center right", fontsize=8)

    tenth = max(1, len(returns) // 10)
    early, late = returns[:tenth], returns[-tenth:]
    if len(returns):
        bins = np.linspace(min(returns.min(), 0), max(returns.max(), optimum if optimum is not None else 0) + 1e-9, 40)
        ax_hist.hist(early, bins=bins, alpha=0.6, color="tab:red", label=f"first 10 % (mean {early.mean():.2f})")
        ax_hist.hist(late, bins=bins, alpha=0.6, color="tab:green", label=f"last 10 % (mean {late.mean():.2f})")
    ax_hist.set(title="Reward distribution, early vs late", xlabel="episode return", ylabel="episodes")
    _legend(ax_hist, fontsize=8)

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
