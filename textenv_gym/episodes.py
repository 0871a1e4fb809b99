"""Starting episodes: each environment's prompt (explicit, or drawn from the prompt source), in every env form."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from textenv_gym.dynamics import SequenceBatch
from textenv_gym.prompts import NO_PROMPT, PromptRecord, PromptSchedule, make_record


def is_per_environment(prompt: Any) -> bool:
    """Whether a vector env's ``options["prompt"]`` is one prompt per environment: a list of texts,
    id lists, records or Nones (one prompt is a text or a list of ids)."""
    return (
        isinstance(prompt, (list, tuple))
        and len(prompt) > 0
        and all(item is None or isinstance(item, (str, dict, list, tuple, np.ndarray)) for item in prompt)
    )


class EpisodeStarter:
    """Resets the sequences of a :class:`SequenceBatch` to their next episodes' prompts.

    ``episode[i]`` is the number of environment ``i``'s current episode within its group (see
    :class:`PromptSchedule`), ``group[i]`` its group.
    """

    def __init__(self, sequences: SequenceBatch, group_size: int = 1) -> None:
        self.sequences = sequences
        self.config = sequences.config
        self.schedule = PromptSchedule(self.config.prompt_source, sequences.num_sequences, group_size)
        self.group = np.arange(sequences.num_sequences) // self.schedule.group_size
        self.episode = np.zeros(sequences.num_sequences, dtype=np.int64)

    @property
    def draws(self) -> bool:
        """Whether episodes draw their prompts (a prompt source): reset info then reports them."""
        return self.schedule.source is not None

    def record(self, prompt: Any, name: str) -> PromptRecord | None:
        """An explicit prompt (text, ids or a record) of ``reset``'s options, checked; None for None."""
        if prompt is None:
            return None
        return make_record(prompt, self.config.encode_prompt, self.config.tokenizer.decode, name)

    def set_options(self, prompts: dict[int, Any], name: str = "options['prompt']") -> None:
        """Explicit prompts by environment index (None: back to the source or the empty prompt),
        all checked before any is set."""
        records = {index: self.record(prompt, f"{name}[{index}]") for index, prompt in prompts.items()}
        for index, record in records.items():
            self.schedule.set_explicit(index, record)
            self.sequences.set_row_prompt(index, record or NO_PROMPT)

    def set_vector_options(self, options: dict[str, Any] | None, num_envs: int) -> None:
        """``options["prompt"]`` of a vector env's ``reset``: one for all, or one per environment."""
        if not options or "prompt" not in options:
            return
        prompt = options["prompt"]
        if is_per_environment(prompt):
            if len(prompt) != num_envs:
                raise ValueError(
                    f"options['prompt']: {len(prompt)} prompts for {num_envs} environments; give one per "
                    "environment, or a single prompt for all"
                )
            self.set_options(dict(enumerate(prompt)))
        else:
            record = self.record(prompt, "options['prompt']")
            self.set_options(dict.fromkeys(range(num_envs), record))

    @contextlib.contextmanager
    def transaction(self, rng: np.random.Generator, rows: Sequence[int] | np.ndarray) -> Iterator[None]:
        """Everything drawing and stepping change (the schedule, the episode counts, ``rng``, the
        sequences ``rows``), put back as it was when the block raises."""
        rows = np.asarray(rows, dtype=np.int64)
        schedule = self.schedule.state() if self.draws else None  # without a source, drawing changes nothing
        saved = self.episode.copy(), rng.bit_generator.state, self.sequences.snapshot(rows)
        try:
            yield
        except BaseException:
            self.episode[:], rng.bit_generator.state, sequences = saved
            if schedule is not None:
                self.schedule.set_state(schedule)
            self.sequences.restore(sequences)
            raise

    def start(self, rows: Sequence[int] | np.ndarray, rng: np.random.Generator, restart: bool = False) -> None:
        """Reset ``rows`` (indices, in order) to their next episodes (all episodes anew with ``restart``);
        all of them or, when a prompt cannot be drawn or used, none."""
        with self.transaction(rng, rows) if self.draws else contextlib.nullcontext():  # else nothing can fail
            if restart:
                self.schedule.restart()
            if self.draws:
                for row in rows:
                    record, self.episode[row] = self.schedule.next(int(row), rng)
                    self.sequences.set_row_prompt(int(row), record)
            else:
                self.episode[rows] = 0 if restart else self.episode[rows] + 1
            self.sequences.reset(np.asarray(rows, dtype=np.int64))

    @property
    def grouped(self) -> bool:
        """Whether episodes carry group keys: with a prompt source, or in groups of two or more."""
        return self.draws or self.schedule.group_size > 1

    def info(self, row: int) -> dict[str, Any]:
        """The prompt and group keys of ``row``'s reset info (the prompt's only with a prompt source,
        the group's only when :attr:`grouped`)."""
        keys = self.sequences.records[row].info() if self.draws else {}
        if self.grouped:
            keys.update(group=int(self.group[row]), group_episode=int(self.episode[row]))
        return keys
