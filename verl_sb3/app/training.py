"""The main job: train the SLM with verified PPO on TextGen-v0 or a task, record, checkpoint and evaluate.

:func:`train` runs a job in its own folder (:mod:`verl_sb3.app.job`); :func:`resume` continues
one from its newest complete checkpoint, to the result the uninterrupted job would have had. A
first Ctrl-C (SIGINT) stops a job at the end of its current update, after a checkpoint it can be
resumed from; a second one stops it at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import signal
import sys
import tempfile
import threading
import warnings
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch as th
import yaml
from stable_baselines3.common.callbacks import BaseCallback, CallbackList
from stable_baselines3.common.logger import configure

from textenv_gym.sb3_vec_env import make_textgen_vec_env
from verl_sb3.app.config import ADDED_SETTINGS, TrainConfig
from verl_sb3.app.dashboard import plot_dashboard
from verl_sb3.app.files import replace_text
from verl_sb3.app.job import JOB_STATE_ENTRY, JobError, newest_checkpoint, owned_folder
from verl_sb3.app.proxy_reward import GOLD_LABEL, gold_callback, plot_gold_history, training_env_kwargs
from verl_sb3.app.recorder import TrainingRecorder
from verl_sb3.app.suites import suite_for
from verl_sb3.app.targets import (
    RANDOM_POLICY_REPETITION,
    RANDOM_POLICY_RETURN,
    evaluation_table,
    markdown_table,
    save_evaluation,
)
from verl_sb3.app.warm_start import run_warm_start
from verl_sb3.checkpoints import resume_checkpoint, save_checkpoint
from verl_sb3.verified import VerifiedRecurrentPPO
from verl_sb3.warmup import CriticWarmupCallback


def _logger_formats() -> list[str]:
    formats = ["csv"]
    try:
        import tensorboard  # noqa: F401

        formats.append("tensorboard")
    except ImportError:
        pass
    return formats


def build_env(config: TrainConfig) -> Any:
    """The job's vectorised environment (rewarded by the reward model when ``reward_model`` is set)."""
    return make_textgen_vec_env(
        config.n_envs, seed=config.seed, group_size=config.group_size, **training_env_kwargs(config)
    )


def build_model(config: TrainConfig) -> VerifiedRecurrentPPO:
    """The verified SLM and its vectorised environment, as the configuration says (``threads`` is
    the training job's, applied by :func:`train`: building a model leaves the process's threads alone)."""
    model = VerifiedRecurrentPPO(
        "SLMLstmPolicy",
        build_env(config),
        **config.ppo_kwargs(),
        verbose=config.verbose,
        **config.estimator_kwargs(),
        **config.verification_kwargs(),
    )
    return record_environment(model, config)


def record_environment(model: Any, config: TrainConfig) -> Any:
    """``model`` with the environment it trains on recorded (saved with it): ``env_kwargs`` (the
    TextGen-v0 arguments generation and evaluation rebuild it from; of a run against a reward model,
    the environment without it, whose own reward is the gold score), ``env_id``, ``task_kwargs``."""
    model.env_kwargs = config.textgen.as_kwargs()
    model.env_id = config.env_id
    model.task_kwargs = dict(config.env_kwargs) if config.task else None
    return model


def train(config: TrainConfig, overwrite: bool = False, callbacks: Sequence[BaseCallback] = ()) -> dict[str, Any]:
    """Run the training, write the outputs into ``config.output_dir`` and return the evaluation.

    :param overwrite: replace an earlier run's outputs in the folder (else it is refused).
    :param callbacks: SB3 callbacks to run besides the job's own.
    """
    with owned_folder(config.output_dir, overwrite=overwrite) as output:
        replace_text(output / "config.yaml", yaml.safe_dump(config.as_dict(), sort_keys=False))
        th.set_num_threads(config.threads)
        model = build_model(config)
        run_warm_start(model, config, output)
        recorder = TrainingRecorder(config, output, _progress_lines(config))
        return _run(config, model, recorder, output, resumed=False, callbacks=callbacks)


def resume(
    folder: str | Path, progress_bar: bool | None = None, callbacks: Sequence[BaseCallback] = ()
) -> dict[str, Any]:
    """Continue the job recorded in ``folder`` from its newest complete checkpoint, with its own
    settings (``config.yaml``), to the outputs the uninterrupted job would have written.

    :param progress_bar: show SB3's progress bar (default: the job's setting).
    :param callbacks: SB3 callbacks to run besides the job's own.
    :raises JobError: naming the problem when the folder holds no resumable run, or when its
        settings were changed since the checkpoint.
    """
    with owned_folder(folder, resume=True) as output:
        config = TrainConfig.from_yaml(output / "config.yaml")
        if progress_bar is not None:
            config.progress_bar = progress_bar
        checkpoint = newest_checkpoint(output)
        with zipfile.ZipFile(checkpoint) as archive:
            state = json.loads(archive.read(JOB_STATE_ENTRY))
        saved = state["config"]  # settings added since the checkpoint was written are not in it:
        config = dataclasses.replace(config, **{k: v for k, v in ADDED_SETTINGS.items() if k not in saved})
        changed = sorted(k for k, v in config.as_dict().items() if k != "progress_bar" and saved.get(k, v) != v)
        if changed:
            raise JobError(f"--resume {str(output)!r}: config.yaml changed since {checkpoint.name}: {changed}")
        th.set_num_threads(config.threads)
        # a task's episodes end at the end token, not together: its run goes on from fresh episodes; the
        # environment is compared with the one trained on (its reward model included), then recorded as always
        environment = {"env_kwargs": training_env_kwargs(config)} if config.reward_model else {}
        model = resume_checkpoint(checkpoint, build_env(config), exact=not config.task, **environment)
        if config.reward_model:
            record_environment(model, config)
        recorder = TrainingRecorder.resumed(config, output, state, _progress_lines(config))
        progress = output / "logs" / "progress.csv"
        if progress.is_file() and not progress.is_symlink():  # SB3's logger starts its file anew: keep the old one
            progress.replace(progress.with_name(f"progress_until_{model.num_timesteps}_steps.csv"))
        return _run(config, model, recorder, output, resumed=True, callbacks=callbacks)


def _progress_lines(config: TrainConfig) -> bool:
    """Print progress lines when no progress bar can show (output to a file, or the bar is off)."""
    return not (config.progress_bar and sys.stdout.isatty())


def _run(
    config: TrainConfig,
    model: Any,
    recorder: TrainingRecorder,
    output: Path,
    resumed: bool,
    callbacks: Sequence[BaseCallback],
) -> dict[str, Any]:
    model.set_logger(configure(str(output / "logs"), _logger_formats()))
    gold = gold_callback(config, model, output, model.num_timesteps if resumed else 0)
    own = [CriticWarmupCallback(config.critic_warmup), recorder, *([gold] if gold is not None else [])]
    try:
        with _stop_on_interrupt(recorder):
            model.learn(
                config.total_timesteps - model.num_timesteps,
                callback=CallbackList([*own, *callbacks]),
                progress_bar=config.progress_bar,
                reset_num_timesteps=not resumed,
            )
    finally:
        recorder.close()
    if recorder.stopped_at is not None:
        return {"interrupted": True, "checkpoint": recorder.stopped_at, "model": model, "recorder": recorder}
    train_seconds = recorder.elapsed  # of the whole job, an interrupted one's earlier part included
    _save_final(model, output / "model_checkpoints" / "final_model.zip")

    suite = suite_for(model)
    figures = suite.evaluate(model, config.final_eval_sequences, config.seed + 10_000)
    figures.update(train_seconds=train_seconds, timesteps=model.num_timesteps)
    rows = evaluation_table(figures, suite.targets)
    save_evaluation(output, figures, rows)
    default_task = not config.task and (config.vocab_size, config.max_length) == (50, 20)
    default_task = default_task and not config.forbidden_tokens
    plot_dashboard(
        recorder.episode_timesteps,
        recorder.episode_returns,
        recorder.updates,
        output / "training_curves.png",
        optimum=figures.get("optimal_return", 1.0 if config.task else None),
        random_baseline=RANDOM_POLICY_RETURN if default_task else None,
        evaluations=recorder.evaluations,
        target_entropy=config.target_entropy,
        kl_threshold=config.kl_threshold,
        random_repetition=RANDOM_POLICY_REPETITION if default_task else None,
        gold_history=gold.history if gold is not None else (),
        gold_label=GOLD_LABEL,
    )
    replace_text(output / "evaluations.json", json.dumps(recorder.evaluations, indent=2))
    plot_gold_history(gold, output)
    return {"figures": figures, "rows": rows, "table": markdown_table(rows), "model": model, "recorder": recorder}


@contextlib.contextmanager
def _stop_on_interrupt(recorder: TrainingRecorder) -> Iterator[None]:
    """A first SIGINT (Ctrl-C) asks ``recorder`` to stop at the next rollout boundary; a second one
    interrupts at once (Python's own handler is back). Only in the main thread, where signals arrive."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)

    def stop_soon(signum: int, frame: Any) -> None:
        recorder.request_stop()
        signal.signal(signal.SIGINT, previous)
        print("verl-sb3: stopping after this update, with a checkpoint to resume from (Ctrl-C again: at once)",
              file=sys.stderr, flush=True)  # fmt: skip

    signal.signal(signal.SIGINT, stop_soon)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _save_final(model: Any, path: Path) -> Path:
    """Save the final model; when that fails (a full disk, a read-only folder), save it into a new
    temporary folder instead and raise an OSError that says where it is."""
    try:
        return save_checkpoint(model, path)
    except OSError as error:
        try:
            fallback = save_checkpoint(model, Path(tempfile.mkdtemp(prefix="verl-sb3-")) / path.name)
        except OSError:
            raise OSError(f"cannot save the final model to {path} ({error}), nor to a temporary folder") from error
        warnings.warn(f"cannot save the final model to {path} ({error}); saved it to {fallback}", stacklevel=2)
        raise OSError(f"cannot save the final model to {path} ({error}); it is saved in {fallback}") from error
