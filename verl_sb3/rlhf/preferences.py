"""Preference labels between two completions of a prompt, one JSON object per line (JSONL).

Each line of a preference file is an object with

- ``prompt`` (str): the text both completions continue ("" for none);
- ``a``, ``b`` (str): the two completions, as decoded text;
- ``choice``: ``"a"`` or ``"b"`` (the preferred completion) or ``"tie"``;
- ``labeller`` (str, optional): who labelled the pair;
- ``pair`` (int >= 0, optional): the pair's index in the stream ``verl-sb3 label`` sampled it from.

A line in TRL's form (``prompt``, ``chosen``, ``rejected``) is read as ``a`` = chosen, ``b`` =
rejected, ``choice`` = ``"a"``. Empty lines are allowed; any other deviation is a ValueError
naming the file and the line. :func:`append_preferences` writes each record with a single
``write`` to a file opened for appending, then syncs it: a crash leaves whole lines only.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CHOICES = ("a", "b", "tie")
_FIELDS = ("prompt", "a", "b", "choice", "labeller", "pair")
_TRL_FIELDS = ("prompt", "chosen", "rejected")


@dataclass(frozen=True)
class Preference:
    """One labelled pair: ``choice`` names the preferred completion (``"a"``, ``"b"``) or ``"tie"``."""

    prompt: str
    a: str
    b: str
    choice: str
    labeller: str | None = None
    pair: int | None = None

    def __post_init__(self) -> None:
        for name in ("prompt", "a", "b"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{name}: expected a string, got {getattr(self, name)!r}")
        if self.choice not in CHOICES:
            raise ValueError(f"choice: expected one of {list(CHOICES)}, got {self.choice!r}")
        if self.labeller is not None and not isinstance(self.labeller, str):
            raise ValueError(f"labeller: expected a string or null, got {self.labeller!r}")
        if self.pair is not None and (isinstance(self.pair, bool) or not isinstance(self.pair, int) or self.pair < 0):
            raise ValueError(f"pair: expected an integer >= 0 or null, got {self.pair!r}")

    @property
    def target(self) -> float:
        """The probability that ``a`` is preferred: 1, 0, or 0.5 for a tie (the Bradley-Terry target)."""
        return {"a": 1.0, "b": 0.0, "tie": 0.5}[self.choice]

    def as_dict(self) -> dict[str, Any]:
        """The record as its JSON object (optional fields left out when unset)."""
        record = {"prompt": self.prompt, "a": self.a, "b": self.b, "choice": self.choice}
        if self.labeller is not None:
            record["labeller"] = self.labeller
        if self.pair is not None:
            record["pair"] = self.pair
        return record

    @classmethod
    def from_dict(cls, record: Any) -> Preference:
        """A preference from its JSON object (either form), or a ValueError naming the problem."""
        if not isinstance(record, dict):
            raise ValueError(f"expected a JSON object, got {type(record).__name__}")
        if "chosen" in record or "rejected" in record:
            return _from_trl(record)
        missing = [name for name in ("prompt", "a", "b", "choice") if name not in record]
        if missing:
            raise ValueError(f"missing field(s) {missing}; a preference has {list(_FIELDS)}")
        unknown = sorted(set(record) - set(_FIELDS))
        if unknown:
            raise ValueError(f"unknown field(s) {unknown}; a preference has {list(_FIELDS)}")
        if record["choice"] not in CHOICES:
            raise ValueError(f"choice {record['choice']!r} names neither completion: expected 'a', 'b' or 'tie'")
        return cls(**record)


def _from_trl(record: dict[str, Any]) -> Preference:
    missing = [name for name in _TRL_FIELDS if name not in record]
    if missing:
        raise ValueError(f"missing field(s) {missing}; TRL's preference form has {list(_TRL_FIELDS)}")
    unknown = sorted(set(record) - {*_TRL_FIELDS, "labeller", "pair"})
    if unknown:
        raise ValueError(f"unknown field(s) {unknown} in TRL's preference form {list(_TRL_FIELDS)}")
    return Preference(
        record["prompt"], record["chosen"], record["rejected"], "a", record.get("labeller"), record.get("pair")
    )


def read_preferences(path: str | os.PathLike) -> list[Preference]:
    """The preferences of the JSONL file ``path``; a ValueError names the first bad line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"{path}: no such preference file") from None
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text ({error})") from None
    preferences = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}, line {number}: not JSON ({error.msg} at column {error.colno})") from None
        try:
            preferences.append(Preference.from_dict(record))
        except (TypeError, ValueError) as error:
            raise ValueError(f"{path}, line {number}: {error}") from None
    return preferences


def append_preferences(path: str | os.PathLike, preferences: Iterable[Preference]) -> None:
    """Append ``preferences`` to the JSONL file ``path`` (created if missing), each line written whole.

    A file whose last line is incomplete (a write cut short elsewhere) is refused before anything is
    appended, since a new line would be glued to it.
    """
    path = Path(path)
    lines = [json.dumps(preference.as_dict(), ensure_ascii=False) + "\n" for preference in preferences]
    descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(descriptor).st_size
        if size and _last_byte(path) != b"\n":
            raise ValueError(f"{path}: its last line is incomplete (no final newline); repair or remove it first")
        for line in lines:
            data = line.encode("utf-8")
            if os.write(descriptor, data) != len(data):
                raise OSError(f"{path}: a line was written only in part (is the disk full?)")
            os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _last_byte(path: Path) -> bytes:
    with open(path, "rb") as file:
        file.seek(-1, os.SEEK_END)
        return file.read(1)
