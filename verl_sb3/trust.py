"""Loading saved models without running code from them.

An SB3 checkpoint's ``data`` entry holds pickles (the spaces, the schedules, the policy class,
this project's own objects), and unpickling can run any code the file names. Unless the caller
trusts the file, the pickles are rebuilt here by an unpickler that builds only the classes and
functions of :data:`ALLOWED` (what SB3, sb3-contrib, Gymnasium, numpy and verl_sb3 write), and
the algorithm class a checkpoint names is imported only from :data:`ALGORITHM_PACKAGES`.
Anything else is a :class:`UntrustedCheckpointError` naming the file and the entry; tensors are
read with ``torch.load(weights_only=True)`` (SB3's ``.pth`` entries too).
"""

from __future__ import annotations

import base64
import importlib
import io
import json
import os
import pickle
import sys
import types
import zipfile
from typing import IO, Any

import numpy as np
import torch as th
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.save_util import open_path


class CheckpointError(ValueError):
    """A checkpoint file that cannot be loaded: missing, truncated, corrupt, or not trusted to load."""


class UntrustedCheckpointError(CheckpointError):
    """A checkpoint whose loading would run code it names (load it with ``trusted=True`` if you trust it)."""


def _load_tensor_bytes(data: bytes) -> Any:
    """torch's ``_load_from_bytes``, which pickled tensors call, with only tensors and containers allowed."""
    try:
        return th.load(io.BytesIO(data), weights_only=True)
    except pickle.UnpicklingError:
        raise pickle.UnpicklingError("a tensor file holding other objects than tensors") from None


def _plain_dtype(*args: Any) -> np.dtype:
    """numpy's ``dtype``, which pickled arrays call, for numbers, booleans, strings and times only."""
    dtype = np.dtype(*args)
    if dtype.kind not in "biufcUSMm" or dtype.names is not None or dtype.subdtype is not None:
        raise pickle.UnpicklingError(f"a numpy dtype {dtype} (only plain number, string and time dtypes load)")
    return dtype


_NUMPY_CORE = ("_reconstruct", "scalar", "_frombuffer")
#: What the pickles of SB3, sb3-contrib, Gymnasium, numpy and verl_sb3 objects name, by module.
_ALLOWED_NAMES: dict[str, tuple[str, ...]] = {
    "builtins": ("set", "frozenset", "complex"),
    "collections": ("OrderedDict", "deque"),
    "numpy": ("ndarray",),  # numpy.dtype: _plain_dtype
    "numpy._core.multiarray": _NUMPY_CORE,
    "numpy._core.numeric": _NUMPY_CORE,
    "numpy.core.multiarray": _NUMPY_CORE,  # numpy < 2
    "numpy.core.numeric": _NUMPY_CORE,
    "numpy.random._pickle": ("__generator_ctor", "__bit_generator_ctor", "__randomstate_ctor"),
    "numpy.random._pcg64": ("PCG64", "PCG64DXSM"),
    "numpy.random._mt19937": ("MT19937",),
    "numpy.random._philox": ("Philox",),
    "numpy.random._sfc64": ("SFC64",),
    "numpy.random.bit_generator": ("SeedSequence", "__pyx_unpickle_SeedSequence"),
    "torch": ("Size", "float16", "bfloat16", "float32", "float64", "int64", "bool"),
    "torch._utils": ("_rebuild_tensor_v2",),
    "torch.nn.modules.activation": (
        *("ReLU", "ReLU6", "Tanh", "GELU", "SiLU", "ELU", "SELU", "CELU", "LeakyReLU", "PReLU", "Sigmoid"),
        *("Softplus", "Softsign", "Mish", "Hardtanh", "Hardswish", "Hardsigmoid", "Tanhshrink"),
    ),
    "torch.nn.modules.linear": ("Identity",),
    "torch.optim.adam": ("Adam",),
    "torch.optim.adamw": ("AdamW",),
    "torch.optim.sgd": ("SGD",),
    "torch.optim.rmsprop": ("RMSprop",),
    "torch.optim.radam": ("RAdam",),
    "torch.optim.nadam": ("NAdam",),
    "torch.optim.adamax": ("Adamax",),
    "torch.optim.adagrad": ("Adagrad",),
    "stable_baselines3.common.sb2_compat.rmsprop_tf_like": ("RMSpropTFLike",),
    "gymnasium.spaces.box": ("Box",),
    "gymnasium.spaces.discrete": ("Discrete",),
    "gymnasium.spaces.dict": ("Dict",),
    "gymnasium.spaces.tuple": ("Tuple",),
    "gymnasium.spaces.multi_discrete": ("MultiDiscrete",),
    "gymnasium.spaces.multi_binary": ("MultiBinary",),
    "stable_baselines3.common.utils": ("FloatSchedule", "ConstantSchedule", "LinearSchedule"),
    "stable_baselines3.common.buffers": ("RolloutBuffer", "DictRolloutBuffer"),
    "stable_baselines3.common.policies": ("ActorCriticPolicy", "ActorCriticCnnPolicy", "MultiInputActorCriticPolicy"),
    "stable_baselines3.common.torch_layers": ("FlattenExtractor", "NatureCNN", "CombinedExtractor"),
    "sb3_contrib.common.recurrent.policies": (
        "RecurrentActorCriticPolicy",
        "RecurrentActorCriticCnnPolicy",
        "RecurrentMultiInputActorCriticPolicy",
    ),
    "sb3_contrib.common.recurrent.type_aliases": ("RNNStates",),
    "verl_sb3.policies": ("SLMLstmPolicy", "SLMTransformerPolicy"),
    "verl_sb3.policies.lstm": ("SLMLstmPolicy",),
    "verl_sb3.policies.transformer": ("SLMTransformerPolicy",),
    "verl_sb3.transformer_policy": ("SLMTransformerPolicy",),
    "verl_sb3.kl_control": ("FixedKLController", "AdaptiveKLController"),
    "verl_sb3.verification.report": ("VerificationReport",),
    "verl_sb3.verification.judgement": ("NextRolloutJudgement", "PendingJudgement"),
    "verl_sb3.verification.reuse_mass": ("ReuseMassJudge",),
    "verl_sb3.verification.state": ("ModelState",),
    "verl_sb3.verified": ("_Snapshot", "_PendingJudgement"),  # models saved by verl_sb3 0.1
}
#: The ``(module, name)`` pairs an untrusted checkpoint's pickles may build: classes and functions
#: whose construction runs nothing but building the object.
ALLOWED = frozenset((module, name) for module, names in _ALLOWED_NAMES.items() for name in names)
#: Replacements for what pickled tensors and arrays call: the same, restricted.
_SAFE_REPLACEMENTS = {("torch.storage", "_load_from_bytes"): _load_tensor_bytes, ("numpy", "dtype"): _plain_dtype}
#: The packages whose algorithm classes an untrusted checkpoint may name.
ALGORITHM_PACKAGES = ("verl_sb3", "stable_baselines3", "sb3_contrib")


class _RestrictedUnpickler(pickle._Unpickler):  # the Python unpickler, whose opcodes can be checked
    """Builds only :data:`ALLOWED` names, never changes a class, a module or a function (pickle's
    BUILD would set their attributes for the whole process), and no numpy dtype that holds objects."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _SAFE_REPLACEMENTS:
            return _SAFE_REPLACEMENTS[module, name]
        if (module, name) not in ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name}")
        return super().find_class(module, name)

    def load_build(self) -> None:
        target, state = self.stack[-2], self.stack[-1]
        if isinstance(target, (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType)):
            raise pickle.UnpicklingError(f"a change to {target!r}")
        if isinstance(target, np.dtype) and state != target.__reduce__()[2]:
            raise pickle.UnpicklingError(f"a numpy dtype {target} with other flags or fields than its own")
        super().load_build()

    dispatch = {**pickle._Unpickler.dispatch, pickle.BUILD[0]: load_build}


def never_saved(cls: type[BaseAlgorithm]) -> frozenset[str]:
    """The attributes ``cls`` leaves out of its saves (SB3's ``_excluded_save_params``, ``env``
    among them): SB3's loader would set them on the model, or use them, from a file that has them."""
    bare = object.__new__(cls)  # the lists are constants: no state is read
    try:
        names = cls._excluded_save_params(bare)
    except Exception:  # a subclass's that reads its state
        names = BaseAlgorithm._excluded_save_params(bare)
    return frozenset(names)


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
            objects[entry] = _RestrictedUnpickler(io.BytesIO(base64.b64decode(value[":serialized:"]))).load()
        except pickle.UnpicklingError as error:
            raise UntrustedCheckpointError(
                f"checkpoint {name!r}: entry {entry!r} needs {error} to be loaded, which may run code; "
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
            safe = safe_custom_objects(io.BytesIO(data), custom_objects, name, never_saved(cls))
            path, custom_objects = io.BytesIO(data), {**safe, **(custom_objects or {})}
        return super().load(  # type: ignore[misc]
            path, env, device, custom_objects, print_system_info, force_reset, **kwargs
        )


def _name(source: Any) -> str:
    """A path's name in full; an open file's ``name``, else the kind of object."""
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    return str(getattr(source, "name", f"<{type(source).__name__}>"))
