"""The registered tasks, and your own prompt lists, as veRL datasets and reward functions.

:func:`export_dataset` writes veRL's parquet layout, the one its ``examples/data_preprocess``
scripts write and ``verl.utils.dataset.rl_dataset.RLHFDataset`` reads (checked against veRL
0.8.0.dev, commit b178a3c), one row per prompt:

- ``data_source``: str, which :func:`compute_score` dispatches on (``textgen/reverse``, ...);
- ``prompt``: the chat messages, ``[{"role": "user", "content": <the prompt's text>}]``;
- ``ability``: str;
- ``reward_model``: ``{"style": "rule", "ground_truth": <the reference answer>}``;
- ``extra_info``: ``{"split", "index"}`` and the record's own ``extra_info``.

:func:`compute_score` is veRL's ``custom_reward_function``
(``custom_reward_function.path=pkg://textenv_gym.verl custom_reward_function.name=compute_score``),
called as veRL's reward managers call it; :func:`trl_reward` is the same score for TRL's
``GRPOTrainer(reward_funcs=[trl_reward])`` on an exported dataset. Writing parquet needs the
optional extra ``verl`` (pyarrow).
"""

from __future__ import annotations

import os
from typing import Any

from textenv_gym.dynamics import TextGenConfig
from textenv_gym.tasks import TASKS, arithmetic, reverse, task_kwargs

#: How to install what :func:`export_dataset` needs.
VERL_EXTRA = 'the optional extra "verl": pip install "textenv-gym[verl]" (or pip install -e ".[verl]" in a checkout)'
#: The tasks' scorers, by ``data_source``.
SCORERS = {reverse.DATA_SOURCE: reverse.compute_score, arithmetic.DATA_SOURCE: arithmetic.compute_score}
#: The ``ability`` of each task's rows (veRL's examples: ``math``, ...); other prompts get ``text``.
ABILITIES = {reverse.DATA_SOURCE: "reverse", arithmetic.DATA_SOURCE: "arithmetic"}


def dataset_rows(env_id: str = "TextGen-v0", n: int | None = None, split: str = "train", **env_kwargs: Any) -> list:
    """The rows :func:`export_dataset` writes: the first ``n`` prompts (default all) of task
    ``env_id``'s ``split``, or, for ``TextGen-v0``, of ``env_kwargs["prompts"]`` (records with a
    ``ground_truth``; a ``data_source`` that :func:`compute_score` knows, or your own scorer's)."""
    if env_id in TASKS:
        kwargs = task_kwargs(env_id, split=split, **env_kwargs)
    elif env_id == "TextGen-v0":
        kwargs = env_kwargs
    else:
        raise ValueError(f"env_id: expected TextGen-v0 or one of the tasks {sorted(TASKS)}, got {env_id!r}")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ValueError(f"n: expected None or an integer >= 1, got {n!r}")
    source = TextGenConfig(**kwargs).prompt_source
    if source is None or not getattr(source, "records", None):
        raise ValueError("prompts: nothing to export; give a list of prompt records (env_kwargs prompts=[...])")
    rows = []
    for index, record in enumerate(source.records[:n]):
        if record.ground_truth is None:
            raise ValueError(f"prompts[{index}]: has no ground_truth, which veRL's reward reads; give one per prompt")
        rows.append({
            "data_source": record.data_source or "textgen",
            "prompt": [{"role": "user", "content": record.text}],
            "ability": ABILITIES.get(record.data_source, "text"),
            "reward_model": {"style": "rule", "ground_truth": record.ground_truth},
            "extra_info": {"split": split, "index": index, **dict(record.extra_info or {})},
        })  # fmt: skip
    return rows


def export_dataset(
    env_id: str, path: str | os.PathLike, n: int | None = None, split: str = "train", **env_kwargs: Any
) -> int:
    """Write :func:`dataset_rows` to the parquet file ``path`` (veRL's ``data.train_files`` /
    ``data.val_files``); return the number of rows."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as error:
        raise ImportError(f"export_dataset needs pyarrow, which is not installed; install {VERL_EXTRA}") from error
    rows = dataset_rows(env_id, n, split, **env_kwargs)
    pq.write_table(pa.Table.from_pylist(rows), os.fspath(path))
    return len(rows)


def compute_score(data_source: str, solution_str: str, ground_truth: str, extra_info: Any = None, **_: Any) -> float:
    """veRL's ``compute_score``: the task's score of ``solution_str`` (1.0 for the ground truth).
    veRL passes its own keyword arguments too (``extra_info`` grows ``num_turns``...): ignored."""
    scorer = SCORERS.get(data_source)
    if scorer is None:
        raise ValueError(f"data_source: expected one of {sorted(SCORERS)}, got {data_source!r}")
    return float(scorer(data_source, solution_str, ground_truth, extra_info))


def trl_reward(completions: list, reward_model: list | None = None, data_source: list | None = None, **kwargs: Any):
    """TRL's reward function (``GRPOTrainer(reward_funcs=[trl_reward])``) on an exported dataset:
    TRL passes the dataset's columns by name; completions are texts or chat messages."""
    if reward_model is None or data_source is None:
        raise ValueError("trl_reward: needs the dataset's reward_model and data_source columns (an exported dataset)")
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [
        compute_score(source, text, model["ground_truth"])
        for text, source, model in zip(texts, data_source, reward_model)
    ]
