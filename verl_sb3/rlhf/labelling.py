"""Pairs of completions sampled from a model, and labelling them with a person or a function.

:func:`sample_pairs` draws pair ``i`` from the model with a seed derived from ``(seed, i)``: the
same model, seed and prompts give the same pairs, however many are asked for, which is what lets
:func:`label_pairs` resume a file. A labeller is a function ``label_fn(prompt, a, b)`` returning
``"a"``, ``"b"``, ``"tie"``, ``"skip"`` (not recorded; shown again when labelling resumes) or
``"quit"``; :class:`verl_sb3.rlhf.terminal.TerminalLabeller` asks the person at the keyboard.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from stable_baselines3.common.base_class import BaseAlgorithm

from verl_sb3._validation import require_int
from verl_sb3.generation import check_generation_args, generate, textgen_config
from verl_sb3.rlhf.preferences import CHOICES, Preference, append_preferences, read_preferences

SKIP, QUIT = "skip", "quit"
LabelFn = Callable[[str, str, str], str]


@dataclass(frozen=True)
class Pair:
    """Two completions of ``prompt``, sampled as pair number ``index``."""

    index: int
    prompt: str
    a: str
    b: str


@dataclass
class LabelSession:
    """What :func:`label_pairs` did: the preferences it recorded, the pairs skipped, whether the
    labeller quit, and the pairs already labelled in the file before."""

    recorded: list[Preference] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    quit: bool = False
    already_labelled: int = 0


def model_prompts(model: BaseAlgorithm) -> list[str]:
    """The prompts of ``model``'s environment (a task's records), or ``[""]`` when it has none."""
    source = textgen_config(model).prompt_source
    if source is None or not source.records:
        return [""]
    return [record.text for record in source.records]


def pair_seed(seed: int, index: int) -> int:
    """The sampling seed of pair ``index`` of a stream seeded with ``seed``."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def sample_pairs(
    model: BaseAlgorithm,
    num_pairs: int,
    prompts: Sequence[str] | None = None,
    seed: int = 0,
    temperature: float = 1.0,
    start: int = 0,
) -> list[Pair]:
    """Pairs ``start .. start + num_pairs - 1``: pair ``i`` is two completions of ``prompts[i % len(prompts)]``.

    :param prompts: the prompts to cycle through (default: :func:`model_prompts`).
    """
    return list(iter_pairs(model, num_pairs, prompts, seed, temperature, start))


def iter_pairs(
    model: BaseAlgorithm,
    num_pairs: int,
    prompts: Sequence[str] | None = None,
    seed: int = 0,
    temperature: float = 1.0,
    start: int = 0,
) -> Iterator[Pair]:
    """:func:`sample_pairs`'s pairs, each sampled when it is asked for (the first is shown at once)."""
    require_int("num_pairs", num_pairs, 1)
    require_int("start", start, 0)
    require_int("seed", seed, 0)
    check_generation_args(2, temperature, seed)
    prompts = model_prompts(model) if prompts is None else list(prompts)
    if not prompts or not all(isinstance(prompt, str) for prompt in prompts):
        raise ValueError(f"prompts: expected a non-empty list of strings, got {prompts!r}")
    return _pairs(model, range(start, start + num_pairs), prompts, seed, temperature)


def _pairs(model: BaseAlgorithm, indices: range, prompts: list[str], seed: int, temperature: float) -> Iterator[Pair]:
    for index in indices:
        prompt = prompts[index % len(prompts)]
        sampled = generate(model, prompt or None, 2, temperature=temperature, seed=pair_seed(seed, index))
        yield Pair(index, prompt, *sampled.texts)


def label_pairs(
    pairs: Iterable[Pair],
    label_fn: LabelFn,
    output: str | os.PathLike | None = None,
    labeller: str | None = None,
) -> LabelSession:
    """Ask ``label_fn`` about each pair and append each answer to ``output`` as soon as it is given.

    Pairs the file already labelled (same index, same texts) are not asked again; one labelled from
    other texts under the same index is a ValueError (another model, seed or prompt set: use another
    file). Without ``output`` nothing is written.
    """
    if not callable(label_fn):
        raise ValueError(f"label_fn: expected a callable (prompt, a, b) -> choice, got {label_fn!r}")
    done = _labelled_pairs(Path(output)) if output is not None and Path(output).exists() else {}
    session = LabelSession()
    for pair in pairs:
        if pair.index in done:
            _require_same(done[pair.index], pair, output)
            session.already_labelled += 1
            continue
        choice = label_fn(pair.prompt, pair.a, pair.b)
        if choice == QUIT:
            session.quit = True
            break
        if choice == SKIP:
            session.skipped.append(pair.index)
            continue
        if choice not in CHOICES:
            raise ValueError(f"label_fn: returned {choice!r}, expected one of {[*CHOICES, SKIP, QUIT]}")
        preference = Preference(pair.prompt, pair.a, pair.b, choice, labeller, pair.index)
        if output is not None:
            append_preferences(output, [preference])
        session.recorded.append(preference)
    return session


def _labelled_pairs(path: Path) -> dict[int, Preference]:
    return {preference.pair: preference for preference in read_preferences(path) if preference.pair is not None}


def _require_same(preference: Preference, pair: Pair, output: str | os.PathLike | None) -> None:
    if (preference.prompt, preference.a, preference.b) != (pair.prompt, pair.a, pair.b):
        raise ValueError(
            f"{output}: pair {pair.index} was labelled on other completions than the ones sampled now "
            "(another model, seed, temperature or prompt set?); label into another file"
        )
