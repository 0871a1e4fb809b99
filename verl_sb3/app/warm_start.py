"""The training job's supervised warm start: a share of the task's train split, before RL."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from textenv_gym.tasks import task_kwargs
from verl_sb3.app.config import TrainConfig
from verl_sb3.app.files import replace_text
from verl_sb3.sft import supervised_warm_start


def warm_start_records(config: TrainConfig) -> list[dict[str, Any]]:
    """``warm_start_share`` of the task's train prompts (at least one), drawn with the job's seed."""
    prompts = task_kwargs(config.env_id, **{**config.env_kwargs, "split": "train"})["prompts"]
    count = max(1, math.ceil(config.warm_start_share * len(prompts)))
    chosen = np.random.default_rng(config.seed).permutation(len(prompts))[:count]
    return [prompts[i] for i in sorted(chosen)]


def run_warm_start(model: Any, config: TrainConfig, output: Path) -> dict[str, Any] | None:
    """Warm-start ``model`` as ``config`` says (nothing when ``warm_start_share`` is 0); its figures
    go to ``warm_start.json`` in ``output`` and to the terminal."""
    if config.warm_start_share <= 0:
        return None
    records = warm_start_records(config)
    result = supervised_warm_start(model, records, epochs=config.warm_start_epochs, seed=config.seed)
    figures = {
        "records": result.n_records,
        "answer_tokens": result.n_tokens,
        "share": config.warm_start_share,
        "epochs": config.warm_start_epochs,
        "answer_loss_before": result.loss_before,
        "answer_loss_after": result.loss_after,
        "epoch_losses": result.epoch_losses,
    }
    replace_text(output / "warm_start.json", json.dumps(figures, indent=2))
    print(
        f"warm start: {result.n_records} records ({result.n_tokens} answer tokens), answer loss "
        f"{result.loss_before:.3f} -> {result.loss_after:.3f} nats per token",
        flush=True,
    )
    return figures
