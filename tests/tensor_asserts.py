"""Assertions shared by the tests: structures of tensors equal bit for bit."""

from __future__ import annotations

import torch as th


def assert_same_tensors(a, b) -> None:
    """Recursively equal (dicts, lists, tuples), tensors bit for bit and of the same dtype."""
    if isinstance(a, th.Tensor):
        assert isinstance(b, th.Tensor) and a.dtype == b.dtype and th.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same_tensors(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same_tensors(x, y)
    else:
        assert a == b
