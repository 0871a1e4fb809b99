"""The training job's output folder: one job at a time, an earlier run never silently replaced.

A job holds an exclusive lock on ``<folder>/.verl-sb3.lock`` while it runs (a second job into the
same folder is refused). A folder that holds an earlier run's outputs is refused unless the job
replaces them (``--overwrite``, which removes only what a run writes) or continues them
(``--resume``, from the newest complete checkpoint).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import stat
import zipfile
from collections.abc import Iterator
from pathlib import Path

from verl_sb3.checkpoints import TRAINING_STATE_ENTRY

LOCK_NAME = ".verl-sb3.lock"
#: What a run writes into its folder, and so what ``--overwrite`` removes.
OUTPUTS = (
    "config.yaml",
    "updates.csv",
    "evaluations.json",
    "evaluation.md",
    "evaluation.json",
    "training_curves.png",
    "warm_start.json",
    "overoptimisation.json",
    "overoptimisation.png",
    "logs",
    "model_checkpoints",
)
#: The outputs that are files (the others are folders).
FILE_OUTPUTS = frozenset(name for name in OUTPUTS if "." in name)
#: The zip entry of a periodic checkpoint that holds the job's own state (its recorder's).
JOB_STATE_ENTRY = "verl_sb3_job.json"
_PERIODIC = re.compile(r"^model_(\d+)_steps\.zip$")


class JobError(ValueError):
    """A training job that cannot start: its folder is in use, holds another run, or cannot be resumed."""


@contextlib.contextmanager
def owned_folder(folder: str | Path, overwrite: bool = False, resume: bool = False) -> Iterator[Path]:
    """The job's output folder, created if needed and locked for the block.

    :raises JobError: when another job holds the folder, or when it holds an earlier run and
        neither ``overwrite`` (remove that run's outputs) nor ``resume`` (continue it) is given.
    :raises OSError: when the folder cannot be created or written (a file, read-only, full).
    """
    folder = Path(folder)
    if folder.is_symlink():
        raise JobError(
            f"output_dir {str(folder)!r}: is a symbolic link (to {os.readlink(folder)!r}); give the folder itself"
        )
    folder.mkdir(parents=True, exist_ok=True)
    _refuse_foreign_files(folder, removable=overwrite and not resume)
    with open(folder / LOCK_NAME, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise JobError(
                f"output_dir {str(folder)!r}: in use by another training job (it holds {LOCK_NAME})"
            ) from None
        try:
            used = [name for name in OUTPUTS if (folder / name).exists() or (folder / name).is_symlink()]
            if resume and not used:
                raise JobError(f"--resume {str(folder)!r}: holds no run to resume")
            if used and not resume:
                if not overwrite:
                    raise JobError(
                        f"output_dir {str(folder)!r}: holds an earlier run ({', '.join(used)}); pass --overwrite to "
                        f"replace it, or --resume {folder} to continue it"
                    )
                for name in used:
                    _remove(folder / name)
            yield folder
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _refuse_foreign_files(folder: Path, removable: bool) -> None:
    """Refuse outputs that are not the job's own files: symbolic links, hard links, FIFOs and the
    like (the job would write through them, outside its folder: into ``~/.bashrc`` for a planted
    ``updates.csv``, or block on a FIFO). ``--overwrite`` removes such entries as any other output
    (the entry, not what it points to)."""
    found = [folder / LOCK_NAME] if _foreign(folder / LOCK_NAME) else []
    for name in () if removable else OUTPUTS:
        path = folder / name
        found += [path] if _foreign(path) or (name in FILE_OUTPUTS and path.is_dir()) else []
        if name not in FILE_OUTPUTS and path.is_dir() and not path.is_symlink():
            found += [inner for inner in _walk(path) if _foreign(inner)]
    if found:
        raise JobError(
            f"output_dir {str(folder)!r}: holds links or special files a job would write through "
            f"({', '.join(map(str, found))}); remove them (the job writes only into its own folder)"
        )


def _walk(folder: Path) -> Iterator[Path]:
    """Every entry under ``folder``; a folder that cannot be listed is a JobError (not skipped)."""

    def refuse(error: OSError) -> None:
        raise JobError(
            f"output_dir: cannot look into {error.filename!r} ({error.strerror}); a job checks what it writes"
        )

    for root, dirs, files in os.walk(folder, onerror=refuse):
        yield from (Path(root, name) for name in dirs + files)


def _foreign(path: Path) -> bool:
    """Whether ``path`` is a symbolic link, a special file or a file with other hard links."""
    try:
        status = path.lstat()
    except FileNotFoundError:
        return False
    if stat.S_ISDIR(status.st_mode):
        return False
    return not stat.S_ISREG(status.st_mode) or status.st_nlink > 1


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def newest_checkpoint(folder: str | Path) -> Path:
    """The periodic checkpoint of ``folder``'s run with the most steps that is complete: a whole zip
    holding the training and the job state (a save killed mid-write leaves only its earlier ones).

    :raises JobError: when there is none.
    """
    folder = Path(folder)
    checkpoints = folder / "model_checkpoints"
    found = [(int(m.group(1)), p) for p in checkpoints.glob("model_*_steps.zip") if (m := _PERIODIC.match(p.name))]
    for _, path in sorted(found, reverse=True):
        if _complete(path):
            return path
    raise JobError(f"--resume {str(folder)!r}: no complete periodic checkpoint in {checkpoints} to resume from")


def _complete(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as archive:
            names = set(archive.namelist())
            return {JOB_STATE_ENTRY, TRAINING_STATE_ENTRY, "data"} <= names and archive.testzip() is None
    except (OSError, zipfile.BadZipFile):
        return False
