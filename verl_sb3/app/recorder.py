"""The training job's recorder: episode returns, one CSV row per update, periodic evaluations and
checkpoints, progress lines, and the state a resumed job continues from."""

from __future__ import annotations

import csv
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
from stable_baselines3.common.callbacks import BaseCallback

from verl_sb3.app.config import TrainConfig
from verl_sb3.app.files import open_fresh
from verl_sb3.app.job import JOB_STATE_ENTRY
from verl_sb3.app.suites import suite_for
from verl_sb3.app.targets import evaluation_table
from verl_sb3.checkpoints import save_checkpoint

#: Seconds between two progress lines (and one at every evaluation).
PROGRESS_SECONDS = 30.0


class TrainingRecorder(BaseCallback):
    """Collects episode returns, writes one CSV row per update, evaluates and checkpoints.

    Runs between rollouts, right after each update, when the figures of that update are final.
    Each periodic checkpoint holds the recorder's state (:meth:`state`), so that a job resumed
    from it (:meth:`resumed`) writes what the uninterrupted job would have written. With
    ``progress_lines`` it prints a line every :data:`PROGRESS_SECONDS` and at each evaluation
    (for logs, where no progress bar shows). :meth:`request_stop` ends training at the next
    rollout boundary, after a resumable checkpoint (``stopped_at``). With the configuration's
    ``stop_on_targets``, an evaluation that meets the evaluation targets is confirmed on
    ``final_eval_sequences`` fresh samples, and when that one meets them too training ends
    (``targets_met_at``: the step; the evaluation's ``targets_met`` and ``confirmed`` say so).

    :param config: the job's settings.
    :param output: the job's folder.
    :param progress_lines: print progress lines.
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

    def __init__(self, config: TrainConfig, output: Path, progress_lines: bool = False) -> None:
        super().__init__()
        self.config = config
        self.output = output
        self.progress_lines = progress_lines
        self.episode_timesteps: list[int] = []
        self.episode_returns: list[float] = []
        self.updates: list[dict[str, Any]] = []
        self.evaluations: list[dict[str, float]] = []
        self.best_return = -math.inf
        self.stopped_at: Path | None = None
        self.targets_met_at: int | None = None
        self._next_eval = config.eval_freq
        self._next_checkpoint = config.checkpoint_freq
        self._recent: list[float] = []
        self._start = time.perf_counter()
        self._last_progress = self._start
        self._stop_requested = False

    # ------------------------------------------------------------------ state, for resuming
    def state(self) -> dict[str, Any]:
        """Everything the recorder has gathered, as JSON-friendly values."""
        return {
            "format": 1,
            "config": self.config.as_dict(),
            "episode_timesteps": self.episode_timesteps,
            "episode_returns": self.episode_returns,
            "updates": self.updates,
            "evaluations": self.evaluations,
            "best_return": self.best_return,
            "targets_met_at": self.targets_met_at,
            "next_eval": self._next_eval,
            "next_checkpoint": self._next_checkpoint,
            "recent": self._recent,
            "wall_time": self.elapsed,
        }

    @property
    def elapsed(self) -> float:
        """Seconds since the job started (a resumed job's earlier part included)."""
        return time.perf_counter() - self._start

    @classmethod
    def resumed(
        cls, config: TrainConfig, output: Path, state: dict[str, Any], progress_lines: bool = False
    ) -> TrainingRecorder:
        """A recorder that goes on from ``state`` (its CSV rewritten from it when training starts)."""
        recorder = cls(config, output, progress_lines)
        recorder.episode_timesteps, recorder.episode_returns = state["episode_timesteps"], state["episode_returns"]
        recorder.updates, recorder.evaluations = state["updates"], state["evaluations"]
        recorder.best_return, recorder._recent = state["best_return"], state["recent"]
        recorder.targets_met_at = state.get("targets_met_at")  # absent from checkpoints of earlier versions
        recorder._next_eval, recorder._next_checkpoint = state["next_eval"], state["next_checkpoint"]
        recorder._start = recorder._last_progress = time.perf_counter() - state["wall_time"]
        return recorder

    def request_stop(self) -> None:
        """End training at the next rollout boundary, after writing a checkpoint there."""
        self._stop_requested = True

    # ------------------------------------------------------------------ SB3's callback hooks
    def _on_training_start(self) -> None:
        self._csv_file = open_fresh(self.output / "updates.csv", newline="")  # open for the whole run
        self._csv = csv.DictWriter(self._csv_file, fieldnames=self.COLUMNS)
        self._csv.writeheader()
        self._csv.writerows(self.updates)  # a resumed job's rows so far
        self._csv_file.flush()

    def _on_step(self) -> bool:
        for info in self.locals["infos"]:
            episode = info.get("episode")
            if episode is not None:
                self.episode_timesteps.append(self.num_timesteps)
                self.episode_returns.append(float(episode["r"]))
                self._recent.append(float(episode["r"]))
        return self.stopped_at is None and self.targets_met_at is None

    def _on_rollout_start(self) -> None:
        self._record_update()
        evaluated = self.num_timesteps >= self._next_eval
        if evaluated:
            self._next_eval += self.config.eval_freq
            self._evaluate()
        checkpoint = None
        if self.num_timesteps >= self._next_checkpoint or (self._stop_requested and self.stopped_at is None):
            if self.num_timesteps >= self._next_checkpoint:
                self._next_checkpoint += self.config.checkpoint_freq
            checkpoint = self._save_periodic()
        if self._stop_requested and self.stopped_at is None:
            self.stopped_at = checkpoint
        if self.progress_lines and (evaluated or time.perf_counter() - self._last_progress >= PROGRESS_SECONDS):
            self._print_progress()

    def _on_training_end(self) -> None:
        self._record_update()
        self.close()
        if self.progress_lines:
            self._print_progress()

    def close(self) -> None:
        """Close the per-update CSV (idempotent)."""
        if getattr(self, "_csv_file", None) is not None and not self._csv_file.closed:
            self._csv_file.close()

    # ------------------------------------------------------------------ the records
    def _save_periodic(self) -> Path:
        path = self.output / "model_checkpoints" / f"model_{self.num_timesteps}_steps.zip"
        return save_checkpoint(self.model, path, extra_entries={JOB_STATE_ENTRY: json.dumps(self.state()).encode()})

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
        suite = suite_for(self.model)
        figures = suite.evaluate(self.model, self.config.eval_sequences, self.config.seed + len(self.evaluations))
        figures.update(timesteps=self.num_timesteps, wall_time=time.perf_counter() - self._start)
        if self.config.stop_on_targets:
            self._confirm_targets(suite, figures)
        self.evaluations.append(figures)
        for name in suite.logged:
            self.logger.record(f"eval/{name}", figures[name])
        if figures[suite.best] > self.best_return:
            self.best_return = figures[suite.best]
            save_checkpoint(self.model, self.output / "model_checkpoints" / "best_model.zip")

    def _confirm_targets(self, suite: Any, figures: dict[str, Any]) -> None:
        """Whether ``figures`` meet the targets and a confirming evaluation does too (then training stops)."""
        met = all(row["passed"] for row in evaluation_table(figures, suite.targets))
        confirmed = False
        if met:
            seed = self.config.seed + 20_000 + len(self.evaluations)
            again = suite.evaluate(self.model, self.config.final_eval_sequences, seed)
            confirmed = all(row["passed"] for row in evaluation_table(again, suite.targets))
            figures["confirming"] = {name: again[name] for name in suite.logged}
        figures.update(targets_met=float(met), confirmed=float(confirmed))
        if confirmed:
            self.targets_met_at = self.num_timesteps
            print(
                f"verl-sb3: evaluation targets met at {self.num_timesteps:,} steps and confirmed on "
                f"{self.config.final_eval_sequences} fresh samples: training stops",
                flush=True,
            )

    def _print_progress(self) -> None:
        self._last_progress = now = time.perf_counter()
        total, steps = self.config.total_timesteps, self.num_timesteps
        reward = self.updates[-1]["mean_episode_reward"] if self.updates else math.nan
        line = (
            f"verl-sb3: {steps:,} / {total:,} steps ({steps / total:.0%}), {now - self._start:.0f} s; "
            f"mean episode return {reward:.3f}; {len(self.updates)} updates, "
            f"{self.model.verification_rate:.1%} accepted at the full step, {self.model.n_undone} undone"
        )
        if self.evaluations and self.evaluations[-1]["timesteps"] == steps:
            line += f"; evaluation: {suite_for(self.model).progress(self.evaluations[-1])}"
        print(line, flush=True)
