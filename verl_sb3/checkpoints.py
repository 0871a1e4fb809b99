"""Saving and loading checkpoints: atomic writes, clear errors for missing or damaged files."""

from __future__ import annotations

import importlib
import io
import json
import os
import stat
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Any

from stable_baselines3.common.base_class import BaseAlgorithm

#: Extra entry in the SB3 zip naming the algorithm class (SB3's loader ignores non-.pth entries).
METADATA_ENTRY = "verl_sb3.json"


class CheckpointError(ValueError):
    """A checkpoint file that cannot be loaded: missing, truncated or corrupt."""


def save_checkpoint(model: BaseAlgorithm, path: str | Path) -> Path:
    """Save ``model`` to ``path`` (``.zip`` added if missing) atomically.

    The model is written to a temporary file in the same folder, flushed to disk, then renamed
    over ``path``: a crash mid-save leaves any earlier file at ``path`` intact.
    """
    path = Path(path)
    if path.suffix != ".zip":
        path = path.with_name(path.name + ".zip")
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    model.save(buffer)
    with zipfile.ZipFile(buffer, mode="a") as archive:
        archive.writestr(METADATA_ENTRY, json.dumps({
            "algorithm": _class_name(type(model)),
            # Importable fallbacks when the class itself is not (e.g. defined in a script's __main__).
            "bases": [_class_name(c) for c in type(model).__mro__[1:] if issubclass(c, BaseAlgorithm)],
        }))
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            # mkstemp creates 0600 files: keep the mode of the file replaced, else the usual 0644.
            os.chmod(temporary, stat.S_IMODE(path.stat().st_mode) if path.is_file() else 0o644)
            file.write(buffer.getvalue())
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def _class_name(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _import_class(name: str) -> Any:
    module, _, qualname = name.partition(":")
    cls: Any = importlib.import_module(module)
    for part in qualname.split("."):
        cls = getattr(cls, part)
    return cls


def _algorithm_class(path: Path) -> type[BaseAlgorithm]:
    """The class recorded in the checkpoint, else its first importable algorithm base class (with a warning)."""
    with zipfile.ZipFile(path) as archive:
        if METADATA_ENTRY not in archive.namelist():
            from verl_sb3.verified import VerifiedRecurrentPPO

            return VerifiedRecurrentPPO
        metadata = json.loads(archive.read(METADATA_ENTRY))
    name = metadata["algorithm"]
    try:
        return _import_class(name)
    except (ImportError, AttributeError) as error:
        for base in metadata.get("bases", []):
            try:
                cls = _import_class(base)
            except (ImportError, AttributeError):
                continue
            warnings.warn(
                f"checkpoint {str(path)!r}: class {name!r} cannot be imported ({error}); loaded as {base!r}. "
                "Import the module that defines it, or pass cls=, to load it as its own class.",
                stacklevel=3,
            )
            return cls
        raise


def load_checkpoint(path: str | Path, env: Any = None, cls: type[BaseAlgorithm] | None = None, **kwargs: Any) -> BaseAlgorithm:
    """Load a checkpoint written by :func:`save_checkpoint` (or SB3's ``save``).

    :param path: the ``.zip`` file.
    :param env: environment to attach (optional, as for SB3's ``load``).
    :param cls: the algorithm class; by default the one recorded in the checkpoint.
    :raises CheckpointError: naming the file when it is missing, truncated or corrupt.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r}: no such file")
    try:
        if not zipfile.is_zipfile(path):
            raise CheckpointError(f"checkpoint {str(path)!r}: not a zip archive (truncated or corrupt file)")
        with zipfile.ZipFile(path) as archive:
            # A truncated checkpoint can still end with a zip directory: that of a torch file (itself a
            # zip) stored inside it. Its entries then do not start at the beginning of the file.
            if not archive.infolist() or min(info.header_offset for info in archive.infolist()) != 0:
                raise CheckpointError(f"checkpoint {str(path)!r}: not a complete zip archive (truncated or corrupt file)")
            damaged = archive.testzip()
            if damaged is not None:
                raise CheckpointError(f"checkpoint {str(path)!r}: entry {damaged!r} is corrupt")
            if "data" not in archive.namelist():
                raise CheckpointError(f"checkpoint {str(path)!r}: not a Stable-Baselines3 model (no 'data' entry)")
        return (cls or _algorithm_class(path)).load(path, env=env, **kwargs)
    except CheckpointError:
        raise
    except Exception as error:  # zipfile, json, pickle and torch each raise their own kind
        raise CheckpointError(f"checkpoint {str(path)!r}: cannot be loaded ({type(error).__name__}: {error})") from error
