"""Checkpoints not trusted, shaped to crash or alter the process rather than to run code: nested
objects, names SB3's loader follows, optimizer states and random states torch does not check."""

from __future__ import annotations

import io
import pickle
import subprocess
import sys
import zipfile
from collections import deque

import numpy as np
import pytest
import torch as th
from checkpoint_files import replace_entries, serialized, with_data, with_training_state
from stable_baselines3 import PPO
from test_trust import ENV, saved, small_recurrent  # noqa: F401 (the fixture)

from textenv_gym.sb3_vec_env import make_textgen_vec_env
from verl_sb3 import VerifiedRecurrentPPO
from verl_sb3.bounded_unpickler import MAX_DEPTH
from verl_sb3.checkpoints import CheckpointError, load_checkpoint, resume_checkpoint, save_checkpoint
from verl_sb3.safe_unpickle import restricted_loads
from verl_sb3.trust import UntrustedCheckpointError

DEQUE = b"ccollections\ndeque\nq\x01"
DEPTH = 10**6  # enough to overflow the C stack when hashed or freed by recursion


def _load_in_subprocess(path) -> subprocess.CompletedProcess:
    script = (
        f"from verl_sb3.checkpoints import load_checkpoint\ntry:\n    load_checkpoint({str(path)!r})\n"
        "except Exception as error:\n    print(error)\n"
    )
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize(
    "payload",
    [
        # a tuple nested a million deep, used as a dict key: hashing it recurses in C
        b"\x80\x03})" + b"\x85" * DEPTH + b"K\x01s.",
        # a deque nested as deep, then dropped: freeing it recurses in C
        b"\x80\x03" + DEQUE + b"h\x01" * DEPTH + b")\x85R" + b"\x85\x85R" * DEPTH + b"0N.",
    ],
    ids=["tuple key", "deque"],
)
def test_deeply_nested_objects_are_refused_before_they_crash(saved, tmp_path, payload):  # noqa: F811
    planted = with_data(saved, tmp_path / "nested.zip", ep_info_buffer=serialized(payload))
    result = _load_in_subprocess(planted)
    assert result.returncode == 0, result.stderr[-2000:]  # a crash is a negative return code
    assert f"entry 'ep_info_buffer' needs objects nested deeper than {MAX_DEPTH}" in result.stdout


def test_nesting_is_counted_however_the_pickle_builds_it():
    nested = [[]]
    for _ in range(MAX_DEPTH):
        nested = [nested]
    with pytest.raises(pickle.UnpicklingError, match="nested deeper than"):
        restricted_loads(pickle.dumps(nested))
    assert restricted_loads(pickle.dumps(nested[0][0])) == nested[0][0]
    # a list filled after it was put in another (pickle.dumps never writes that) could hide its depth
    with pytest.raises(pickle.UnpicklingError, match="filled after it became part of another object"):
        restricted_loads(b"\x80\x04]q\x00]q\x01h\x00a0]a.")
    looped = []
    looped.append(looped)
    with pytest.raises(pickle.UnpicklingError, match="containing itself"):
        restricted_loads(pickle.dumps(looped))


def test_only_flat_keys_are_hashed():
    assert restricted_loads(pickle.dumps({(1, "a"): 1, 2.5: {3}})) == {(1, "a"): 1, 2.5: {3}}
    for value in ({(1, (2,)): 0}, {(1, (2,))}, frozenset({(1, (2,))})):
        for protocol in (3, 5):  # sets: built by calling set() (3) or by ADDITEMS (5)
            with pytest.raises(pickle.UnpicklingError, match="key or set element of type tuple"):
                restricted_loads(pickle.dumps(value, protocol=protocol))
    assert restricted_loads(pickle.dumps(deque([{"r": 1.0}], maxlen=4))) == deque([{"r": 1.0}], maxlen=4)


@pytest.mark.parametrize(
    "payload, expected",
    [
        # a schedule whose BUILD sets its __class__ (slot state goes through setattr)
        (b"\x80\x04cstable_baselines3.common.utils\nFloatSchedule\n)\x81N}V__class__\ncstable_baselines3.common.utils"
         b"\nConstantSchedule\ns\x86b.", "given special attributes"),
        # a policy built without its __init__, then given any state
        (b"\x80\x04cverl_sb3.policies.lstm\nSLMLstmPolicy\n)\x81}b.", "an object of verl_sb3.policies.lstm.SLMLstm"),
        # a space's __init__ called with a shape of the file's choosing: 12 GiB from 47 bytes
        (b"\x80\x04cgymnasium.spaces.box\nBox\nG\x00\x00\x00\x00\x00\x00\x00\x00K\x01M@\x9cM@\x9c\x86\x87R.",
         "a call of gymnasium.spaces.box.Box"),
        # a frozenset created (not called) from a nested tuple: its elements hashed unchecked
        (b"\x80\x04cbuiltins\nfrozenset\n]K\x01\x85\x85a\x85\x81.", "an object of builtins.frozenset"),
        # an allowed function called: only classes that build data, and this module's builders, are
        (b"\x80\x04ctextenv_gym.tasks.reverse\ncompute_score\n(NNNt R.".replace(b" ", b""), "a call of"),
        # a space given its state as a list of pairs: Space.__setstate__ takes dict(state), unchecked, and
        # numpy reads an instance's __array_interface__: a view of any address
        (b"\x80\x04cgymnasium.spaces.discrete\nDiscrete\n)\x81]V__array_interface__\n}\x86ab.",
         "a gymnasium.spaces.discrete.Discrete object given a state of type builtins.list"),
        # a record given a gymnasium Dict space as its state (it has .items(), and its keys are not checked)
        (b"\x80\x04cverl_sb3.kl_control\nFixedKLController\n)\x81cgymnasium.spaces.dict\nDict\n)\x81}bb.",
         "object given a state of type gymnasium.spaces.dict.Dict"),
        # a bit generator's placeholder kept in a list instead of being built
        (b"\x80\x04]cnumpy.random._pickle\n__bit_generator_ctor\nVPCG64\n\x85Ra.", "left unbuilt"),
    ],
    ids=["__class__ in a slot state", "a module without __init__", "a space's allocation", "a frozenset created",
         "a function call", "a state as a list of pairs", "a state that is a space", "a placeholder kept"],
)  # fmt: skip
def test_objects_are_built_only_as_a_save_builds_them(payload, expected):
    with pytest.raises(pickle.UnpicklingError, match=expected):
        restricted_loads(payload)


def _torch_file(value) -> bytes:
    buffer = io.BytesIO()
    th.save(value, buffer)
    return buffer.getvalue()


def test_tensor_variables_name_only_the_algorithms_tensors(saved, tmp_path):  # noqa: F811
    # SB3's loader sets `<name>.data` along the name's attribute path: torch.Tensor.data for the whole process
    variables = {"policy.value_net.weight.__class__.__base__": th.tensor([13.0])}
    planted = replace_entries(saved, tmp_path / "variables.zip", {"pytorch_variables.pth": _torch_file(variables)})
    for load in (load_checkpoint, VerifiedRecurrentPPO.load):
        with pytest.raises(UntrustedCheckpointError, match=r"'pytorch_variables.pth' names \['policy.value_net"):
            load(planted)
    assert "data" not in vars(th.Tensor)
    # a module's state dict loaded into whatever attribute the entry's name reaches
    with zipfile.ZipFile(saved) as archive:
        policy = archive.read("policy.pth")
    planted = replace_entries(saved, tmp_path / "name.zip", {"policy.__class__.pth": policy})
    with pytest.raises(UntrustedCheckpointError, match="'policy.__class__.pth' is not named after a public attribute"):
        load_checkpoint(planted)


def _with_optimizer_state(source, target, change):
    with zipfile.ZipFile(source) as archive:
        state = th.load(io.BytesIO(archive.read("policy.optimizer.pth")), weights_only=True)
    change(state)
    return replace_entries(source, target, {"policy.optimizer.pth": _torch_file(state)})


def test_an_optimizer_state_must_fit_the_optimizer_built(saved, tmp_path):  # noqa: F811
    def fused(state):  # torch's fused Adam writes a parameter's worth of elements into each state tensor
        state["param_groups"][0]["fused"] = True

    def small(state):
        for values in state["state"].values():
            values["exp_avg"] = th.zeros(1)

    def broadcast(state):  # the right shape over one element's storage: the fused kernels write past it
        for values in state["state"].values():
            values["exp_avg"] = values["exp_avg"].flatten()[:1].expand(values["exp_avg"].shape)

    def sparse(state):  # torch does not check a sparse tensor's indices: Adam's add_ wrote past its memory
        index = th.tensor([[0], [10**11]])
        state["param_groups"][0]["eps"] = th.sparse_coo_tensor(index, th.ones(1), (1, 10**12), is_coalesced=True)

    for change, expected in (
        (sparse, "holds a torch.sparse_coo tensor"),
        (fused, "holds the optimizer's fused=True"),
        (small, "holds an optimizer state 'exp_avg' of shape \\(1,\\)"),
        (broadcast, "holds an optimizer state 'exp_avg' of shape .* and strides \\(0"),
    ):
        planted = _with_optimizer_state(saved, tmp_path / "optimizer.zip", change)
        for load in (load_checkpoint, VerifiedRecurrentPPO.load):
            with pytest.raises(UntrustedCheckpointError, match=f"'policy.optimizer.pth' {expected}"):
                load(planted)
    # the same, in the model state that a pending next-rollout judgement would restore in learn()
    model = small_recurrent(max_reuse_rise=3.0)
    model.learn(24)
    assert model.rollout_judgement.pending is not None
    before = model.rollout_judgement.pending.before
    before.optimizer["param_groups"][0]["fused"] = True
    with pytest.raises(UntrustedCheckpointError, match="a model state to restore with the optimizer's fused=True"):
        load_checkpoint(save_checkpoint(model, tmp_path / "pending.zip"))
    before.optimizer["param_groups"][0]["fused"] = None
    before.attributes["tensorboard_log"] = str(tmp_path / "elsewhere")
    with pytest.raises(UntrustedCheckpointError, match=r"attributes \['tensorboard_log'\] that VerifiedRecurrentPPO"):
        load_checkpoint(save_checkpoint(model, tmp_path / "pending.zip"))
    before.optimizer["param_groups"][0]["fused"] = True
    with pytest.raises(ValueError, match="cannot restore the model state .* the optimizer's fused=True"):
        before.restore(model)  # restoring refuses it too
    before.optimizer["param_groups"][0]["fused"] = None
    before.attributes.pop("tensorboard_log")
    before.policy["not_a_parameter"] = th.zeros(1)
    with pytest.raises(UntrustedCheckpointError, match="a policy state of other entries than the policy's"):
        load_checkpoint(save_checkpoint(model, tmp_path / "pending.zip"))
    # a model built with a fused optimizer loads as saved
    env = make_textgen_vec_env(2, seed=0, **ENV)
    model = PPO("MlpPolicy", env, n_steps=6, batch_size=12, policy_kwargs={"optimizer_kwargs": {"fused": True}})
    model.learn(12)
    loaded = load_checkpoint(save_checkpoint(model, tmp_path / "fused.zip"), env)
    assert loaded.policy.optimizer.param_groups[0]["fused"] is True
    loaded.learn(12)


@pytest.mark.parametrize(
    "left, next_word, valid",
    [(1, 0, True), (624, 1, True), (1, 624, True), (624, 624, False), (0, 0, False), (-1, 0, False)],
)
def test_torchs_random_state_is_checked(saved, tmp_path, left, next_word, valid):  # noqa: F811
    def change(arrays, meta):  # torch reads state words next .. next + left - 2, and checks neither
        raw = bytearray(arrays["torch_random"].tobytes())
        raw[8:12] = np.int32(left).tobytes()
        raw[16:24] = np.uint64(next_word).tobytes()
        arrays["torch_random"] = np.frombuffer(bytes(raw), np.uint8)

    planted = with_training_state(saved, tmp_path / "torch.zip", change)
    if valid:
        load_checkpoint(planted)
        th.rand(1000)
    else:
        with pytest.raises(CheckpointError, match="torch's random state is not a valid CPU generator state"):
            load_checkpoint(planted)


def test_lstm_states_of_another_dtype_are_refused(saved, tmp_path):  # noqa: F811
    def change(arrays, meta):
        for index in range(meta["last_lstm_states"]):
            arrays[f"last_lstm_states_{index}"] = arrays[f"last_lstm_states_{index}"].astype(np.complex64)

    planted = with_training_state(saved, tmp_path / "lstm.zip", change)
    with pytest.raises(CheckpointError, match=r"last LSTM states of dtypes \['torch.complex64'\]"):
        resume_checkpoint(planted, make_textgen_vec_env(2, seed=0, **ENV))


def test_pythons_random_state_is_checked(saved, tmp_path):  # noqa: F811
    def change(arrays, meta):
        meta["python_random"]["gauss_next"] = "0.5"

    planted = with_training_state(saved, tmp_path / "python.zip", change)
    with pytest.raises(CheckpointError, match="gauss_next that is not a number"):
        load_checkpoint(planted)


def test_a_reference_with_a_sparse_tensor_is_refused(saved, tmp_path):  # noqa: F811
    with zipfile.ZipFile(saved) as archive:
        policy = th.load(io.BytesIO(archive.read("policy.pth")), weights_only=True)
    name = next(iter(policy))
    index = th.full((policy[name].dim(), 1), 10**9)  # far outside the tensor
    policy[name] = th.sparse_coo_tensor(index, th.ones(1), tuple(policy[name].shape), check_invariants=False)
    planted = replace_entries(saved, tmp_path / "sparse.zip", {"policy.pth": _torch_file(policy)})
    with pytest.raises(ValueError, match="reference: .* holds a torch.sparse_coo tensor in its policy"):
        small_recurrent(ref_kl_coef=0.1, reference=planted)


def test_a_verification_report_counts_from_zero_up(tmp_path):
    model = small_recurrent()
    model.learn(12)
    model.verification_report.n_verified = -5  # the job's recorder would then write no more rows
    with pytest.raises(UntrustedCheckpointError, match="a verification report with counters"):
        load_checkpoint(save_checkpoint(model, tmp_path / "report.zip"))


@pytest.mark.parametrize(
    "attribute, value, expected",
    [
        ("kl_ctrl.value", -50.0, "a reference-KL controller"),
        ("kl_ctrl.value", float("inf"), "a reference-KL controller"),
        ("ref_kl_mode", "bogus", "a reference-KL mode 'bogus'"),
    ],
)
def test_reference_kl_settings_are_checked(tmp_path, attribute, value, expected):
    model = small_recurrent(ref_kl_coef=0.1)
    model.learn(12)
    owner, _, name = attribute.rpartition(".")
    setattr(model.kl_ctrl if owner else model, name, value)  # -50: the penalty would be a bonus
    with pytest.raises(UntrustedCheckpointError, match=expected):
        load_checkpoint(save_checkpoint(model, tmp_path / "kl.zip"))
