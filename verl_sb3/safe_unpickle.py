"""An unpickler for checkpoints not trusted: it builds what SB3, sb3-contrib, Gymnasium and
verl_sb3 pickle, and nothing that could run code, change the process or corrupt memory.

Python's own unpickler (``pickle._Unpickler``, whose opcodes can be checked) with three rules:

- A global is one of :data:`ALLOWED` (classes and functions that only build an object), or is
  replaced by a builder of this module: numpy arrays and scalars are built as fresh copies from
  the file's bytes after their sizes are checked (numpy's own pickling helpers trust their input:
  views of freed memory, negative offsets), dtypes only as plain number, string and time types,
  random generators only as PCG64 with a checked state, tensors only from ``weights_only`` files
  within their storage.
- BUILD (setting an object's state) applies only to instances of the allowed Python classes
  (spaces, schedules, verl_sb3's records), to a dtype with its own state, and to the placeholders
  of this module's builders, which BUILD turns into the checked object.
- Everything else is an ``UnpicklingError`` naming what was asked for.
"""

from __future__ import annotations

import io
import math
import pickle
import warnings
from typing import Any

import numpy as np
import torch as th

from verl_sb3.bounded_unpickler import BoundedUnpickler, objects_in

#: The pickles of SB3, sb3-contrib, Gymnasium, numpy and verl_sb3 objects name these, by module.
_ALLOWED_NAMES: dict[str, tuple[str, ...]] = {
    "builtins": ("set", "frozenset", "complex"),
    "collections": ("OrderedDict", "deque"),
    "torch": ("Size", "float16", "bfloat16", "float32", "float64", "int64", "bool"),
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
    "textenv_gym.tasks.reverse": ("compute_score",),
    "textenv_gym.tasks.arithmetic": ("compute_score",),
    "verl_sb3.policies": ("SLMLstmPolicy", "SLMTransformerPolicy"),
    "verl_sb3.policies.lstm": ("SLMLstmPolicy",),
    "verl_sb3.policies.transformer": ("SLMTransformerPolicy",),
    "verl_sb3.transformer_policy": ("SLMTransformerPolicy",),
    "verl_sb3.hf.policy": ("HFCausalLMPolicy",),
    "verl_sb3.hf": ("HFCausalLMPolicy",),
    "verl_sb3.kl_control": ("FixedKLController", "AdaptiveKLController"),
    "verl_sb3.verification.report": ("VerificationReport",),
    "verl_sb3.verification.judgement": ("NextRolloutJudgement", "PendingJudgement"),
    "verl_sb3.verification.reuse_mass": ("ReuseMassJudge",),
    "verl_sb3.verification.state": ("ModelState",),
    "verl_sb3.verified": ("_Snapshot", "_PendingJudgement"),  # models saved by verl_sb3 0.1
}
#: The ``(module, name)`` pairs an untrusted checkpoint's pickles may name as they are.
ALLOWED = frozenset((module, name) for module, names in _ALLOWED_NAMES.items() for name in names)
#: Packages whose allowed classes' instances BUILD may set the state of (their own __setstate__ or __dict__).
_BUILDABLE_PACKAGES = ("gymnasium.spaces", "stable_baselines3.common.utils", "verl_sb3")
#: Bit generators a pickled random generator may have.
BIT_GENERATORS = ("PCG64", "PCG64DXSM")
_MAX_POOL_SIZE = 1024


def _name(cls: Any) -> str:
    return f"{getattr(cls, '__module__', '?')}.{getattr(cls, '__qualname__', repr(cls))}"


def _refuse(what: str) -> pickle.UnpicklingError:
    return pickle.UnpicklingError(what)


# ------------------------------------------------------------------ numpy
def plain_dtype(*args: Any) -> np.dtype:
    """numpy's ``dtype``, for numbers, booleans, strings and times only."""
    try:
        dtype = np.dtype(*args)
    except (TypeError, ValueError) as error:
        raise _refuse(f"a numpy dtype {args!r} ({error})") from None
    if dtype.kind not in "biufcUSMm" or dtype.names is not None or dtype.subdtype is not None:
        raise _refuse(f"a numpy dtype {dtype} (only plain number, string and time dtypes load)")
    return dtype


def _buffer(data: Any) -> bytes:
    if isinstance(data, (bytes, bytearray)):
        return bytes(data)
    if isinstance(data, pickle.PickleBuffer):
        return bytes(data.raw())
    raise _refuse(f"numpy data given as {type(data).__name__} (bytes expected)")


def frombuffer(data: Any, dtype: Any, shape: Any, order: Any = "C", axis_order: Any = None) -> np.ndarray:
    """numpy's ``_frombuffer`` (how protocol-5 pickles hold arrays), as a checked, owned copy."""
    data = _buffer(data)
    if not isinstance(dtype, np.dtype):
        raise _refuse(f"an array of dtype {dtype!r}")
    dtype = plain_dtype(dtype)
    if not isinstance(shape, tuple) or not all(_plain_int(n) for n in shape):
        raise _refuse(f"an array of shape {shape!r}")
    if order not in ("C", "F", "K") or (order == "K") != (axis_order is not None):
        raise _refuse(f"an array of order {order!r}")
    if axis_order is not None and sorted(axis_order) != list(range(len(shape))):
        raise _refuse(f"an array of shape {shape} and axis order {axis_order!r}")
    if math.prod(shape) * dtype.itemsize != len(data):
        raise _refuse(f"an array of shape {shape} and dtype {dtype} from {len(data)} bytes")
    array = np.frombuffer(data, dtype=dtype)
    if axis_order is not None:  # numpy's own: the memory order of a transposed array
        return array.reshape(shape, order="C").transpose(tuple(axis_order)).copy(order="K")
    return array.reshape(shape, order=order).copy(order="K")


def scalar(dtype: Any, data: Any) -> Any:
    """numpy's ``scalar`` (how numpy scalars are pickled), checked."""
    data = _buffer(data)
    if not isinstance(dtype, np.dtype):
        raise _refuse(f"a numpy scalar of dtype {dtype!r}")
    dtype = plain_dtype(dtype)
    if len(data) != dtype.itemsize:
        raise _refuse(f"a numpy scalar of dtype {dtype} from {len(data)} bytes")
    return np.frombuffer(data, dtype=dtype)[0].copy()


class _Marker:
    """What a global that must not be called directly stands for (a class name, as an argument)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"<{self.name}>"


class _Pending:
    """A placeholder that BUILD turns into the checked object (``build(state)``)."""

    def build(self, state: Any) -> Any:
        raise NotImplementedError


class _PendingSeedSequence(_Pending):
    def build(self, state: Any) -> np.random.SeedSequence:
        if not (isinstance(state, tuple) and len(state) == 5):
            raise _refuse(f"a SeedSequence state {state!r}")
        entropy, n_children, _pool, pool_size, spawn_key = state  # the pool follows from the rest
        if not _plain_int(n_children) or not _plain_int(pool_size) or not 4 <= pool_size <= _MAX_POOL_SIZE:
            raise _refuse(f"a SeedSequence of pool size {pool_size!r} and {n_children!r} children")
        if not (entropy is None or _plain_int(entropy) or _uint_array(entropy)):
            raise _refuse(f"a SeedSequence of entropy {entropy!r}")
        if not (isinstance(spawn_key, tuple) and all(_plain_int(k) for k in spawn_key)):
            raise _refuse(f"a SeedSequence of spawn key {spawn_key!r}")
        return np.random.SeedSequence(entropy, spawn_key=spawn_key, pool_size=pool_size, n_children_spawned=n_children)


def _plain_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 0


def _uint_array(value: Any) -> bool:
    return isinstance(value, np.ndarray) and value.dtype.kind == "u" and value.ndim == 1


def seed_sequence(cls: Any, checksum: Any = None, state: Any = None) -> Any:
    """numpy's ``__pyx_unpickle_SeedSequence``: a placeholder, or the checked SeedSequence if ``state`` is given."""
    if not (isinstance(cls, _Marker) and cls.name == "SeedSequence"):
        raise _refuse(f"a SeedSequence of class {cls!r}")
    return _PendingSeedSequence() if state is None else _PendingSeedSequence().build(state)


class _PendingBitGenerator(_Pending):
    def __init__(self, name: str) -> None:
        self.name = name

    def build(self, state: Any) -> np.random.BitGenerator:
        seed_seq = None
        if isinstance(state, tuple) and len(state) == 2:
            state, seed_seq = state
        if seed_seq is not None and not isinstance(seed_seq, np.random.SeedSequence):
            raise _refuse(f"a bit generator seeded by {seed_seq!r}")
        generator = getattr(np.random, self.name)(seed_seq)
        generator.state = pcg64_state(self.name, state)
        return generator


def pcg64_state(name: str, state: Any) -> dict[str, Any]:
    """A PCG64 state dict with every field of the right type and range."""
    ok = (
        isinstance(state, dict)
        and set(state) == {"bit_generator", "state", "has_uint32", "uinteger"}
        and state["bit_generator"] == name
        and isinstance(state["state"], dict)
        and set(state["state"]) == {"state", "inc"}
        and all(_plain_int(v) and v < 2**128 for v in state["state"].values())
        and state["has_uint32"] in (0, 1)
        and _plain_int(state["uinteger"])
        and state["uinteger"] < 2**32
    )
    if not ok:
        raise _refuse(f"a {name} state {state!r}")
    return state


def bit_generator(name: Any = "MT19937") -> _PendingBitGenerator:
    """numpy's ``__bit_generator_ctor``: a placeholder that BUILD sets the checked state of."""
    name = name.name if isinstance(name, _Marker) else name
    if name not in BIT_GENERATORS:
        raise _refuse(f"a random generator of bit generator {name!r} (only {', '.join(BIT_GENERATORS)} load)")
    return _PendingBitGenerator(name)


def generator(bit_generator: Any = None, *_: Any) -> np.random.Generator:
    """numpy's ``__generator_ctor``, for a bit generator already built with its checked state."""
    if not isinstance(bit_generator, (np.random.PCG64, np.random.PCG64DXSM)):
        raise _refuse(f"a random generator of {bit_generator!r}")
    return np.random.Generator(bit_generator)


# ------------------------------------------------------------------ torch
def tensor_storage(data: bytes) -> Any:
    """torch's ``_load_from_bytes``, which pickled tensors call, with ``weights_only``."""
    try:
        storage = th.load(io.BytesIO(_buffer(data)), weights_only=True)
    except pickle.UnpicklingError:
        raise _refuse("a tensor file holding other objects than tensors") from None
    if not isinstance(storage, (th.UntypedStorage, th.TypedStorage)):  # what pickling a tensor writes
        raise _refuse(f"a tensor storage that is a {type(storage).__name__}")
    return storage


def rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any = False, hooks: Any = None,
                   metadata: Any = None) -> th.Tensor:  # fmt: skip
    """torch's ``_rebuild_tensor_v2``, within its storage and without backward hooks."""
    if not isinstance(storage, (th.UntypedStorage, th.TypedStorage)):
        raise _refuse(f"a tensor over {type(storage).__name__}")
    if hooks or metadata or not isinstance(requires_grad, bool):
        raise _refuse("a tensor with backward hooks or metadata")
    sizes, strides = tuple(size) if isinstance(size, (tuple, th.Size)) else None, stride
    if sizes is None or not isinstance(strides, tuple) or len(sizes) != len(strides):
        raise _refuse(f"a tensor of size {size!r} and stride {stride!r}")
    if not all(_plain_int(n) for n in (offset, *sizes, *strides)):
        raise _refuse(f"a tensor of size {size!r}, stride {stride!r} and offset {offset!r}")
    with warnings.catch_warnings():  # TypedStorage's deprecation: torch's own files still hold them
        warnings.simplefilter("ignore")
        elements = len(storage) if isinstance(storage, th.TypedStorage) else None
    numel = math.prod(sizes)
    if elements is not None and numel and (offset + sum((n - 1) * s for n, s in zip(sizes, strides)) >= elements
                                           or numel > elements):  # fmt: skip
        raise _refuse(f"a tensor of {numel} elements from a storage of {elements}")
    from torch._utils import _rebuild_tensor_v2

    return _rebuild_tensor_v2(storage, offset, th.Size(sizes), strides, requires_grad, type(hooks or {})())


#: Globals replaced by this module's checked builders, or by markers (not callable).
REPLACED: dict[tuple[str, str], Any] = {
    ("numpy", "dtype"): plain_dtype,
    ("numpy._core.numeric", "_frombuffer"): frombuffer,
    ("numpy.core.numeric", "_frombuffer"): frombuffer,
    ("numpy._core.multiarray", "scalar"): scalar,
    ("numpy.core.multiarray", "scalar"): scalar,
    ("numpy.random._pickle", "__bit_generator_ctor"): bit_generator,
    ("numpy.random._pickle", "__generator_ctor"): generator,
    ("numpy.random._pcg64", "PCG64"): _Marker("PCG64"),
    ("numpy.random._pcg64", "PCG64DXSM"): _Marker("PCG64DXSM"),
    ("numpy.random.bit_generator", "SeedSequence"): _Marker("SeedSequence"),
    ("numpy.random.bit_generator", "__pyx_unpickle_SeedSequence"): seed_sequence,
    ("torch.storage", "_load_from_bytes"): tensor_storage,
    ("torch._utils", "_rebuild_tensor_v2"): rebuild_tensor,
}


#: The classes a pickle may call (REDUCE), as pickle writes them: containers, ``complex``, ``torch.Size``.
#: The buildable classes (:meth:`RestrictedUnpickler.buildable`) are only created (NEWOBJ: no
#: ``__init__``, so no size the file chooses is allocated) and then given their state (BUILD).
_CALLABLE = (
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "complex"),
    ("collections", "OrderedDict"),
    ("collections", "deque"),
    ("torch", "Size"),
)
#: The classes besides the buildable ones that NEWOBJ may create.
_CREATABLE = (("sb3_contrib.common.recurrent.type_aliases", "RNNStates"),)
_BUILDERS = tuple(builder for builder in REPLACED.values() if callable(builder))


def _require_plain_state(target: Any, state: Any) -> None:
    """A state as pickle writes it for a plain Python object: a dict of attribute names (or a pair
    of such dicts or None: the ``__dict__`` and the slots), no special (``__x__``) names. Anything
    else (another mapping, a list of pairs) would reach ``__setstate__`` or ``setattr`` unchecked."""
    parts = state if type(state) is tuple and len(state) == 2 else (state,)
    for part in parts:
        if part is None and len(parts) == 2:
            continue
        if type(part) is not dict:
            raise _refuse(f"a {_name(type(target))} object given a state of type {_name(type(part))}")
        if any(type(key) is not str or key.startswith("__") for key in part):
            raise _refuse(f"a {_name(type(target))} object given special attributes ({sorted(map(str, part))})")


class RestrictedUnpickler(BoundedUnpickler):
    """See the module: :data:`ALLOWED` globals, :data:`REPLACED` builders, BUILD on allowed instances only
    (and objects of a bounded shape: :class:`~verl_sb3.bounded_unpickler.BoundedUnpickler`)."""

    _buildable: tuple[type, ...] | None = None
    _callable: tuple[Any, ...] | None = None
    _creatable: tuple[Any, ...] | None = None

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in REPLACED:
            return REPLACED[module, name]
        if (module, name) not in ALLOWED:
            raise _refuse(f"{module}.{name}")
        return super().find_class(module, name)

    def load_build(self) -> None:
        target, state = self.stack[-2], self.stack[-1]
        if isinstance(target, _Pending):
            self.stack.pop()
            built = target.build(state)
            self.stack[-1] = built
            for key, value in list(self.memo.items()):
                if value is target:
                    self.memo[key] = built
            return
        if isinstance(target, np.dtype):
            if state != target.__reduce__()[2]:
                raise _refuse(f"a numpy dtype {target} with other flags or fields than its own")
        elif type(target) not in self.buildable():
            kind = f"the class {_name(target)}" if isinstance(target, type) else f"a {_name(type(target))} object"
            raise _refuse(f"a change to {kind}")
        else:
            _require_plain_state(target, state)
        super().load_build()

    def _calls(self, load: Any, position: int, creates: bool) -> Any:
        """An opcode's loader that first checks the class it calls (REDUCE) or creates (NEWOBJ)."""

        def checked(self: RestrictedUnpickler) -> None:
            function = self.stack[position]
            if creates:
                allowed = function in self.creatable()
            else:
                allowed = any(function is builder for builder in _BUILDERS) or function in self.callable()
            if not allowed:
                name = _name(function) if isinstance(function, type) else repr(function)
                raise _refuse(f"{'an object of' if creates else 'a call of'} {name}")
            load(self)

        return checked

    dispatch = dict(BoundedUnpickler.dispatch)
    dispatch[pickle.BUILD[0]] = load_build
    for _opcode, _position, _creates in (
        (pickle.REDUCE, -2, False),
        (pickle.NEWOBJ, -2, True),
        (pickle.NEWOBJ_EX, -3, True),
    ):
        dispatch[_opcode[0]] = _calls(None, BoundedUnpickler.dispatch[_opcode[0]], _position, _creates)
    del _opcode, _position, _creates
    for _opcode in (pickle.OBJ, pickle.INST):  # protocol 0 and 1's calls: never in a saved model
        dispatch.pop(_opcode[0])
    del _opcode

    @classmethod
    def buildable(cls) -> tuple[type, ...]:
        """The allowed Python classes whose instances BUILD may set the state of (torch modules excepted)."""
        if cls._buildable is None:
            import importlib

            classes = []
            for module, name in ALLOWED:
                if module.startswith(_BUILDABLE_PACKAGES):
                    found = getattr(importlib.import_module(module), name)
                    if isinstance(found, type) and not issubclass(found, th.nn.Module):
                        classes.append(found)
            cls._buildable = tuple(classes)
        return cls._buildable

    @classmethod
    def callable(cls) -> tuple[Any, ...]:
        """The classes a pickle may call (REDUCE): containers, ``complex`` and ``torch.Size``."""
        if cls._callable is None:
            cls._callable = _classes(_CALLABLE)
        return cls._callable

    @classmethod
    def creatable(cls) -> tuple[Any, ...]:
        """The classes a pickle may create (NEWOBJ): the buildable ones and ``RNNStates``."""
        if cls._creatable is None:
            cls._creatable = cls.buildable() + _classes(_CREATABLE)
        return cls._creatable


def _classes(names: tuple[tuple[str, str], ...]) -> tuple[Any, ...]:
    import importlib

    return tuple(getattr(importlib.import_module(module), name) for module, name in names)


def restricted_loads(data: bytes) -> Any:
    """``pickle.loads`` with :class:`RestrictedUnpickler`."""
    loaded = RestrictedUnpickler(io.BytesIO(data)).load()
    buildable = RestrictedUnpickler.buildable()
    for obj in objects_in(loaded, lambda candidate: type(candidate) in buildable):
        if isinstance(obj, (_Pending, _Marker)):
            raise _refuse(f"an incomplete object ({obj!r} left unbuilt)")
    return loaded
