"""Loading a checkpoint runs no code it names unless the file is trusted."""

from __future__ import annotations

import base64
import io
import json
import os
import pickle
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch as th
from checkpoint_files import replace_entries, serialized, with_data, with_training_state
from sb3_contrib import RecurrentPPO
from stable_baselines3 import PPO
from stable_baselines3.common.utils import FloatSchedule

from textenv_gym.sb3_vec_env import make_textgen_vec_env
from verl_sb3 import VerifiedPPO, VerifiedRecurrentPPO
from verl_sb3.app.cli import main
from verl_sb3.checkpoints import CheckpointError, load_checkpoint, resume_checkpoint, save_checkpoint
from verl_sb3.trust import UntrustedCheckpointError

ENV = dict(vocab_size=8, max_length=6)
SMALL_LSTM = dict(lstm_hidden_size=8, n_lstm_layers=1, embedding_dim=4)


class _Planted:
    """Unpickling it runs a shell command: what an attacker puts in a checkpoint."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def plant(source, target, marker, entry="learning_rate"):
    """``source`` with ``entry`` of its data replaced by a pickle that creates ``marker``."""
    with zipfile.ZipFile(source) as archive:
        data = json.loads(archive.read("data"))
    data[entry] = {
        ":type:": "<class 'object'>",
        ":serialized:": base64.b64encode(pickle.dumps(_Planted(marker))).decode(),
    }
    return replace_entries(source, target, {"data": json.dumps(data).encode()})


def user_check(ctx):
    """A check of the user's own, saved by reference with the model."""
    from verl_sb3.verification.context import CheckResult

    return CheckResult(True, 0.0, 0.0, "always")


def small_recurrent(**kwargs):
    env = make_textgen_vec_env(2, seed=0, **ENV)
    return VerifiedRecurrentPPO(
        "SLMLstmPolicy", env, n_steps=6, batch_size=12, n_epochs=1, seed=0, policy_kwargs=SMALL_LSTM, **kwargs
    )


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = small_recurrent()
    model.learn(12)
    return save_checkpoint(model, tmp_path_factory.mktemp("saved") / "model.zip")


def test_a_planted_pickle_is_refused_and_runs_nothing(saved, tmp_path):
    marker = tmp_path / "ran"
    planted = plant(saved, tmp_path / "planted.zip", marker)
    for load in (
        lambda: load_checkpoint(planted),
        lambda: VerifiedRecurrentPPO.load(planted),
        lambda: VerifiedRecurrentPPO.load(str(planted)[: -len(".zip")]),  # SB3 adds the suffix
        lambda: resume_checkpoint(planted, make_textgen_vec_env(2, seed=0, **ENV)),
    ):
        with pytest.raises(UntrustedCheckpointError, match=r"entry 'learning_rate' needs posix\.system") as caught:
            load()
        assert str(planted) in str(caught.value) and "trusted=True" in str(caught.value)
        assert not marker.exists()
    load_checkpoint(planted, trusted=True)  # the test's own proof: trusted, the planted code runs
    assert marker.exists()


def test_the_command_line_refuses_it_and_trusts_only_when_told(saved, tmp_path, capsys):
    marker = tmp_path / "ran"
    planted = plant(saved, tmp_path / "planted.zip", marker, entry="ep_info_buffer")
    assert main(["evaluate", str(planted), "--n-sequences", "2"]) == 2
    error = capsys.readouterr().err
    assert "ep_info_buffer" in error and "--trust-checkpoint" in error and len(error.splitlines()) == 1
    assert main(["generate", str(planted)]) == 2 and not marker.exists()
    main(["generate", str(planted), "--trust-checkpoint"])
    assert marker.exists()


def test_a_planted_tensor_is_refused(saved, tmp_path):
    class PlantedTensor:
        def __reduce__(self):
            buffer = io.BytesIO()
            th.save({"x": _Planted(tmp_path / "ran")}, buffer)
            return th.storage._load_from_bytes, (buffer.getvalue(),)

    with zipfile.ZipFile(saved) as archive:
        data = json.loads(archive.read("data"))
    data["_last_obs"] = {":serialized:": base64.b64encode(pickle.dumps(PlantedTensor())).decode()}
    planted = replace_entries(saved, tmp_path / "tensor.zip", {"data": json.dumps(data).encode()})
    with pytest.raises(UntrustedCheckpointError, match="'_last_obs' needs a tensor file holding other objects"):
        load_checkpoint(planted)
    assert not (tmp_path / "ran").exists()


def test_a_module_the_checkpoint_names_is_not_imported(saved, tmp_path, monkeypatch):
    (tmp_path / "planted_module.py").write_text(
        f"open({str(tmp_path / 'imported')!r}, 'w').close()\n"
        "from verl_sb3 import VerifiedRecurrentPPO\n"
        "class Evil(VerifiedRecurrentPPO):\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "planted_module", raising=False)

    def naming(name, bases):
        metadata = json.dumps({"algorithm": "planted_module:Evil", "bases": bases}).encode()
        return replace_entries(saved, tmp_path / name, {"verl_sb3.json": metadata})

    no_bases = naming("a.zip", [])
    with pytest.raises(UntrustedCheckpointError, match="planted_module:Evil.*cannot be imported"):
        load_checkpoint(no_bases)
    with_bases = naming("b.zip", ["os:system", "verl_sb3.verified:VerifiedRecurrentPPO"])
    with pytest.warns(UserWarning, match="loaded as 'verl_sb3.verified:VerifiedRecurrentPPO'"):
        assert type(load_checkpoint(with_bases)) is VerifiedRecurrentPPO
    assert "planted_module" not in sys.modules and not (tmp_path / "imported").exists()
    assert type(load_checkpoint(with_bases, trusted=True)).__name__ == "Evil"  # trusted: imported
    assert (tmp_path / "imported").exists()


def test_user_checks_need_trust_or_custom_objects(tmp_path):
    model = small_recurrent(checks=[user_check])
    model.learn(12)
    path = save_checkpoint(model, tmp_path / "checks.zip")
    with pytest.raises(UntrustedCheckpointError, match=r"entry 'checks' needs test_trust\.user_check"):
        load_checkpoint(path)
    assert list(load_checkpoint(path, custom_objects={"checks": [user_check]}).checks) == [user_check]
    assert list(load_checkpoint(path, trusted=True).checks) == [user_check]


MODELS = {
    "SB3 PPO, ReLU": lambda env: PPO(
        "MlpPolicy",
        env,
        n_steps=6,
        batch_size=12,
        n_epochs=1,
        policy_kwargs=dict(activation_fn=th.nn.ReLU, net_arch=[8]),
    ),
    "sb3-contrib RecurrentPPO": lambda env: RecurrentPPO(
        "MlpLstmPolicy", env, n_steps=6, batch_size=12, n_epochs=1, policy_kwargs=dict(lstm_hidden_size=8)
    ),
    "judged, adaptive KL": lambda env: small_recurrent(max_reuse_rise=0.5, ref_kl_coef=0.1, ref_kl_target=0.01),
    "transformer, reference KL loss": lambda env: VerifiedPPO(
        "SLMTransformerPolicy",
        env,
        n_steps=6,
        batch_size=12,
        n_epochs=1,
        ref_kl_coef=0.1,
        ref_kl_mode="loss",
        policy_kwargs=dict(d_model=8, n_heads=2, n_layers=1),
    ),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_kind_of_model_loads_untrusted_as_trusted(name, tmp_path):
    model = MODELS[name](make_textgen_vec_env(2, seed=0, **ENV))
    model.learn(24)
    path = save_checkpoint(model, tmp_path / "model.zip")
    safe, trusted = load_checkpoint(path), load_checkpoint(path, trusted=True)
    assert type(safe) is type(trusted) is type(model)
    assert safe.__dict__.keys() == trusted.__dict__.keys()
    for key, value in trusted.__dict__.items():
        assert type(safe.__dict__[key]) is type(value), key
    for a, b in zip(safe.policy.state_dict().values(), trusted.policy.state_dict().values()):
        assert th.equal(a, b)
    assert repr(safe.lr_schedule) == repr(trusted.lr_schedule) and safe.clip_range(0.5) == trusted.clip_range(0.5)


def test_a_reference_path_loads_only_tensors(saved, tmp_path):
    marker = tmp_path / "ran"
    planted = plant(saved, tmp_path / "planted.zip", marker, entry="policy_class")
    model = small_recurrent(ref_kl_coef=0.1, reference=planted)
    assert not marker.exists()
    for a, b in zip(model.ref_policy.state_dict().values(), load_checkpoint(saved).policy.state_dict().values()):
        assert th.equal(a, b)


def test_an_entry_a_save_never_writes_is_refused(saved, tmp_path, monkeypatch):
    (tmp_path / "planted_env.py").write_text(f"open({str(tmp_path / 'imported')!r}, 'w').close()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    # SB3's load would gym.make() a saved "env" string (importing its module), and set any entry on the model
    # and a method's name: the entry would hide the method (set_parameters: the weights never loaded)
    for entry, value in (
        ("env", "planted_env:TextGen-v0"),
        ("_reference_init", str(tmp_path / "elsewhere.zip")),
        ("set_parameters", serialized(pickle.dumps(frozenset))),
    ):
        planted = with_data(saved, tmp_path / f"{entry}.zip", **{entry: value})
        for load in (load_checkpoint, VerifiedRecurrentPPO.load):
            with pytest.raises(UntrustedCheckpointError, match=f"entry '{entry}', which a saved model never holds"):
                load(planted)
    assert not (tmp_path / "imported").exists()


def test_a_recorded_class_imports_no_module_of_the_allowed_packages(saved, tmp_path, monkeypatch):
    monkeypatch.delitem(sys.modules, "verl_sb3.__main__", raising=False)
    metadata = json.dumps({"algorithm": "verl_sb3.__main__:main", "bases": []}).encode()
    planted = replace_entries(saved, tmp_path / "main.zip", {"verl_sb3.json": metadata})
    with pytest.raises(UntrustedCheckpointError, match="cannot be imported"):
        load_checkpoint(planted)  # importing verl_sb3.__main__ would run the command line
    assert "verl_sb3.__main__" not in sys.modules


def test_a_training_state_names_only_numpys_bit_generators(saved, tmp_path):
    def change(arrays, meta):
        meta["action_space_random"] = {"bit_generator": "seed"}  # numpy.random.seed() would reseed from the OS

    planted = with_training_state(saved, tmp_path / "state.zip", change)
    with pytest.raises(CheckpointError, match="random generator 'seed' is not one of"):
        load_checkpoint(planted)


def test_a_pickle_cannot_change_a_class(saved, tmp_path):
    utils = b"stable_baselines3.common.utils"
    # BUILD with (None, {"value_schedule": 1e6}) on the class itself: setattr for the whole process
    payload = b"c" + utils + b"\nFloatSchedule\n(N}Vvalue_schedule\nF1000000.0\nstb0ccollections\ndeque\n)R."
    planted = with_data(saved, tmp_path / "class.zip", ep_success_buffer=serialized(payload))
    with pytest.raises(UntrustedCheckpointError, match=r"needs a change to the class stable_\w+.common.utils.FloatSch"):
        load_checkpoint(planted)
    assert FloatSchedule(0.5)(1.0) == 0.5


@pytest.mark.parametrize(
    "dtype, expected",
    [
        (b"(VO8\n\x89\x88tR", "a numpy dtype object"),  # dtype("O8"): an array of pointers read from the file
        (
            b"(Vi8\n\x89\x88tR(K\x03V<\nNNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK?tb",
            "other flags",
        ),  # int64 flagged as objects
    ],
    ids=["object dtype", "int64 dtype with the flags of objects"],
)
def test_no_numpy_dtype_that_holds_objects_is_built(saved, tmp_path, dtype, expected):
    numeric = b"numpy._core.numeric" if int(np.__version__.split(".")[0]) >= 2 else b"numpy.core.numeric"
    payload = b"\x80\x04c" + numeric + b"\n_frombuffer\n(C\x08AAAAAAAAcnumpy\ndtype\n" + dtype + b"K\x01\x85VC\ntR."
    planted = with_data(saved, tmp_path / "dtype.zip", ep_info_buffer=serialized(payload))
    # in a subprocess: were the dtype built, reading the array would dereference 0x4141414141414141
    script = f"from verl_sb3.checkpoints import load_checkpoint\ntry:\n    load_checkpoint({str(planted)!r})\n" \
             "except Exception as error:\n    print(error)\n"  # fmt: skip
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "entry 'ep_info_buffer' needs" in result.stdout and expected in result.stdout


@pytest.mark.parametrize(
    "payload, expected",
    [
        # numpy's own helpers trust their input: ndarray(buffer=..., offset=-8) reads before the buffer,
        # and a second BUILD on an array frees the memory its views still read
        (b"cnumpy\nndarray\n(K\x01\x85cnumpy\ndtype\n(Vu1\n\x89\x88tRC\x01AJ\xf8\xff\xff\xfftR.", "numpy.ndarray"),
        (b"cnumpy._core.multiarray\n_reconstruct\n(cnumpy\nndarray\nK\x00\x85C\x01btR.", "_reconstruct"),
        # a random generator whose MT19937 position reads out of bounds
        (b"cnumpy.random._pickle\n__bit_generator_ctor\n(cnumpy.random._mt19937\nMT19937\ntR.", "MT19937"),
        (b"cnumpy.random._pickle\n__bit_generator_ctor\n(VMT19937\ntR.", "bit generator 'MT19937'"),
        (b"cnumpy.random._pickle\n__bit_generator_ctor\n(cnumpy.random._pcg64\nPCG64\ntR}VX\nK\x01sb.",
         "a PCG64 state"),
        # BUILD on a Cython function (neither a Python function nor a builtin): a change for the whole process
        (b"cnumpy.random.bit_generator\n__pyx_unpickle_SeedSequence\n}V__qualname__\nVchanged\nsb.",
         "a change to a builtins.function object"),
    ],
    ids=["ndarray with a negative offset", "_reconstruct", "MT19937 class", "MT19937 name", "bad PCG64 state",
         "BUILD on a Cython function"],
)  # fmt: skip
def test_numpys_unchecked_pickling_helpers_are_not_reachable(saved, tmp_path, payload, expected):
    from numpy.random.bit_generator import __pyx_unpickle_SeedSequence as helper

    planted = with_data(saved, tmp_path / "numpy.zip", ep_info_buffer=serialized(payload))
    with pytest.raises(UntrustedCheckpointError, match=f"entry 'ep_info_buffer' needs .*{expected}"):
        load_checkpoint(planted)
    assert helper.__qualname__ == "__pyx_unpickle_SeedSequence"


def test_arrays_and_generators_load_as_checked_copies(saved):
    model, trusted = load_checkpoint(saved), load_checkpoint(saved, trusted=True)
    assert np.array_equal(model.observation_space.low, trusted.observation_space.low)
    assert model.observation_space.low.flags.owndata or model.observation_space.low.base is not None
    assert model.action_space.np_random.bit_generator.state == trusted.action_space.np_random.bit_generator.state
    assert model.action_space.sample() == trusted.action_space.sample()


def test_a_training_state_with_an_out_of_range_position_is_refused(saved, tmp_path):
    def change(arrays, meta):
        meta["numpy_random"]["pos"] = 10**8  # numpy would read far out of its 624 keys

    planted = with_training_state(saved, tmp_path / "pos.zip", change)
    with pytest.raises(CheckpointError, match="numpy's random state is not a valid MT19937 state"):
        load_checkpoint(planted)


def test_the_files_tensorboard_folder_is_not_used(saved, tmp_path):
    planted = with_data(saved, tmp_path / "tb.zip", tensorboard_log=str(tmp_path / "elsewhere"))
    assert load_checkpoint(planted).tensorboard_log is None
    assert VerifiedRecurrentPPO.load(planted).tensorboard_log is None
    assert load_checkpoint(planted, tensorboard_log=str(tmp_path / "mine")).tensorboard_log == str(tmp_path / "mine")
    assert load_checkpoint(planted, trusted=True).tensorboard_log == str(tmp_path / "elsewhere")


def test_a_reference_with_a_planted_tensor_file_is_a_value_error(saved, tmp_path):
    buffer = io.BytesIO()
    th.save({"x": _Planted(tmp_path / "ran")}, buffer)
    planted = replace_entries(saved, tmp_path / "reference.zip", {"policy.pth": buffer.getvalue()})
    with pytest.raises(ValueError, match="reference: cannot load a saved model from"):
        small_recurrent(ref_kl_coef=0.1, reference=planted)
    assert not (tmp_path / "ran").exists()


def test_a_plain_sb3_save_needs_its_class_and_says_so(tmp_path):
    model = PPO("MlpPolicy", make_textgen_vec_env(2, seed=0, **ENV), n_steps=6, batch_size=12)
    model.save(tmp_path / "plain.zip")  # SB3's own save: no verl_sb3.json naming the algorithm
    with pytest.raises(CheckpointError, match=r"names no algorithm.*loaded as a VerifiedRecurrentPPO: pass cls="):
        load_checkpoint(tmp_path / "plain.zip")
    assert type(load_checkpoint(tmp_path / "plain.zip", cls=PPO)) is PPO
