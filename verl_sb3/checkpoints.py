"""Saving and loading checkpoints: atomic writes, clear errors for missing or damaged files, exact resumption.

SB3's ``save`` keeps the model, the optimizer, the counters and the verification log, but not
the random generators' states nor the recurrent policy's last LSTM states. :func:`save_checkpoint`
adds them to the zip (entry ``verl_sb3_training_state.npz``), :func:`load_checkpoint` puts them
back, and :func:`resume_checkpoint` also reconnects the environment, so that training on
continues exactly as if it had not stopped (see its docstring for the condition).
"""

from __future__ import annotations

import glob
import io
import json
import os
import pickle
import random
import stat
import tempfile
import time
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch as th
from stable_baselines3.common.base_class import BaseAlgorithm

from textenv_gym.sb3_vec_env import environment_config
from verl_sb3.safe_unpickle import BIT_GENERATORS, pcg64_state
from verl_sb3.trust import (
    ALGORITHM_PACKAGES,
    CheckpointError,
    SafeLoadMixin,
    UntrustedCheckpointError,
    algorithm_class,
    check_loaded,
    untrusted_load_kwargs,
)

__all__ = ["CheckpointError", "UntrustedCheckpointError", "load_checkpoint", "resume_checkpoint", "save_checkpoint"]

#: Extra entry in the SB3 zip naming the algorithm class (SB3's loader ignores non-.pth entries).
METADATA_ENTRY = "verl_sb3.json"
#: Extra entry holding what resuming needs besides SB3's save: random generators, last LSTM states.
TRAINING_STATE_ENTRY = "verl_sb3_training_state.npz"


def save_checkpoint(
    model: BaseAlgorithm, path: str | Path, training_state: bool = True, extra_entries: dict[str, bytes] | None = None
) -> Path:
    """Save ``model`` to ``path`` (``.zip`` added if missing) atomically.

    The model is written to a temporary file in the same folder, flushed to disk, then renamed
    over ``path``: a crash mid-save leaves any earlier file at ``path`` intact. With
    ``training_state`` (the default) the random generators' states (Python, numpy, torch, the
    model's action space) and the last LSTM states are saved too, for :func:`resume_checkpoint`.
    ``extra_entries`` are written into the zip too (a training job's own state).
    """
    path = Path(path)
    if path.suffix != ".zip":
        path = path.with_name(path.name + ".zip")
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    model.save(buffer)
    with zipfile.ZipFile(buffer, mode="a") as archive:
        archive.writestr(
            METADATA_ENTRY,
            json.dumps(
                {
                    "algorithm": _class_name(type(model)),
                    # Importable fallbacks when the class itself is not (e.g. defined in a script's __main__).
                    "bases": [_class_name(c) for c in type(model).__mro__[1:] if issubclass(c, BaseAlgorithm)],
                }
            ),
        )
        if training_state:
            archive.writestr(TRAINING_STATE_ENTRY, _training_state_bytes(model))
        for name, data in (extra_entries or {}).items():
            archive.writestr(name, data)
    _remove_stale_temporaries(path)
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


#: A temporary file of a save older than this (seconds) is a killed save's, removed by the next save.
STALE_TEMPORARY_AGE = 60.0


def _remove_stale_temporaries(path: Path) -> None:
    """Remove what saves to ``path`` that were killed mid-write left behind (their temporary files)."""
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        try:
            if time.time() - stale.stat().st_mtime > STALE_TEMPORARY_AGE:
                stale.unlink()
        except FileNotFoundError:  # another save just finished with it
            pass


def _class_name(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _algorithm_class(archive: zipfile.ZipFile, path: Path, trusted: bool) -> type[BaseAlgorithm]:
    """The class recorded in the checkpoint, else its first base class that can be had (with a warning)."""
    if METADATA_ENTRY not in archive.namelist():
        from verl_sb3.verified import VerifiedRecurrentPPO

        return VerifiedRecurrentPPO
    metadata = json.loads(archive.read(METADATA_ENTRY))
    name = metadata["algorithm"]
    found = algorithm_class(name, trusted)
    if found is not None:
        return found
    why = "cannot be imported" + (
        ""
        if trusted
        else f" (from a file not trusted: only from {', '.join(ALGORITHM_PACKAGES)} or a module already imported)"
    )
    for base in metadata.get("bases", []):
        cls = algorithm_class(base, trusted)
        if cls is not None:
            warnings.warn(
                f"checkpoint {str(path)!r}: class {name!r} {why}; loaded as {base!r}. Import the module that "
                "defines it first, or pass cls=, to load it as its own class.",
                stacklevel=3,
            )
            return cls
    raise (CheckpointError if trusted else UntrustedCheckpointError)(
        f"checkpoint {str(path)!r}: class {name!r} {why}, nor any of its base classes; pass cls="
        + ("" if trusted else " (or trusted=True if you trust the file)")
    )


def load_checkpoint(
    path: str | Path,
    env: Any = None,
    cls: type[BaseAlgorithm] | None = None,
    restore_training_state: bool = True,
    trusted: bool = False,
    **kwargs: Any,
) -> BaseAlgorithm:
    """Load a checkpoint written by :func:`save_checkpoint` (or SB3's ``save``).

    :param path: the ``.zip`` file.
    :param env: environment to attach (optional, as for SB3's ``load``).
    :param cls: the algorithm class; by default the one recorded in the checkpoint.
    :param restore_training_state: put back the random generators' states (global: Python's,
        numpy's and torch's) and the last LSTM states saved with the checkpoint, when it has them.
        SB3's ``load`` itself reseeds the global generators with the model's seed.
    :param trusted: load the file's pickles as SB3 does, which can run any code they name: only
        for files you trust. By default only the classes of :data:`verl_sb3.trust.ALLOWED` are
        built, and the recorded class is imported only from verl_sb3, SB3 and sb3-contrib.
    :param kwargs: passed to the class's ``load``.
    :raises CheckpointError: naming the file when it is missing, truncated or corrupt;
        :class:`UntrustedCheckpointError` when it needs more than the allowed classes to load.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r}: no such file")
    guessed = False  # no class given nor recorded
    try:
        data = path.read_bytes()  # read once: what is checked is what is loaded
        if not zipfile.is_zipfile(io.BytesIO(data)):
            raise CheckpointError(f"checkpoint {str(path)!r}: not a zip archive (truncated or corrupt file)")
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            _require_complete(archive, path)
            guessed = cls is None and METADATA_ENTRY not in archive.namelist()
            cls = cls or _algorithm_class(archive, path, trusted)
            state = archive.read(TRAINING_STATE_ENTRY) if TRAINING_STATE_ENTRY in archive.namelist() else None
        if not trusted:
            kwargs = untrusted_load_kwargs(data, cls, str(path), kwargs)
        if issubclass(cls, SafeLoadMixin):
            kwargs["trusted"] = True  # its pickles are already rebuilt (or trusted)
        model = cls.load(io.BytesIO(data), env=env, **kwargs)
        if not trusted:
            check_loaded(model, data, str(path))
        if restore_training_state and state is not None:
            _restore_training_state(model, state, path)
        return model
    except CheckpointError:
        raise
    except Exception as error:  # zipfile, json, pickle and torch each raise their own kind
        hint = (
            f"; it names no algorithm (no {METADATA_ENTRY}: saved by SB3's save?) and was loaded as a "
            f"{cls.__name__}: pass cls= (for instance stable_baselines3.PPO)"
            if guessed
            else ""
        )
        raise CheckpointError(
            f"checkpoint {str(path)!r}: cannot be loaded ({type(error).__name__}: {error}){hint}"
        ) from error


def _require_complete(archive: zipfile.ZipFile, path: Path) -> None:
    # A truncated checkpoint can still end with a zip directory: that of a torch file (itself a
    # zip) stored inside it. Its entries then do not start at the beginning of the file.
    if not archive.infolist() or min(info.header_offset for info in archive.infolist()) != 0:
        raise CheckpointError(f"checkpoint {str(path)!r}: not a complete zip archive (truncated or corrupt file)")
    damaged = archive.testzip()
    if damaged is not None:
        raise CheckpointError(f"checkpoint {str(path)!r}: entry {damaged!r} is corrupt")
    if "data" not in archive.namelist():
        raise CheckpointError(f"checkpoint {str(path)!r}: not a Stable-Baselines3 model (no 'data' entry)")


def resume_checkpoint(
    path: str | Path,
    env: Any,
    cls: type[BaseAlgorithm] | None = None,
    exact: bool = True,
    trusted: bool = False,
    **kwargs: Any,
) -> BaseAlgorithm:
    """Load a checkpoint to train on, as if training had not stopped.

    Then ``model.learn(total_timesteps - model.num_timesteps, reset_num_timesteps=False)``, with the
    run's callbacks that act on training (the training job's ``CriticWarmupCallback``), gives, on
    the CPU with the same library versions, bit for bit the run that was not interrupted
    (parameters, optimizer, verification log, ``ent_coef``, counters), when the checkpoint was
    written by :func:`save_checkpoint` between two updates (after ``learn`` returned, or from a
    callback's ``_on_rollout_start``, as :class:`verl_sb3.training.TrainingRecorder` does) with
    every environment at the start of an episode.

    The environments' own state is not saved (a ``VecEnv`` has no general way to give it), so
    exactness needs that episode boundary: TextGen-v0 episodes have a fixed length, and with
    ``n_steps`` a multiple of ``max_length`` every rollout ends on one. ``env`` is then reset,
    and its first observation must be the one recorded in the checkpoint.

    :param path: the ``.zip`` file.
    :param env: the environment to train on: built as the checkpointed one (same settings and
        number of environments).
    :param cls: the algorithm class; by default the one recorded in the checkpoint.
    :param exact: when False, a checkpoint taken mid-episode or an environment that starts
        differently only warns: training goes on from freshly reset environments.
    :param trusted: as for :func:`load_checkpoint`.
    :raises CheckpointError: naming the file when it cannot be loaded, holds no training state,
        or (with ``exact``) cannot be resumed exactly.
    """
    path = Path(path)
    model = load_checkpoint(path, env=env, cls=cls, trusted=trusted, force_reset=False, **kwargs)
    with zipfile.ZipFile(path) as archive:
        if TRAINING_STATE_ENTRY not in archive.namelist():
            raise CheckpointError(
                f"checkpoint {str(path)!r}: holds no training state (random generators; written by SB3's save or "
                "save_checkpoint(training_state=False)): it cannot be resumed exactly; load_checkpoint() it instead"
            )
    _require_same_environment(path, model)
    problems = []
    starts, saved_obs = getattr(model, "_last_episode_starts", None), model._last_obs
    observation = model.env.reset()
    if starts is not None or saved_obs is not None:  # else saved before any training: a fresh start, as the run's own
        mid_episode = len(starts) - int(np.sum(starts)) if starts is not None else model.env.num_envs
        if mid_episode:
            problems.append(
                f"{mid_episode} of {model.env.num_envs} environments were mid-episode when it was saved, "
                "and the environments' state is not saved"
            )
        elif not _same_observation(observation, saved_obs):
            problems.append("the environment starts its episodes differently from the checkpointed one")
    if problems:
        message = f"checkpoint {str(path)!r}: cannot resume exactly: {'; '.join(problems)}"
        if exact:
            raise CheckpointError(f"{message}. Pass exact=False to go on from freshly reset environments.")
        warnings.warn(f"{message}; going on from freshly reset environments", stacklevel=2)
    model._last_obs = observation
    model._last_episode_starts = np.ones((model.env.num_envs,), dtype=bool)
    return model


def _require_same_environment(path: Path, model: BaseAlgorithm) -> None:
    """A CheckpointError unless the environment to resume on has the checkpointed run's settings
    (``model.env_kwargs``, which the training job records; environments that do not say theirs,
    through a ``config`` attribute as TextGen-v0's, are not compared)."""
    saved = getattr(model, "env_kwargs", None)
    config = environment_config(model.env)
    if not saved or not hasattr(config, "as_kwargs"):
        return
    try:  # the saved settings completed with their defaults, as the environment's own are
        saved = type(config)(**saved).as_kwargs()
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"checkpoint {str(path)!r}: its environment settings are not valid: {error}") from None
    current = config.as_kwargs()
    names = {"reward_fns"}  # callables: their names are compared
    differ = [
        f"{name} {saved.get(name)!r} (checkpoint) against {current.get(name)!r} (environment)"
        for name in sorted(set(saved) | set(current) - names)
        if name not in names and _normalised(saved.get(name)) != _normalised(current.get(name))
    ]
    if sorted(saved.get("reward_fns") or ()) != sorted(current.get("reward_fns") or ()):
        differ.append(
            f"reward_fns {sorted(saved.get('reward_fns') or ())} against {sorted(current.get('reward_fns') or ())}"
        )
    if differ:
        raise CheckpointError(
            f"checkpoint {str(path)!r}: the environment's settings differ from the checkpointed run's: "
            f"{'; '.join(differ)}; resume on an environment built as the run's"
        )


def _normalised(value: Any) -> Any:
    """Lists for tuples, as JSON gives them back; a function by its name."""
    if callable(value):
        return f"{getattr(value, '__module__', '')}.{getattr(value, '__qualname__', type(value).__name__)}"
    if isinstance(value, (list, tuple)):
        return [_normalised(item) for item in value]
    if isinstance(value, dict):
        return {key: _normalised(item) for key, item in value.items()}
    return value


def _same_observation(a: Any, b: Any) -> bool:
    if isinstance(a, dict) or isinstance(b, dict):
        return (
            isinstance(a, dict)
            and isinstance(b, dict)
            and a.keys() == b.keys()
            and all(np.array_equal(a[k], b[k]) for k in a)
        )
    return a is not None and b is not None and np.array_equal(np.asarray(a), np.asarray(b))


def _tensor_leaves(value: Any) -> list[th.Tensor]:
    """The tensors of nested tuples (such as sb3-contrib's ``RNNStates``), in order."""
    if isinstance(value, th.Tensor):
        return [value]
    return [leaf for item in value for leaf in _tensor_leaves(item)]


def _rebuild(template: Any, leaves: Any) -> Any:
    """``template``'s nested tuples with its tensors replaced, in order, by ``leaves``."""
    if isinstance(template, th.Tensor):
        return next(leaves)
    items = [_rebuild(item, leaves) for item in template]
    return type(template)(*items) if hasattr(template, "_fields") else type(template)(items)


def _training_state_bytes(model: BaseAlgorithm) -> bytes:
    """The random generators' states and the last LSTM states, as an ``.npz`` (no pickles)."""
    version, internal, gauss_next = random.getstate()
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    space_rng = getattr(model.action_space, "_np_random", None)
    lstm_states = getattr(model, "_last_lstm_states", None)
    leaves = _tensor_leaves(lstm_states) if lstm_states is not None else []
    meta = {
        "format": 1,
        "python_random": {"version": version, "gauss_next": gauss_next},
        "numpy_random": {
            "name": name,
            "pos": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "action_space_random": None if space_rng is None else space_rng.bit_generator.state,
        "last_lstm_states": len(leaves) if lstm_states is not None else None,
    }
    arrays = {
        "meta": np.array(json.dumps(meta)),
        "python_random": np.array(internal, dtype=np.uint32),
        "numpy_random": np.asarray(keys, dtype=np.uint32),
        "torch_random": th.get_rng_state().numpy(),
    }
    for index, leaf in enumerate(leaves):
        arrays[f"last_lstm_states_{index}"] = leaf.detach().cpu().numpy()
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def _valid_torch_rng_state(state: np.ndarray) -> bool:
    """A CPU generator's state as torch writes it: its size, and a Mersenne twister position that
    stays within the 624 words of state (torch checks neither ``left`` nor ``next``, and reads past them)."""
    if state.dtype != np.uint8 or state.shape != tuple(th.get_rng_state().shape):
        return False
    raw = state.tobytes()  # torch's CPUGeneratorImplStateLegacy: seed u64, left i32, seeded i32, next u64, ...
    left, next_word = int(np.frombuffer(raw[8:12], np.int32)[0]), int(np.frombuffer(raw[16:24], np.uint64)[0])
    return left >= 1 and next_word + left <= 625


def _restore_training_state(model: BaseAlgorithm, data: bytes, path: Path) -> None:
    with np.load(io.BytesIO(data), allow_pickle=False) as archive:
        arrays = {name: archive[name] for name in archive.files}
    meta = json.loads(str(arrays["meta"]))
    if meta.get("format") != 1:
        raise CheckpointError(f"checkpoint {str(path)!r}: training state of unknown format {meta.get('format')!r}")
    python = meta["python_random"]
    if not (python["gauss_next"] is None or type(python["gauss_next"]) is float):
        raise CheckpointError(f"checkpoint {str(path)!r}: Python's random state has a gauss_next that is not a number")
    random.setstate((python["version"], tuple(int(x) for x in arrays["python_random"]), python["gauss_next"]))
    legacy = meta["numpy_random"]
    keys = arrays["numpy_random"]
    # numpy does not check the position: one out of [0, 624] reads out of bounds
    if not (
        legacy["name"] == "MT19937"
        and keys.shape == (624,)
        and keys.dtype == np.uint32
        and isinstance(legacy["pos"], int)
        and 0 <= legacy["pos"] <= 624
        and legacy["has_gauss"] in (0, 1)
    ):
        raise CheckpointError(f"checkpoint {str(path)!r}: numpy's random state is not a valid MT19937 state")
    np.random.set_state((legacy["name"], keys, legacy["pos"], legacy["has_gauss"], legacy["cached_gaussian"]))
    if not _valid_torch_rng_state(arrays["torch_random"]):
        raise CheckpointError(f"checkpoint {str(path)!r}: torch's random state is not a valid CPU generator state")
    th.set_rng_state(th.from_numpy(arrays["torch_random"].copy()))
    space_state = meta["action_space_random"]
    if space_state is not None and model.action_space is not None:
        name = space_state.get("bit_generator") if isinstance(space_state, dict) else None
        if name not in BIT_GENERATORS:
            raise CheckpointError(
                f"checkpoint {str(path)!r}: the action space's random generator {name!r} is not one of {BIT_GENERATORS}"
            )
        try:
            checked = pcg64_state(name, space_state)
        except pickle.UnpicklingError as error:
            raise CheckpointError(f"checkpoint {str(path)!r}: the action space's random generator: {error}") from None
        generator = np.random.Generator(getattr(np.random, name)())
        generator.bit_generator.state = checked
        model.action_space._np_random = generator
    template = getattr(model, "_last_lstm_states", None)
    count = meta["last_lstm_states"]
    if count is not None and template is not None:
        leaves = [th.as_tensor(arrays[f"last_lstm_states_{index}"], device=model.device) for index in range(count)]
        current = _tensor_leaves(template)
        if any(leaf.dtype != current[0].dtype for leaf in leaves):
            raise CheckpointError(
                f"checkpoint {str(path)!r}: last LSTM states of dtypes {sorted({str(leaf.dtype) for leaf in leaves})} "
                f"({current[0].dtype} expected)"
            )
        # Another number of environments (a checkpoint loaded for another use): the states do not
        # apply; the policy starts every sequence from zero at an episode start anyway.
        if len(current) == len(leaves) and all(a.shape == b.shape for a, b in zip(current, leaves)):
            model._last_lstm_states = _rebuild(template, iter(leaves))
