"""Checkpoints: atomic saves, clear errors for missing or damaged files, faithful round trips."""

from __future__ import annotations

import json
import math
import os
import stat
import time
import zipfile

import pytest
import torch as th

from textenv_gym.dynamics import TextGenConfig
from textenv_gym.sb3_vec_env import make_textgen_vec_env
from verl_sb3 import VerifiedRecurrentPPO
from verl_sb3.checkpoints import CheckpointError, load_checkpoint, save_checkpoint

ENV = dict(vocab_size=8, max_length=6, forbidden_tokens=[7])


class TaggedVerifiedPPO(VerifiedRecurrentPPO):
    """A user subclass at module level, with an attribute of its own."""

    def __init__(self, *args, tag: str = "default", **kwargs):
        self.tag = tag
        super().__init__(*args, **kwargs)


def make_model(cls=VerifiedRecurrentPPO, **kwargs):
    model = cls(
        "SLMLstmPolicy",
        make_textgen_vec_env(2, seed=0, **ENV),
        n_steps=12,
        batch_size=24,
        n_epochs=2,
        seed=0,
        learning_rate=3e-3,
        policy_kwargs=dict(lstm_hidden_size=16, n_lstm_layers=1, embedding_dim=8),
        **kwargs,
    )
    model.env_kwargs = TextGenConfig(**ENV).as_kwargs()
    return model


@pytest.fixture(scope="module")
def trained():
    model = make_model()
    model.learn(3 * 12 * 2)  # three verified updates
    assert len(model.verification_log) == 3
    return model


@pytest.fixture
def good_file(trained, tmp_path):
    return save_checkpoint(trained, tmp_path / "model.zip")


def same_log(a: list[dict], b: list[dict]) -> bool:
    """Equal verification logs (NaN equal to NaN)."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def test_round_trip_keeps_parameters_log_and_env_settings(trained, good_file):
    loaded = load_checkpoint(good_file)
    assert type(loaded) is VerifiedRecurrentPPO
    assert same_log(loaded.verification_log, trained.verification_log)
    assert loaded.verification_rate == trained.verification_rate or (
        math.isnan(loaded.verification_rate) and math.isnan(trained.verification_rate)
    )
    assert loaded.env_kwargs == trained.env_kwargs and loaded.env_kwargs["forbidden_tokens"] == [7]
    assert tuple(loaded.forbidden_tokens) == trained.forbidden_tokens == (7,)  # JSON turns the tuple into a list
    expected = trained.policy.state_dict()
    for name, tensor in loaded.policy.state_dict().items():
        assert th.equal(tensor, expected[name]), name


def test_save_adds_the_zip_suffix_and_usual_permissions(trained, tmp_path):
    path = save_checkpoint(trained, tmp_path / "nested" / "run" / "model")
    assert path == tmp_path / "nested" / "run" / "model.zip" and path.is_file()
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # not mkstemp's 0600
    path.chmod(0o600)
    save_checkpoint(trained, path)  # replacing a file keeps its mode
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


@pytest.mark.parametrize("fail_at", ["os.replace", "os.fsync", "model.save"])
def test_failed_save_leaves_the_earlier_file_untouched(trained, good_file, monkeypatch, fail_at):
    before = good_file.read_bytes()

    def boom(*args, **kwargs):
        raise OSError(f"disk full during {fail_at}")

    if fail_at == "model.save":
        original = trained.save

        def half_save(path, *args, **kwargs):  # writes part of the model, then fails
            path.write(b"PK\x03\x04 partial")
            boom()

        monkeypatch.setattr(trained, "save", half_save)
    else:
        monkeypatch.setattr(os, fail_at.split(".")[1], boom)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(trained, good_file)
    monkeypatch.undo()
    assert good_file.read_bytes() == before
    assert leftovers(good_file.parent) == []
    assert same_log(load_checkpoint(good_file).verification_log, trained.verification_log)
    if fail_at == "model.save":
        assert trained.save == original


def test_missing_file(tmp_path):
    missing = tmp_path / "nowhere" / "model.zip"
    with pytest.raises(CheckpointError, match="no such file") as caught:
        load_checkpoint(missing)
    assert str(missing) in str(caught.value)
    assert isinstance(caught.value, ValueError)  # callers catching ValueError see it too


def test_truncated_file(good_file, tmp_path):
    data = good_file.read_bytes()
    cut = tmp_path / "cut.zip"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt") as caught:
        load_checkpoint(cut)
    assert str(cut) in str(caught.value)


def test_random_bytes(tmp_path):
    noise = tmp_path / "noise.zip"
    noise.write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(noise)
    assert str(noise) in str(caught.value)


def test_zip_that_is_not_a_model(tmp_path):
    other = tmp_path / "other.zip"
    with zipfile.ZipFile(other, "w") as archive:
        archive.writestr("readme.txt", "hello")
    with pytest.raises(CheckpointError, match="no 'data' entry") as caught:
        load_checkpoint(other)
    assert str(other) in str(caught.value)


def test_zip_with_corrupt_model_data(good_file, tmp_path):
    broken = tmp_path / "broken.zip"
    with zipfile.ZipFile(good_file) as source, zipfile.ZipFile(broken, "w") as target:
        for item in source.infolist():
            target.writestr(item, b"{ not json" if item.filename == "data" else source.read(item))
    with pytest.raises(CheckpointError, match="cannot be loaded") as caught:
        load_checkpoint(broken)
    assert str(broken) in str(caught.value)


def test_module_level_subclass_reloads_as_itself(tmp_path):
    model = make_model(TaggedVerifiedPPO, tag="mine")
    model.learn(12 * 2)
    path = save_checkpoint(model, tmp_path / "tagged.zip")
    loaded = load_checkpoint(path)
    assert type(loaded) is TaggedVerifiedPPO and loaded.tag == "mine"
    assert same_log(loaded.verification_log, model.verification_log)
    assert type(TaggedVerifiedPPO.load(path)) is TaggedVerifiedPPO


def test_unimportable_subclass_loads_as_its_base_with_a_warning(tmp_path):
    class LocalPPO(VerifiedRecurrentPPO):  # "<locals>" in its name: cannot be imported back
        pass

    model = make_model(LocalPPO)
    path = save_checkpoint(model, tmp_path / "local.zip")
    with pytest.warns(UserWarning, match="LocalPPO.*cannot be imported.*VerifiedRecurrentPPO"):
        loaded = load_checkpoint(path)
    assert type(loaded) is VerifiedRecurrentPPO
    assert type(load_checkpoint(path, cls=LocalPPO)) is LocalPPO  # or name the class


def test_every_truncation_names_the_file(good_file, tmp_path):
    data = good_file.read_bytes()
    cut = tmp_path / "cut.zip"
    for length in range(0, len(data), max(1, len(data) // 40)):
        cut.write_bytes(data[:length])
        with pytest.raises(CheckpointError, match="truncated or corrupt") as caught:
            load_checkpoint(cut)
        assert str(cut) in str(caught.value), length


def test_a_flipped_byte_in_an_entry_names_the_entry_and_the_file(good_file, tmp_path):
    data = bytearray(good_file.read_bytes())
    with zipfile.ZipFile(good_file) as archive:
        info = archive.getinfo("policy.pth")
    name_and_extra = int.from_bytes(data[info.header_offset + 26 : info.header_offset + 28], "little") + int.from_bytes(
        data[info.header_offset + 28 : info.header_offset + 30], "little"
    )
    data[info.header_offset + 30 + name_and_extra + info.compress_size // 2] ^= 0xFF  # inside the entry's data
    flipped = tmp_path / "flipped.zip"
    flipped.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="entry 'policy.pth' is corrupt") as caught:
        load_checkpoint(flipped)
    assert str(flipped) in str(caught.value)


def test_a_save_killed_mid_write_leaves_a_temporary_file_that_the_next_save_removes(trained, good_file):
    killed = good_file.parent / f".{good_file.name}.abc123.tmp"  # what a kill -9 during a save leaves
    killed.write_bytes(b"PK\x03\x04 half a model")
    fresh = good_file.parent / f".{good_file.name}.def456.tmp"  # a save in progress elsewhere, just begun
    fresh.write_bytes(b"PK")
    old = time.time() - 3600
    os.utime(killed, (old, old))
    save_checkpoint(trained, good_file)
    assert not killed.exists() and fresh.exists()
    other = good_file.parent / ".other.zip.abc.tmp"  # another file's: not this save's to remove
    other.write_bytes(b"")
    os.utime(other, (old, old))
    save_checkpoint(trained, good_file)
    assert other.exists()
