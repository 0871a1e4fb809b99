"""The training job's recorder: episode returns, one CSV row per update, periodic evaluations and checkpoints."""

from __future__ import annotations

import csv
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
from stable_baselines3.common.callbacks import BaseCallback

from verl_sb3.app.config import TrainConfig
from verl_sb3.checkpoints import save_checkpoint
from verl_sb3.evaluation import evaluate_model


class TrainingRecorder(BaseCallback):
    """Collects episode returns, writes one CSV row per update, evaluates and checkpoints.

    Runs between rollouts, right after each update, when the figures of that update are final.
    """

    COLUMNS = (
        "update",
        "timesteps",
        "mean_episode_reward",
        "loss",
        "policy_gradient_loss",
        "value_loss",
        "entropy_loss",
        "approx_kl",
        "kl",
        "accepted",
        "backtracks",
        "rolled_back",
        "n_undone",
        "entropy",
        "verification_rate",
        "ref_kl",
        "kl_coef",
        "wall_time",
    )

    def __init__(self, config: TrainConfig, output: Path) -> None:
        super().__init__()
        self.config = config
        self.output = output
        self.episode_timesteps: list[int] = []
        self.episode_returns: list[float] = []
        self.updates: list[dict[str, Any]] = []
        self.evaluations: list[dict[str, float]] = []
        self.best_return = -math.inf
        self._next_eval = config.eval_freq
        self._next_checkpoint = config.checkpoint_freq
        self._recent: list[float] = []
        self._start = time.perf_counter()

    def _on_training_start(self) -> None:
        self._csv_file = open(self.output / "updates.csv", "w", newline="")  # noqa: SIM115 - open for the whole run
        self._csv = csv.DictWriter(self._csv_file, fieldnames=self.COLUMNS)
        self._csv.writeheader()

    def _on_step(self) -> bool:
        for info in self.locals["infos"]:
            episode = info.get("episode")
            if episode is not None:
                self.episode_timesteps.append(self.num_timesteps)
                self.episode_returns.append(float(episode["r"]))
                self._recent.append(float(episode["r"]))
        return True

    def _on_rollout_start(self) -> None:
        self._record_update()
        if self.num_timesteps >= self._next_eval:
            self._next_eval += self.config.eval_freq
            self._evaluate()
        if self.num_timesteps >= self._next_checkpoint:
            self._next_checkpoint += self.config.checkpoint_freq
            save_checkpoint(self.model, self.output / "model_checkpoints" / f"model_{self.num_timesteps}_steps.zip")

    def _on_training_end(self) -> None:
        self._record_update()
        self.close()

    def close(self) -> None:
        """Close the per-update CSV (idempotent)."""
        if getattr(self, "_csv_file", None) is not None and not self._csv_file.closed:
            self._csv_file.close()

    def _record_update(self) -> None:
        log = self.model.verification_log
        if len(self.updates) >= self.model.verification_report.n_verified or not log:
            return
        entry = log[-1]
        values = self.model.logger.name_to_value
        row = {
            "update": entry["update"],
            "timesteps": self.num_timesteps,
            "mean_episode_reward": float(np.mean(self._recent)) if self._recent else math.nan,
            "kl": entry["kl"],
            "accepted": int(entry["accepted"]),
            "backtracks": entry["backtracks"],
            "rolled_back": int(entry["rolled_back"]),
            # updates undone so far on the rollout after them (max_reuse_rise): an undo happens
            # after its update's row was written, so it is counted in the rows that follow
            "n_undone": self.model.n_undone,
            "entropy": entry["entropy"],
            "verification_rate": self.model.verification_rate,
            "wall_time": time.perf_counter() - self._start,
        }
        for name in ("ref_kl", "kl_coef"):  # of the rollout the update trained on (reference KL control)
            row[name] = float(values.get(f"verl/{name}", math.nan))
        for name in ("loss", "policy_gradient_loss", "value_loss", "entropy_loss", "approx_kl"):
            row[name] = float(values.get(f"train/{name}", math.nan)) if entry["accepted"] else math.nan
        self._recent = []
        self.updates.append(row)
        self._csv.writerow(row)
        self._csv_file.flush()

    def _evaluate(self) -> None:
        figures = evaluate_model(
            self.model, n_sequences=self.config.eval_sequences, seed=self.config.seed + len(self.evaluations)
        )
        figures.update(timesteps=self.num_timesteps, wall_time=time.perf_counter() - self._start)
        self.evaluations.append(figures)
        for name in ("mean_return", "repetition_rate", "entropy", "diversity"):
            self.logger.record(f"eval/{name}", figures[name])
        if figures["mean_return"] > self.best_return:
            self.best_return = figures["mean_return"]
            save_checkpoint(self.model, self.output / "model_checkpoints" / "best_model.zip")
