"""The training job's settings: :class:`TrainConfig`, from Python, YAML or the command line."""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from stable_baselines3.common.type_aliases import Schedule

try:  # stable-baselines3 >= 2.6: a picklable class
    from stable_baselines3.common.utils import LinearSchedule
except ImportError:  # older releases: the same schedule as a closure
    from stable_baselines3.common.utils import get_linear_fn as LinearSchedule

from textenv_gym.dynamics import TextGenConfig
from verl_sb3.advantages import GROUP_ESTIMATORS
from verl_sb3.app.proxy_reward import check_reward_model_settings
from verl_sb3.estimation import check_advantage_settings
from verl_sb3.verification.config import DEFAULT_KL_THRESHOLD


class YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader, reading ``3e-4`` and ``1e6`` as floats, as YAML 1.2 does (YAML 1.1,
    which PyYAML follows, wants a dot: ``3.0e-4``, and would give the string ``"3e-4"``)."""


YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def default_threads() -> int:
    """Torch threads of a training run: one per core this process may use, at most 2 (more than
    free cores slows training down; see the README)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return min(2, cores or 1)


#: The environment of the default run.
DEFAULT_ENV_ID = "TextGen-v0"
#: The settings that differ from the default run's when training on a registered task (a task's
#: reward is its score: no entropy target, no TextGen-v0 repeat or reuse checks; short answers).
TASK_DEFAULTS: dict[str, Any] = {
    "total_timesteps": 300_000,
    "n_envs": 64,
    "n_steps": 16,
    "batch_size": 256,
    "n_epochs": 4,
    "gae_lambda": 0.95,
    "learning_rate_final": None,
    "critic_warmup": 0,
    "target_entropy": None,
    "repeat_mass_factor": None,
    "max_reuse_rise": None,
    "eval_freq": 20_000,
    "eval_sequences": 4,
    "final_eval_sequences": 16,
}


#: Settings added after jobs were first written, with the values that reproduce what a job written
#: before them did (a resumed job's checkpoint without them takes these, not today's defaults).
ADDED_SETTINGS: dict[str, Any] = {
    "advantage_estimator": "gae",
    "loss_agg_mode": "token-mean",
    "clip_range_high": None,
    "filter_groups": False,
    "group_size": 1,
    "stop_on_targets": False,
    "warm_start_share": 0.0,
    "warm_start_epochs": 5,
    "reward_model": None,
}


@dataclass
class TrainConfig:
    """Everything the training run uses; the defaults are the default run (see the README).

    ``env_id`` is TextGen-v0 or a registered task (``textenv_gym.tasks``), whose own arguments (``split``,
    difficulty, ``seed``) go in ``env_kwargs``; :meth:`from_dict` and :meth:`for_task` then start from
    :data:`TASK_DEFAULTS`. A task sets the vocabulary and the length itself, so ``vocab_size``, ``max_length``
    and ``forbidden_tokens`` must keep their defaults; its ``eval_sequences`` and ``final_eval_sequences`` are
    the answers sampled per test prompt. ``advantage_estimator``, ``loss_agg_mode``, ``clip_range_high``,
    ``filter_groups``: :mod:`verl_sb3.estimation`; ``group_size``: environments answering in groups;
    ``reward_model``: a saved reward model to train against (:mod:`verl_sb3.app.proxy_reward`). With
    ``stop_on_targets``, training ends at the first evaluation meeting the evaluation targets whose confirming
    evaluation (``final_eval_sequences`` fresh samples) meets them too. ``warm_start_*``: a supervised warm
    start before RL (:func:`verl_sb3.app.warm_start.run_warm_start`).
    """

    env_id: str = DEFAULT_ENV_ID
    total_timesteps: int = 150_000
    n_envs: int = 128
    seed: int = 0
    learning_rate: float = 1e-3
    learning_rate_final: float | None = 1e-4
    kl_threshold: float = DEFAULT_KL_THRESHOLD
    repeat_mass_factor: float | None = 1.5
    max_reuse_rise: float | None = 3.0
    vocab_size: int = 50
    max_length: int = 20
    forbidden_tokens: list[int] = field(default_factory=list)
    output_dir: str = "results"
    n_steps: int = 20
    batch_size: int = 160
    n_epochs: int = 5
    gamma: float = 1.0
    gae_lambda: float = 0.8
    clip_range: float = 0.2
    critic_warmup: int = 10
    ent_coef: float = 0.0
    target_entropy: float | None = 2.5
    ref_kl_coef: float | None = None
    advantage_estimator: str = "gae"
    loss_agg_mode: str = "token-mean"
    clip_range_high: float | None = None
    filter_groups: bool = False
    group_size: int = 1
    stop_on_targets: bool = True
    warm_start_share: float = 0.0
    warm_start_epochs: int = 5
    reward_model: str | None = None
    vf_coef: float = 0.5
    max_grad_norm: float = 0.5
    policy_kwargs: dict[str, Any] = field(default_factory=lambda: {"enable_critic_lstm": False})
    verification: dict[str, Any] = field(default_factory=dict)
    env_kwargs: dict[str, Any] = field(default_factory=dict)
    eval_freq: int = 10_240
    eval_sequences: int = 200
    final_eval_sequences: int = 500
    checkpoint_freq: int = 50_000
    threads: int = field(default_factory=default_threads)
    progress_bar: bool = True
    verbose: int = 0

    def __post_init__(self) -> None:
        def number(name: str, low: float, high: float = math.inf, open_low: bool = False) -> None:
            value = getattr(self, name)
            ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
            if not ok or value < low or value > high or (open_low and value == low):
                bound = f"{'>' if open_low else '>='} {low}" + (f" and <= {high}" if high < math.inf else "")
                raise ValueError(f"{name}: expected a finite number {bound}, got {value!r}")

        for name in (
            "total_timesteps",
            "n_envs",
            "n_steps",
            "batch_size",
            "n_epochs",
            "eval_freq",
            "eval_sequences",
            "final_eval_sequences",
            "checkpoint_freq",
            "threads",
            "group_size",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected an integer >= 1, got {value!r}")
        for name in ("seed", "critic_warmup"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name}: expected an integer >= 0, got {value!r}")
        for name in ("learning_rate", "kl_threshold", "clip_range", "max_grad_norm"):
            number(name, 0.0, open_low=True)
        for name in ("gamma", "gae_lambda", "warm_start_share"):
            number(name, 0.0, 1.0)
        for name in ("ent_coef", "vf_coef"):
            number(name, 0.0)
        if self.learning_rate_final is not None:
            number("learning_rate_final", 0.0, open_low=True)
        if self.target_entropy is not None:
            number("target_entropy", 0.0)
        if self.repeat_mass_factor is not None:
            number("repeat_mass_factor", 0.0, open_low=True)
        if self.max_reuse_rise is not None:
            number("max_reuse_rise", 0.0)
        if self.ref_kl_coef is not None:
            number("ref_kl_coef", 0.0)
        for name in ("progress_bar", "filter_groups", "stop_on_targets"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}: expected true or false, got {getattr(self, name)!r}")
        _check_estimator_settings(self)
        _check_warm_start_settings(self)
        if isinstance(self.verbose, bool) or self.verbose not in (0, 1, 2):
            raise ValueError(f"verbose: expected 0, 1 or 2, got {self.verbose!r}")
        if not isinstance(self.env_id, str):
            raise ValueError(f"env_id: expected an environment id, got {self.env_id!r}")
        if not isinstance(self.output_dir, str) or not self.output_dir:
            raise ValueError(f"output_dir: expected a folder name, got {self.output_dir!r}")
        for name in ("policy_kwargs", "verification", "env_kwargs"):
            if not isinstance(getattr(self, name), dict):
                raise ValueError(f"{name}: expected a mapping of settings, got {getattr(self, name)!r}")
        own = sorted(set(self._own_verification_kwargs()) & set(self.verification))
        if own:
            raise ValueError(
                f"verification: {own} are set by the configuration's own fields (max_repeat_prob by "
                f"repeat_mass_factor); set them there, not in verification"
            )
        if isinstance(self.forbidden_tokens, (str, bytes)) or not isinstance(self.forbidden_tokens, (list, tuple)):
            raise ValueError(f"forbidden_tokens: expected a list of token ids, got {self.forbidden_tokens!r}")
        if self.env_kwargs.get("reward_fns"):
            raise ValueError(
                "env_kwargs: reward_fns holds Python callables, which the training job's YAML configuration cannot "
                "record; train in Python with make_textgen_vec_env(..., reward_fns=...) (see examples/custom_reward.py)"
            )
        clashing = sorted({"vocab_size", "max_length", "forbidden_tokens"} & set(self.env_kwargs))
        if clashing:
            raise ValueError(f"env_kwargs: {clashing} are settings of their own; set them there, not in env_kwargs")
        try:  # validates the environment's arguments now, not after setup
            self.textgen = TextGenConfig(**self.environment_kwargs())
        except TypeError as error:
            raise ValueError(f"env_kwargs: {error}") from None
        check_reward_model_settings(self)

    @property
    def task(self) -> bool:
        """Whether ``env_id`` is a registered task (else TextGen-v0)."""
        return self.env_id != DEFAULT_ENV_ID

    def environment_kwargs(self) -> dict[str, Any]:
        """The TextGenEnv arguments of the run's environment."""
        from textenv_gym.tasks import TASKS, environment_arguments, task_kwargs

        if not self.task:
            unknown = sorted(set(self.env_kwargs) - set(environment_arguments()))
            if unknown:
                raise ValueError(
                    f"env_kwargs: unknown arguments {unknown} of {DEFAULT_ENV_ID}; "
                    f"it takes {sorted(environment_arguments())}"
                )
            return dict(
                vocab_size=self.vocab_size,
                max_length=self.max_length,
                forbidden_tokens=list(self.forbidden_tokens),
                **self.env_kwargs,
            )
        if self.env_id not in TASKS:
            raise ValueError(f"env_id: expected {DEFAULT_ENV_ID!r} or a task of {sorted(TASKS)}, got {self.env_id!r}")
        changed = [
            name
            for name, default in (("vocab_size", 50), ("max_length", 20), ("forbidden_tokens", []))
            if getattr(self, name) != default
        ]
        if changed:
            raise ValueError(f"{', '.join(changed)}: set by the task {self.env_id}; leave them out (or use env_kwargs)")
        try:
            return task_kwargs(self.env_id, **self.env_kwargs)
        except ValueError as error:
            raise ValueError(f"env_kwargs: {error}") from None

    @classmethod
    def for_task(cls, env_id: str, **settings: Any) -> TrainConfig:
        """The configuration of a run on task ``env_id``: :data:`TASK_DEFAULTS`, then ``settings``."""
        return cls.from_dict({"env_id": env_id, **settings})

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> TrainConfig:
        """The configuration in a YAML file (keys are this class's fields), then ``overrides``."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config: no such file {str(path)!r}")
        values = yaml.load(path.read_text(), Loader=YamlLoader) or {}
        if not isinstance(values, dict):
            raise ValueError(f"config {str(path)!r}: expected a mapping of settings, got {type(values).__name__}")
        return cls.from_dict({**values, **overrides})

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"config: unknown settings {unknown}; known: {sorted(names)}")
        defaults = TASK_DEFAULTS if values.get("env_id", DEFAULT_ENV_ID) != DEFAULT_ENV_ID else {}
        return cls(**{**defaults, **values})

    @property
    def max_repeat_prob(self) -> float | None:
        """The repeat-mass check's bound: ``repeat_mass_factor`` times a uniform policy's
        probability of repeating the previous token (``1 / vocab_size``), at most 1; None: no check."""
        return None if self.repeat_mass_factor is None else min(1.0, self.repeat_mass_factor / self.vocab_size)

    def _own_verification_kwargs(self) -> dict[str, Any]:
        """The verification arguments this configuration's own fields set (``verification`` may not)."""
        return dict(
            kl_threshold=self.kl_threshold,
            max_repeat_prob=self.max_repeat_prob,
            max_reuse_rise=self.max_reuse_rise,
            target_entropy=self.target_entropy,
            ref_kl_coef=self.ref_kl_coef,
        )

    def ppo_kwargs(self) -> dict[str, Any]:
        """The PPO arguments of the run's model (learning rate schedule, rollout, loss, policy_kwargs, seed)."""
        return dict(
            learning_rate=learning_rate_schedule(self),
            n_steps=self.n_steps,
            batch_size=self.batch_size,
            n_epochs=self.n_epochs,
            gamma=self.gamma,
            gae_lambda=self.gae_lambda,
            clip_range=self.clip_range,
            ent_coef=self.ent_coef,
            vf_coef=self.vf_coef,
            max_grad_norm=self.max_grad_norm,
            policy_kwargs=dict(self.policy_kwargs),
            seed=self.seed,
        )

    def estimator_kwargs(self) -> dict[str, Any]:
        """The verified PPO's advantage-estimation arguments (:mod:`verl_sb3.estimation`)."""
        return dict(
            advantage_estimator=self.advantage_estimator,
            loss_agg_mode=self.loss_agg_mode,
            clip_range_high=self.clip_range_high,
            filter_groups=self.filter_groups,
        )

    def verification_kwargs(self) -> dict[str, Any]:
        """The verified PPO's verification arguments: this configuration's fields, then ``verification``."""
        return {**self._own_verification_kwargs(), **self.verification}

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def learning_rate_schedule(config: TrainConfig) -> float | Schedule:
    """``learning_rate``, decaying linearly to ``learning_rate_final`` over the run (SB3's
    ``LinearSchedule`` of the progress remaining), or constant when that is None."""
    if config.learning_rate_final is None:
        return config.learning_rate
    return LinearSchedule(config.learning_rate, config.learning_rate_final, end_fraction=1.0)


def _check_warm_start_settings(config: TrainConfig) -> None:
    """A ValueError naming the warm-start setting of ``config`` that does not fit."""
    epochs = config.warm_start_epochs
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"warm_start_epochs: expected an integer >= 1, got {epochs!r}")
    if config.warm_start_share > 0 and config.env_id == DEFAULT_ENV_ID:
        raise ValueError("warm_start_share: needs a task's (prompt, answer) records; TextGen-v0 has none")


def _check_estimator_settings(config: TrainConfig) -> None:
    """A ValueError naming the advantage-estimation setting of ``config`` that does not fit: the
    model's own checks, and how they go with the job's critic warm-up and environments."""
    check_advantage_settings(
        config.advantage_estimator, config.loss_agg_mode, config.clip_range_high, config.filter_groups
    )
    if config.advantage_estimator != "gae" and config.critic_warmup:
        raise ValueError(
            f"critic_warmup: advantage_estimator {config.advantage_estimator!r} trains no critic; "
            "set critic_warmup to 0"
        )
    if config.advantage_estimator in GROUP_ESTIMATORS and config.group_size < 2:
        raise ValueError(
            f"group_size: advantage_estimator {config.advantage_estimator!r} compares the episodes of a group; "
            f"set group_size >= 2 (got {config.group_size})"
        )
    if config.n_envs % config.group_size:
        raise ValueError(f"group_size: n_envs ({config.n_envs}) must be a multiple of group_size ({config.group_size})")
