"""Registered tasks with reference answers: ``TextGen-Reverse-v0`` and ``TextGen-Arithmetic-v0``.

Each is TextGen-v0 with its own vocabulary, prompts (a train or a test split), an end token and
a ``compute_score``; its reward is the score alone (the diversity and repetition components
weigh 0). ``gym.make("TextGen-Reverse-v0", split="test", length=4)``, ``gym.make_vec(...,
vectorization_mode="vector_entry_point")`` and :func:`task_kwargs` (for
:func:`textenv_gym.sb3_vec_env.make_textgen_vec_env`) take the task's arguments and any other
TextGen-v0 argument, which replaces the task's. With ``tokenizer=`` (a Hugging Face tokenizer),
its vocabulary and end-of-sequence token replace the task's, and it encodes the prompts.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from textenv_gym.tasks.arithmetic import arithmetic_task
from textenv_gym.tasks.reverse import reverse_task

#: Task id -> the function giving its TextGenEnv arguments from the task's own.
TASKS: dict[str, Callable[..., dict[str, Any]]] = {
    "TextGen-Reverse-v0": reverse_task,
    "TextGen-Arithmetic-v0": arithmetic_task,
}


def task_kwargs(env_id: str, **kwargs: Any) -> dict[str, Any]:
    """The TextGenEnv arguments of task ``env_id``: its own arguments (``split``, difficulty,
    ``seed``) build the task, the others replace the task's (``max_length``, ``reward_weights``...)."""
    if env_id not in TASKS:
        raise ValueError(f"env_id: expected one of the tasks {sorted(TASKS)}, got {env_id!r}")
    build = TASKS[env_id]
    own = set(inspect.signature(build).parameters)
    unknown = sorted(set(kwargs) - own - set(environment_arguments()))
    if unknown:
        raise ValueError(
            f"{env_id}: unknown arguments {unknown}; the task's own are {sorted(own)}, and any TextGen-v0 "
            f"argument replaces the task's: {sorted(environment_arguments())}"
        )
    arguments = build(**{k: v for k, v in kwargs.items() if k in own})
    if kwargs.get("tokenizer") is not None:  # its vocabulary and its end of sequence replace the task's
        arguments.pop("vocabulary")
        arguments.pop("eos_token")
        if "eos_token" not in kwargs and _end_of_sequence(kwargs["tokenizer"]) is None:
            raise ValueError(
                f"{env_id}: the tokenizer has no end-of-sequence token, which the task's answers end with; give "
                "eos_token= (a token of the tokenizer or its id)"
            )
    return {**arguments, **{k: v for k, v in kwargs.items() if k not in own}}


def _end_of_sequence(tokenizer: Any) -> int | None:
    from textenv_gym.hf_tokenizer import load_tokenizer

    return load_tokenizer(tokenizer).eos_token_id


def environment_arguments() -> tuple[str, ...]:
    """The names of the arguments every TextGen environment form takes (``num_envs`` aside)."""
    from textenv_gym.vector import TextGenVectorEnv

    return tuple(name for name in inspect.signature(TextGenVectorEnv).parameters if name != "num_envs")


def task_arguments(env_id: str) -> tuple[str, ...]:
    """The names of task ``env_id``'s own arguments."""
    return tuple(inspect.signature(TASKS[env_id]).parameters)


def reverse_env(**kwargs: Any):
    from textenv_gym.text_gen import TextGenEnv

    return TextGenEnv(**task_kwargs("TextGen-Reverse-v0", **kwargs))


def reverse_vector_env(num_envs: int = 1, **kwargs: Any):
    from textenv_gym.vector import TextGenVectorEnv

    return TextGenVectorEnv(num_envs=num_envs, **task_kwargs("TextGen-Reverse-v0", **kwargs))


def arithmetic_env(**kwargs: Any):
    from textenv_gym.text_gen import TextGenEnv

    return TextGenEnv(**task_kwargs("TextGen-Arithmetic-v0", **kwargs))


def arithmetic_vector_env(num_envs: int = 1, **kwargs: Any):
    from textenv_gym.vector import TextGenVectorEnv

    return TextGenVectorEnv(num_envs=num_envs, **task_kwargs("TextGen-Arithmetic-v0", **kwargs))
