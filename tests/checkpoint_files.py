"""Editing a saved model's zip, as an attacker would: entries replaced, data entries planted."""

from __future__ import annotations

import base64
import io
import json
import zipfile

import numpy as np

TRAINING_STATE = "verl_sb3_training_state.npz"


def replace_entries(source, target, entries):
    """``source`` copied to ``target`` with ``entries`` (name -> bytes) replaced or added."""
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w") as new:
        for item in old.infolist():
            new.writestr(item, entries.get(item.filename, old.read(item)))
        for name in set(entries) - set(old.namelist()):
            new.writestr(name, entries[name])
    return target


def with_data(source, target, **entries):
    """``source`` with entries of its ``data`` JSON replaced or added."""
    with zipfile.ZipFile(source) as archive:
        data = json.loads(archive.read("data"))
    data.update(entries)
    return replace_entries(source, target, {"data": json.dumps(data).encode()})


def serialized(raw_pickle: bytes) -> dict:
    """A ``data`` entry that SB3's loader unpickles."""
    return {":serialized:": base64.b64encode(raw_pickle).decode()}


def with_training_state(source, target, change):
    """``source`` with its training state's arrays changed: ``change(arrays, meta)`` edits them in place."""
    with zipfile.ZipFile(source) as archive:
        raw = archive.read(TRAINING_STATE)
    with np.load(io.BytesIO(raw)) as state:
        arrays = {name: state[name] for name in state.files}
    meta = json.loads(str(arrays["meta"]))
    change(arrays, meta)
    arrays["meta"] = np.array(json.dumps(meta))
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return replace_entries(source, target, {TRAINING_STATE: buffer.getvalue()})
