"""Loading saved models without running code from them.

An SB3 checkpoint's ``data`` entry holds pickles (the spaces, the schedules, the policy class,
this project's own objects), and unpickling can run any code the file names. Unless the caller
trusts the file, the pickles are rebuilt by :mod:`verl_sb3.safe_unpickle` (only what SB3,
sb3-contrib, Gymnasium, numpy and verl_sb3 write, checked), entries a save never writes are
refused, the file's ``tensorboard_log`` is not used, and the algorithm class a checkpoint names
is only looked up among the modules imported (:data:`ALGORITHM_PACKAGES` are). Anything else is
a :class:`UntrustedCheckpointError` naming the file and the entry; SB3's ``.pth`` entries are
read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import base64
import importlib
import inspect
import io
import json
import os
import pickle
import sys
import zipfile
from typing import IO, Any

import torch as th
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.save_util import open_path

from verl_sb3.checkpoint_tensors import check_model_states, check_optimizer_states, check_torch_entries
from verl_sb3.safe_unpickle import ALLOWED, restricted_loads

__all__ = [
    "ALLOWED",
    "CheckpointError",
    "SafeLoadMixin",
    "UntrustedCheckpointError",
    "check_loaded",
    "safe_custom_objects",
    "untrusted_load_kwargs",
]


class CheckpointError(ValueError):
    """A checkpoint file that cannot be loaded: missing, truncated, corrupt, or not trusted to load."""


class UntrustedCheckpointError(CheckpointError):
    """A checkpoint whose loading would run code it names (load it with ``trusted=True`` if you trust it)."""


#: The packages whose algorithm classes an untrusted checkpoint may name.
ALGORITHM_PACKAGES = ("verl_sb3", "stable_baselines3", "sb3_contrib")


def never_saved(cls: type[BaseAlgorithm]) -> frozenset[str]:
    """The attributes ``cls`` leaves out of its saves (SB3's ``_excluded_save_params``, ``env``
    among them) and its methods: SB3's loader would set them on the model (an entry ``predict``
    would replace the method), or use them, from a file that has them."""
    bare = object.__new__(cls)  # the lists are constants: no state is read
    try:
        names = cls._excluded_save_params(bare)
    except Exception:  # a subclass's that reads its state
        names = BaseAlgorithm._excluded_save_params(bare)
    methods = {name for name in dir(cls) if _is_method(inspect.getattr_static(cls, name, None))}
    return frozenset(names) | frozenset(methods)


def _is_method(attribute: Any) -> bool:
    """Whether a class attribute is one an instance's ``__dict__`` entry would hide (not a property)."""
    if inspect.isdatadescriptor(attribute):  # a property: it wins over the instance's entry
        return False
    return isinstance(attribute, (classmethod, staticmethod)) or callable(attribute)


def safe_custom_objects(
    source: str | Any | IO[bytes],
    given: dict[str, Any] | None = None,
    name: str | None = None,
    never: frozenset[str] = frozenset(),
) -> dict[str, Any]:
    """SB3 ``custom_objects`` for every pickled entry of the checkpoint's data (those ``given``
    excepted), rebuilt with only :data:`ALLOWED` classes, so that SB3's loader unpickles nothing.

    :param name: the file's name for error messages (by default ``source``'s).
    :param never: entries a save never writes (:func:`never_saved`): a file that has one is refused.
    :raises UntrustedCheckpointError: naming the entry and what it would have built.
    """
    given = given or {}
    name = name or _name(source)
    with zipfile.ZipFile(source) as archive:
        data = json.loads(archive.read("data"))
    objects = {}
    for entry, value in data.items():
        if entry in given:
            continue
        if entry in never:
            raise UntrustedCheckpointError(
                f"checkpoint {name!r}: has an entry {entry!r}, which a saved model never holds (it would be set on "
                "the loaded model); load it with trusted=True only if you trust the file"
            )
        if not (isinstance(value, dict) and ":serialized:" in value):
            continue
        try:
            objects[entry] = restricted_loads(base64.b64decode(value[":serialized:"]))
        except pickle.UnpicklingError as error:
            raise UntrustedCheckpointError(
                f"checkpoint {name!r}: entry {entry!r} needs {error}, which a file not trusted may not build; "
                "load it with trusted=True (the command line: --trust-checkpoint) only if you trust the file, or "
                f"give custom_objects={{{entry!r}: ...}}"
            ) from None
    return objects


def algorithm_class(name: str, trusted: bool = False) -> type[BaseAlgorithm] | None:
    """The algorithm class ``module:qualname``, or None when it cannot be had.

    Without ``trusted``, nothing is imported but the packages of :data:`ALGORITHM_PACKAGES` (whose
    algorithms they import themselves): the class is found in a module already imported, and
    nothing but a :class:`~stable_baselines3.common.base_class.BaseAlgorithm` subclass is returned.
    """
    module_name, _, qualname = name.partition(":")
    try:
        if trusted:
            found: Any = importlib.import_module(module_name)
        else:
            if module_name.split(".")[0] in ALGORITHM_PACKAGES:  # the package only: it imports its algorithms
                importlib.import_module(module_name.split(".")[0])
            found = sys.modules[module_name]
        for part in qualname.split("."):
            found = getattr(found, part) if trusted else vars(found)[part]
    except (ImportError, AttributeError, KeyError, TypeError, ValueError):
        return None
    return found if isinstance(found, type) and issubclass(found, BaseAlgorithm) else None


def read_model(path: str | Any | IO[bytes]) -> tuple[bytes, str]:
    """The bytes of a saved model, opened as SB3 opens it (``.zip`` added when missing), and its name."""
    with open_path(path, "r", suffix="zip") as file:
        return file.read(), _name(file if isinstance(path, (str, os.PathLike)) else path)


class SafeLoadMixin:
    """SB3's ``load``, safe by default: the saved pickles are rebuilt from :data:`ALLOWED` classes only."""

    @classmethod
    def load(  # type: ignore[override]
        cls,
        path: str | Any | IO[bytes],
        env: Any = None,
        device: th.device | str = "auto",
        custom_objects: dict[str, Any] | None = None,
        print_system_info: bool = False,
        force_reset: bool = True,
        trusted: bool = False,
        **kwargs: Any,
    ) -> Any:
        """SB3's ``load``; with ``trusted`` (only for files you trust) the pickles are loaded as SB3 does.

        :raises UntrustedCheckpointError: when, without ``trusted``, an entry of the file would
            build something else than :data:`ALLOWED` (give it in ``custom_objects``, or trust the file).
        """
        if not trusted:
            data, name = read_model(path)
            kwargs = untrusted_load_kwargs(data, cls, name, {**kwargs, "custom_objects": custom_objects})
            model = super().load(  # type: ignore[misc]
                io.BytesIO(data), env, device, print_system_info=print_system_info, force_reset=force_reset, **kwargs
            )
            check_loaded(model, data, name)
            return model
        return super().load(  # type: ignore[misc]
            path, env, device, custom_objects, print_system_info, force_reset, **kwargs
        )


def untrusted_load_kwargs(data: bytes, cls: type[BaseAlgorithm], name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments of SB3's ``load`` for the saved model ``data`` not trusted: its pickled
    entries rebuilt (:func:`safe_custom_objects`), after its torch entries are checked
    (:func:`~verl_sb3.checkpoint_tensors.check_torch_entries`), and no ``tensorboard_log`` from the file."""
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        check_torch_entries(archive, cls, name, UntrustedCheckpointError)
    given = kwargs.get("custom_objects")
    safe = safe_custom_objects(io.BytesIO(data), given, name, never_saved(cls))
    _check_policy_settings(data, {**safe, **(given or {})}, name)
    # tensorboard_log: where learn() writes is not the file's to say
    return {**kwargs, "custom_objects": {**safe, **(given or {})}, "tensorboard_log": kwargs.get("tensorboard_log")}


def _check_policy_settings(data: bytes, objects: dict[str, Any], name: str) -> None:
    """The policy class's own check of the file's ``policy_kwargs`` (``check_saved_settings``, e.g.
    :class:`verl_sb3.hf.HFCausalLMPolicy`'s), before anything is built from them."""
    check = getattr(objects.get("policy_class"), "check_saved_settings", None)
    if not callable(check):
        return
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        kwargs = objects.get("policy_kwargs", json.loads(archive.read("data")).get("policy_kwargs"))
        weight_bytes = archive.getinfo("policy.pth").file_size if "policy.pth" in archive.namelist() else 0
    try:
        check(kwargs, weight_bytes)
    except ValueError as error:
        raise UntrustedCheckpointError(f"checkpoint {name!r}: {error}") from None


def check_loaded(model: BaseAlgorithm, data: bytes, name: str) -> None:
    """What a model loaded from ``data`` not trusted is checked for: its optimizers' states and the
    model states it may restore (:mod:`verl_sb3.checkpoint_tensors`)."""
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        check_optimizer_states(model, archive, name, UntrustedCheckpointError)
    check_model_states(model, name, UntrustedCheckpointError)


def _name(source: Any) -> str:
    """A path's name in full; an open file's ``name``, else the kind of object."""
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    return str(getattr(source, "name", f"<{type(source).__name__}>"))
