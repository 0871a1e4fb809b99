"""Writing the job's outputs without writing through what a folder may hold in their place.

A folder from elsewhere (an archive, another user) can hold a symbolic link, a hard link or a
FIFO where an output goes: writing to it in place would change the file it points to (a
``~/.bashrc``) or block. These helpers replace the folder's entry instead: a new file, written
whole (:func:`replace_text`, :func:`replace_with`), or created fresh after the old entry is
removed (:func:`open_fresh`).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def replace_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to a new file and rename it to ``path`` (the old entry replaced, not written through)."""
    path = Path(path)
    replace_with(path, lambda temporary: Path(temporary).write_text(text))
    return path


def replace_with(path: str | Path, write: Callable[[str], Any]) -> None:
    """``write(temporary_path)``, then rename the temporary file to ``path``; nothing is left behind on failure."""
    path = Path(path)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{path.suffix}")
    os.close(descriptor)  # a new file of a random name, created here: nothing planted can be at it
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)


def open_fresh(path: str | Path, newline: str | None = None) -> IO[str]:
    """``path`` opened for writing as a new file: whatever the folder held there is removed first."""
    path = Path(path)
    if path.is_symlink() or path.exists():
        path.unlink()
    return open(path, "x", newline=newline)
