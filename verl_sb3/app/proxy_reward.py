"""The training job against a learned reward model (``reward_model``): RLHF's loop, with its gold score.

With ``reward_model: FOLDER`` (a model saved by ``verl-sb3 reward-model`` or
:func:`verl_sb3.rlhf.save_reward_model`) the job trains on TextGen-v0 whose reward is that model's
score of each whole sequence; the environment's own reward (diversity and anti-repetition) no
longer trains, and becomes the gold score. The model records the environment without the reward
model, so the job's evaluations, ``verl-sb3 evaluate`` and ``generate`` measure the gold reward. A
:class:`~verl_sb3.rlhf.GoldScoreCallback` measures proxy, gold and KL to the reference every
``eval_freq`` steps into ``overoptimisation.json`` and, at the end, ``overoptimisation.png`` and a
row of the dashboard (``training_curves.png``). As in
RLHF the policy is held near its reference: ``ref_kl_coef`` must be set.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from verl_sb3.app.files import replace_text

COMPONENT = "reward_model"
HISTORY_FILE, PLOT_FILE = "overoptimisation.json", "overoptimisation.png"
_BUILT_IN = ("diversity", "repetition", "forbidden")
GOLD_LABEL = "gold: TextGen-v0's own return"


def check_reward_model_settings(config: Any) -> None:
    """A ValueError naming what does not fit in ``config``'s ``reward_model`` setting (a TrainConfig
    whose ``textgen`` is built)."""
    if config.reward_model is None:
        return
    from verl_sb3.rlhf.reward_model import reward_model_config

    if not isinstance(config.reward_model, str) or not config.reward_model:
        raise ValueError(f"reward_model: expected the folder of a saved reward model, got {config.reward_model!r}")
    if config.task:
        raise ValueError(
            "reward_model: the training job trains against a reward model on TextGen-v0 (whose own reward is "
            "the gold score); on a task, pass reward_fns={'reward_model': load_reward_model(...)} in Python"
        )
    if config.ref_kl_coef is None:
        raise ValueError(
            "reward_model: RL against a learned reward model needs the KL penalty to the reference; "
            "set ref_kl_coef (e.g. 0.05)"
        )
    if config.env_kwargs.get("reward_weights") is not None:
        raise ValueError(
            "env_kwargs: reward_weights is set by reward_model (the environment's own reward becomes "
            "the gold score, weighted 0); leave it out"
        )
    try:
        saved = reward_model_config(config.reward_model)["environment"]
    except ValueError as error:
        raise ValueError(f"reward_model: {error}") from None
    own = (config.textgen.vocab_size, config.textgen.max_length)
    if (saved["vocab_size"], saved["max_length"]) != own:
        raise ValueError(
            f"reward_model: fitted on vocab_size {saved['vocab_size']}, max_length {saved['max_length']}; this run "
            f"has {own[0]}, {own[1]}"
        )


def training_env_kwargs(config: Any) -> dict[str, Any]:
    """The TextGen-v0 arguments the job trains on: ``config.textgen``'s, with the reward model as the
    only weighted reward component when ``reward_model`` is set."""
    kwargs = config.textgen.as_kwargs()
    if config.reward_model is None:
        return kwargs
    from verl_sb3.rlhf import load_reward_model

    kwargs["reward_fns"] = {COMPONENT: load_reward_model(config.reward_model)}
    kwargs["reward_weights"] = dict.fromkeys(_BUILT_IN, 0.0)
    return kwargs


def gold_callback(config: Any, model: Any, output: Path, timesteps: int) -> Any:
    """The job's :class:`~verl_sb3.rlhf.GoldScoreCallback` on the reward model ``model``'s environment
    holds, its history read back up to ``timesteps`` (a resumed job's checkpoint) from ``output``;
    None without ``reward_model``."""
    if config.reward_model is None:
        return None
    from textenv_gym.sb3_vec_env import environment_config
    from verl_sb3.rlhf import GoldScoreCallback, environment_return

    gold = functools.partial(environment_return, config.textgen)
    path = output / HISTORY_FILE
    history = []
    if timesteps and path.is_file():
        history = [row for row in json.loads(path.read_text()) if row["timesteps"] <= timesteps]
    return GoldScoreCallback(
        environment_config(model.get_env()).reward_fns[COMPONENT],
        gold,
        config.eval_freq,
        config.eval_sequences,
        config.seed + 20_000,
        history=history,
        on_measure=lambda rows: replace_text(path, json.dumps(rows, indent=2)),
    )


def plot_gold_history(callback: Any, output: Path) -> None:
    """``overoptimisation.png`` from the callback's history."""
    from verl_sb3.rlhf import plot_overoptimisation

    if callback is not None and callback.history:
        plot_overoptimisation(callback.history, output / PLOT_FILE, gold_label=GOLD_LABEL)
