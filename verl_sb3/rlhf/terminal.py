"""The person at the keyboard as a labeller: a pair shown on one stream, the key read from another."""

from __future__ import annotations

import sys
from typing import TextIO

from verl_sb3.rlhf.labelling import QUIT, SKIP

#: what each key means; a line is read and its first non-blank character taken, case ignored.
KEYS = {"l": "a", "1": "a", "r": "b", "2": "b", "t": "tie", "s": SKIP, "q": QUIT}
PROMPT = "[l]eft better, [r]ight better, [t]ie, [s]kip, [q]uit: "


class TerminalLabeller:
    """A ``label_fn`` that shows a pair side by side (left = ``a``, right = ``b``) and reads the choice.

    The end of the input counts as quit. An unknown key is said to be unknown and asked again.

    :param total: the number of pairs to show, for the "pair i of n" line (None: not shown).
    :param left: say "n left" instead of "n" (a resumed session).
    """

    def __init__(
        self, stdin: TextIO | None = None, stdout: TextIO | None = None, total: int | None = None, left: bool = False
    ) -> None:
        self.stdin = sys.stdin if stdin is None else stdin
        self.stdout = sys.stdout if stdout is None else stdout
        self.total, self.left, self.shown = total, left, 0

    def __call__(self, prompt: str, a: str, b: str) -> str:
        self.shown += 1
        heading = f"pair {self.shown}" + (f" of {self.total}{' left' if self.left else ''}" if self.total else "")
        lines = [f"--- {heading}", f"prompt: {prompt or '(none)'}", f"  left : {a}", f"  right: {b}"]
        self.stdout.write("\n".join(lines) + "\n")
        while True:
            self.stdout.write(PROMPT)
            self.stdout.flush()
            line = self.stdin.readline()
            if not line:  # end of input
                self.stdout.write("\n")
                return QUIT
            if not self.stdin.isatty():  # typed keys are echoed by a terminal only: keep a log readable
                self.stdout.write(line if line.endswith("\n") else line + "\n")
            key = line.strip()[:1].lower()
            if key in KEYS:
                return KEYS[key]
            self.stdout.write(f"unknown key {line.strip()!r}: type l, r, t, s or q, then Enter\n")
