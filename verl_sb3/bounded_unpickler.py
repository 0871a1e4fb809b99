"""An unpickler whose objects cannot crash the interpreter by their shape.

CPython hashes tuples, compares them and frees some containers (``collections.deque``) by
recursion in C, without a depth guard: a pickle of a few megabytes can nest a tuple a million
deep and use it as a dictionary key, or drop a deque nested as deep, and the process dies of a
stack overflow. :class:`BoundedUnpickler` (Python's own unpickler, ``pickle._Unpickler``, whose
opcodes can be checked one by one) refuses such pickles before they are built:

- Objects nest at most :data:`MAX_DEPTH` deep: each object built is given its depth, one more
  than its deepest part.
- A container is not filled further once it is part of another object (which would change that
  object's depth after it was counted). Pickles written by ``pickle.dumps`` never do this, except
  for objects that contain themselves, which a saved model does not hold.
- Dictionary keys and set elements are flat: numbers, strings, bytes, ``None``, numpy scalars,
  torch dtypes, or tuples of those.

A refusal is an ``UnpicklingError`` that says what was found.
"""

from __future__ import annotations

import collections
import pickle
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch as th

__all__ = ["MAX_DEPTH", "BoundedUnpickler", "objects_in"]

#: The deepest nesting a pickled object may have (the training job's saves reach 13).
MAX_DEPTH = 32
_ATOMS = (str, bytes, int, float, complex, bool, type(None), np.generic, th.dtype)

_Children = Callable[["BoundedUnpickler"], list[Any]]


def _marked(unpickler: BoundedUnpickler) -> list[Any]:
    """The items pushed since the last MARK (what the next opcode takes)."""
    return list(unpickler.stack)


def _top(count: int) -> _Children:
    return lambda unpickler: unpickler.stack[-count:]


def _flat(key: Any) -> bool:
    return isinstance(key, _ATOMS) or (type(key) is tuple and all(isinstance(part, _ATOMS) for part in key))


def _keys(items: list[Any]) -> list[Any]:
    return items[0::2]


def _reduced_keys(unpickler: BoundedUnpickler) -> list[Any]:
    """The elements that calling the pickled function hashes: those of a set or frozenset made from a list."""
    function, args = unpickler.stack[-2], unpickler.stack[-1]
    if function in (set, frozenset) and isinstance(args, tuple) and args and isinstance(args[0], (list, tuple)):
        return list(args[0])
    if function is collections.OrderedDict and args:
        raise pickle.UnpicklingError("an OrderedDict made from arguments (a pickled one is filled item by item)")
    return []


class BoundedUnpickler(pickle._Unpickler):
    """``pickle._Unpickler`` that refuses pickles nesting deeper than :data:`MAX_DEPTH`, filling a
    container already part of another object, or hashing anything but flat keys (see the module)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._depths: dict[int, tuple[int, Any]] = {}  # id -> (depth, the object, kept alive so ids stay unique)
        self._parts: set[int] = set()  # ids of the counted objects that are part of another

    def _depth(self, obj: Any) -> int:
        return self._depths.get(id(obj), (0, None))[0]

    def _count(self, obj: Any, children: list[Any]) -> None:
        old = self._depth(obj)
        depth = max(old, 1 + max(map(self._depth, children), default=0))
        if depth > MAX_DEPTH:
            raise pickle.UnpicklingError(f"objects nested deeper than {MAX_DEPTH}")
        if depth > old and (id(obj) in self._parts or any(child is obj for child in children)):
            raise pickle.UnpicklingError(
                f"a {type(obj).__name__} filled after it became part of another object (or containing itself)"
            )
        self._depths[id(obj)] = (depth, obj)
        self._parts.update(id(child) for child in children if id(child) in self._depths)

    @staticmethod
    def _counted(
        load: Callable[[Any], None], children: _Children | None, hashed: Callable[[list[Any]], list[Any]] | None = None
    ) -> Callable[[BoundedUnpickler], None]:
        """An opcode's loader that counts the object it builds or fills (the stack's top afterwards)."""

        def counted(self: BoundedUnpickler) -> None:
            parts = children(self) if children else []
            keys = hashed(parts) if hashed else _reduced_keys(self) if load is pickle._Unpickler.load_reduce else []
            for key in keys:
                if not _flat(key):
                    raise pickle.UnpicklingError(f"a dictionary key or set element of type {type(key).__name__}")
            load(self)
            self._count(self.stack[-1], parts)

        return counted

    dispatch = dict(pickle._Unpickler.dispatch)
    _U = pickle._Unpickler
    for _opcode, _load, _children, _hashed in (
        (pickle.EMPTY_TUPLE, _U.load_empty_tuple, None, None),
        (pickle.EMPTY_LIST, _U.load_empty_list, None, None),
        (pickle.EMPTY_DICT, _U.load_empty_dictionary, None, None),
        (pickle.EMPTY_SET, _U.load_empty_set, None, None),
        (pickle.TUPLE, _U.load_tuple, _marked, None),
        (pickle.TUPLE1, _U.load_tuple1, _top(1), None),
        (pickle.TUPLE2, _U.load_tuple2, _top(2), None),
        (pickle.TUPLE3, _U.load_tuple3, _top(3), None),
        (pickle.LIST, _U.load_list, _marked, None),
        (pickle.DICT, _U.load_dict, _marked, _keys),
        (pickle.FROZENSET, _U.load_frozenset, _marked, list),
        (pickle.OBJ, _U.load_obj, _marked, None),
        (pickle.INST, _U.load_inst, _marked, None),
        (pickle.REDUCE, _U.load_reduce, _top(1), None),
        (pickle.NEWOBJ, _U.load_newobj, _top(2), None),
        (pickle.NEWOBJ_EX, _U.load_newobj_ex, _top(3), None),
        (pickle.APPEND, _U.load_append, _top(1), None),
        (pickle.APPENDS, _U.load_appends, _marked, None),
        (pickle.SETITEM, _U.load_setitem, _top(2), _keys),
        (pickle.SETITEMS, _U.load_setitems, _marked, _keys),
        (pickle.ADDITEMS, _U.load_additems, _marked, list),
    ):
        dispatch[_opcode[0]] = _counted(_load, _children, _hashed)
    del _U, _opcode, _load, _children, _hashed

    def load_build(self) -> None:
        """BUILD, counted: the object set (the stack's top afterwards) holds its state."""
        state = self.stack[-1]
        super().load_build()
        self._count(self.stack[-1], [state])

    dispatch[pickle.BUILD[0]] = load_build


def objects_in(root: Any, expand: Callable[[Any], bool]) -> Iterator[Any]:
    """Every object reachable from ``root`` through containers and the ``__dict__`` of the objects
    ``expand`` accepts, each once, without recursion."""
    seen: set[int] = set()
    pending = [root]
    while pending:
        obj = pending.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        yield obj
        if isinstance(obj, dict):
            pending.extend(obj.keys())
            pending.extend(obj.values())
        elif isinstance(obj, (tuple, list, set, frozenset, collections.deque)):
            pending.extend(obj)
        elif expand(obj) and hasattr(obj, "__dict__"):
            pending.extend(vars(obj).values())
