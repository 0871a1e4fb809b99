"""The main job: train the SLM with verified PPO on TextGen-v0, record, checkpoint and evaluate."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch as th
import yaml
from stable_baselines3.common.callbacks import CallbackList
from stable_baselines3.common.logger import configure

from textenv_gym.sb3_vec_env import make_textgen_vec_env
from verl_sb3.app.config import TrainConfig
from verl_sb3.app.dashboard import plot_dashboard
from verl_sb3.app.recorder import TrainingRecorder
from verl_sb3.app.targets import RANDOM_POLICY_RETURN, evaluation_table, markdown_table, save_evaluation
from verl_sb3.checkpoints import save_checkpoint
from verl_sb3.evaluation import evaluate_model
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


def build_model(config: TrainConfig) -> VerifiedRecurrentPPO:
    """The verified SLM and its vectorised environment, as the configuration says (``threads`` is
    the training job's, applied by :func:`train`: building a model leaves the process's threads alone)."""
    env_kwargs = config.textgen.as_kwargs()
    env = make_textgen_vec_env(config.n_envs, seed=config.seed, **env_kwargs)
    model = VerifiedRecurrentPPO(
        "SLMLstmPolicy",
        env,
        learning_rate=config.learning_rate_schedule(),
        n_steps=config.n_steps,
        batch_size=config.batch_size,
        n_epochs=config.n_epochs,
        gamma=config.gamma,
        gae_lambda=config.gae_lambda,
        clip_range=config.clip_range,
        ent_coef=config.ent_coef,
        vf_coef=config.vf_coef,
        max_grad_norm=config.max_grad_norm,
        policy_kwargs=dict(config.policy_kwargs),
        seed=config.seed,
        verbose=config.verbose,
        **config.verification_kwargs(),
    )
    model.env_kwargs = env_kwargs
    return model


def train(config: TrainConfig) -> dict[str, Any]:
    """Run the training, write the outputs into ``config.output_dir`` and return the evaluation."""
    output = Path(config.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    (output / "config.yaml").write_text(yaml.safe_dump(config.as_dict(), sort_keys=False))
    th.set_num_threads(config.threads)
    model = build_model(config)
    model.set_logger(configure(str(output / "logs"), _logger_formats()))
    recorder = TrainingRecorder(config, output)
    start = time.perf_counter()
    try:
        callbacks = CallbackList([CriticWarmupCallback(config.critic_warmup), recorder])
        model.learn(config.total_timesteps, callback=callbacks, progress_bar=config.progress_bar)
    finally:
        recorder.close()
    train_seconds = time.perf_counter() - start
    save_checkpoint(model, output / "model_checkpoints" / "final_model.zip")

    figures = evaluate_model(model, n_sequences=config.final_eval_sequences, seed=config.seed + 10_000)
    figures.update(train_seconds=train_seconds, timesteps=model.num_timesteps)
    rows = evaluation_table(figures)
    save_evaluation(output, figures, rows)
    plot_dashboard(
        recorder.episode_timesteps,
        recorder.episode_returns,
        recorder.updates,
        output / "training_curves.png",
        optimum=figures["optimal_return"],
        random_baseline=RANDOM_POLICY_RETURN
        if (config.vocab_size, config.max_length) == (50, 20) and not config.forbidden_tokens
        else None,
    )
    (output / "evaluations.json").write_text(json.dumps(recorder.evaluations, indent=2))
    return {"figures": figures, "rows": rows, "table": markdown_table(rows), "model": model, "recorder": recorder}
