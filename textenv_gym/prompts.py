"""Where the episodes' prompts come from: a dataset of prompts with reference answers, drawn per episode.

A prompt source (the environments' ``prompts=`` argument) is a sequence of prompts or of records,
or a callable ``(rng) -> record``. A prompt is a text (words of the vocabulary) or a list of token
ids; a record is a mapping with veRL's field names::

    {"prompt": "3 + 4 =", "ground_truth": "7", "data_source": "arithmetic", "extra_info": {...}}

(veRL's nesting ``{"reward_model": {"ground_truth": ...}}`` is read too, and its ``ability`` is
accepted; chat messages are not prompts here). :class:`PromptSource`
checks and encodes them; :class:`PromptSchedule` hands each environment the prompt of its next
episode: an explicit one when given, else one drawn from the source with the environment's
seeded generator. Environments in groups of ``group_size`` answer the same drawn prompts in the
same order, each at its own pace, so that a group's episodes can be compared with each other.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

#: The keys a prompt record may have.
RECORD_KEYS = ("prompt", "ground_truth", "data_source", "extra_info", "reward_model", "ability")


@dataclass(frozen=True)
class PromptRecord:
    """One prompt, encoded, with what scoring an answer to it needs."""

    ids: np.ndarray = field(repr=False)  # int64 token ids
    text: str
    ground_truth: Any = None
    data_source: str | None = None
    extra_info: Mapping[str, Any] | None = None
    index: int | None = None  # its position in a sequence source

    def info(self) -> dict[str, Any]:
        """What ``reset`` reports of it in ``info``."""
        return {
            "prompt": self.text,
            "ground_truth": self.ground_truth,
            "data_source": self.data_source,
            "prompt_index": -1 if self.index is None else self.index,
        }


NO_PROMPT = PromptRecord(np.zeros(0, dtype=np.int64), "")


def make_record(item: Any, encode: Callable[[Any], np.ndarray], decode: Callable, name: str, index=None):
    """``item`` (a prompt or a record) as a :class:`PromptRecord`, or a ValueError naming ``name``."""
    if isinstance(item, PromptRecord):
        return item
    if isinstance(item, Mapping):
        unknown = sorted(str(key) for key in item if key not in RECORD_KEYS)
        if unknown:
            raise ValueError(f"{name}: unknown keys {unknown}; a record has {list(RECORD_KEYS[:4])}")
        if "prompt" not in item:
            raise ValueError(f"{name}: a record needs a 'prompt' (text or token ids), got keys {sorted(item)}")
        nested = item.get("reward_model") or {}
        if not isinstance(nested, Mapping):
            raise ValueError(f"{name}['reward_model']: expected a mapping such as {{'ground_truth': ...}}")
        ground_truth = item.get("ground_truth", nested.get("ground_truth"))
        data_source = item.get("data_source")
        if data_source is not None and not isinstance(data_source, str):
            raise ValueError(f"{name}['data_source']: expected a str, got {data_source!r}")
        extra_info = item.get("extra_info")
        if extra_info is not None and not isinstance(extra_info, Mapping):
            raise ValueError(f"{name}['extra_info']: expected a mapping, got {extra_info!r}")
        prompt = item["prompt"]
    else:
        prompt, ground_truth, data_source, extra_info = item, None, None, None
    if isinstance(prompt, Sequence) and not isinstance(prompt, str) and any(isinstance(m, Mapping) for m in prompt):
        raise ValueError(
            f"{name}: chat messages ({prompt!r:.80}) are not supported: the environments read plain text "
            "or token ids; give the message's text"
        )
    if prompt is None or isinstance(prompt, (bool, bytes)) or not isinstance(prompt, (str, Sequence, np.ndarray)):
        raise ValueError(f"{name}: expected a prompt (text or a list of token ids) or a record, got {prompt!r}")
    try:
        ids = encode(prompt)
    except ValueError as error:
        raise ValueError(f"{name}: {error}") from None
    return PromptRecord(ids, decode(ids), ground_truth, data_source, extra_info, index)


class PromptSource:
    """The prompts of a ``prompts=`` argument, checked and encoded once (a sequence) or at each draw (a callable).

    :param prompts: a non-empty sequence of prompts or records, or a callable ``(rng) -> prompt or record``.
    :param encode: text or ids -> checked token ids (the environment's ``encode_prompt``).
    :param decode: token ids -> text.
    """

    def __init__(self, prompts: Any, encode: Callable[[Any], np.ndarray], decode: Callable) -> None:
        self._encode, self._decode = encode, decode
        self.draw_fn: Callable | None = None
        self.records: tuple[PromptRecord, ...] = ()
        if callable(prompts) and not isinstance(prompts, PromptRecord):
            self.draw_fn = prompts
        elif isinstance(prompts, (str, bytes, Mapping)) or not isinstance(prompts, (Sequence, np.ndarray)):
            raise ValueError(
                f"prompts: expected a list of prompts or records, or a callable (rng) -> record, got {prompts!r}"
            )
        elif len(prompts) == 0:
            raise ValueError("prompts: the list is empty; give at least one prompt")
        else:
            self.records = tuple(
                make_record(item, encode, decode, f"prompts[{i}]", index=i) for i, item in enumerate(prompts)
            )

    def __len__(self) -> int:
        """The number of prompts (0 for a callable source)."""
        return len(self.records)

    def draw(self, rng: np.random.Generator) -> PromptRecord:
        """A prompt drawn with ``rng``: uniformly from a sequence, or the callable's."""
        if self.draw_fn is None:
            return self.records[int(rng.integers(len(self.records)))]
        name = f"prompts ({getattr(self.draw_fn, '__name__', type(self.draw_fn).__name__)})"
        try:
            item = self.draw_fn(rng)
        except Exception as error:
            raise ValueError(f"{name}: raised {type(error).__name__}: {error}") from error
        return make_record(item, self._encode, self._decode, name)


class PromptSchedule:
    """The prompt of each environment's next episode, for ``num_envs`` environments.

    An environment with an explicit prompt (``set_explicit``) starts every episode from it until
    another is set (None: back to the source). Otherwise each episode draws from ``source`` (no
    source: the empty prompt). Environments ``g * group_size ... (g + 1) * group_size - 1`` form
    group ``g``: its ``k``-th drawn prompt is the ``k``-th episode prompt of each of them, however
    long their episodes are.
    """

    def __init__(self, source: PromptSource | None, num_envs: int, group_size: int = 1) -> None:
        if isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer)) or group_size < 1:
            raise ValueError(f"group_size: expected an integer >= 1, got {group_size!r}")
        if num_envs % group_size:
            raise ValueError(
                f"group_size: num_envs ({num_envs}) must be a multiple of group_size ({group_size}), "
                "as environments come in whole groups"
            )
        self.source, self.num_envs, self.group_size = source, num_envs, int(group_size)
        self.explicit: list[PromptRecord | None] = [None] * num_envs
        self.episode = np.zeros(num_envs, dtype=np.int64)  # the episode each environment starts next
        self._drawn: list[list[PromptRecord]] = [[] for _ in range(num_envs // self.group_size)]
        self._first = np.zeros(num_envs // self.group_size, dtype=np.int64)  # episode of _drawn[g][0]

    def restart(self) -> None:
        """Forget the drawn prompts and the episode counts (a reset with a new seed)."""
        self.episode[:] = 0
        self._first[:] = 0
        for drawn in self._drawn:
            drawn.clear()

    def state(self) -> tuple[Any, ...]:
        """A copy of what drawing changes, for :meth:`set_state` to put back."""
        return self.episode.copy(), self._first.copy(), [list(drawn) for drawn in self._drawn], list(self.explicit)

    def set_state(self, state: tuple[Any, ...]) -> None:
        episode, first, drawn, explicit = state
        self.episode[:], self._first[:], self._drawn, self.explicit = episode, first, drawn, explicit

    def set_explicit(self, index: int, record: PromptRecord | None) -> None:
        self.explicit[index] = record

    def group(self, index: int) -> int:
        return index // self.group_size

    def next(self, index: int, rng: np.random.Generator) -> tuple[PromptRecord, int]:
        """The prompt of environment ``index``'s next episode and that episode's number in its group."""
        episode = int(self.episode[index])
        self.episode[index] += 1
        if self.explicit[index] is not None:
            return self.explicit[index], episode
        if self.source is None:
            return NO_PROMPT, episode
        group = self.group(index)
        drawn = self._drawn[group]
        while episode - self._first[group] >= len(drawn):
            drawn.append(self.source.draw(rng))
        record = drawn[episode - self._first[group]]
        members = self.episode[group * self.group_size : (group + 1) * self.group_size]
        done = int(members.min()) - int(self._first[group])  # prompts every member has started
        if done > 0:
            del drawn[:done]
            self._first[group] += done
        return record, episode
