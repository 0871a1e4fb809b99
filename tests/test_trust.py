"""Loading a checkpoint runs no code it names unless the file is trusted."""

from __future__ import annotations

import base64
import io
import json
import os
import pickle
import sys
import zipfile

import pytest
import torch as th
from sb3_contrib import RecurrentPPO
from stable_baselines3 import PPO

from textenv_gym.sb3_vec_env import make_textgen_vec_env
from verl_sb3 import VerifiedPPO, VerifiedRecurrentPPO
from verl_sb3.app.cli import main
from verl_sb3.checkpoints import load_checkpoint, resume_checkpoint, save_checkpoint
from verl_sb3.trust import UntrustedCheckpointError

ENV = dict(vocab_size=8, max_length=6)
SMALL_LSTM = dict(lstm_hidden_size=8, n_lstm_layers=1, embedding_dim=4)


class _Planted:
    """Unpickling it runs a shell command: what an attacker puts in a checkpoint."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _replace_entries(source, target, entries):
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w") as new:
        for item in old.infolist():
            new.writestr(item, entries.get(item.filename, old.read(item)))
        for name in set(entries) - set(old.namelist()):
            new.writestr(name, entries[name])
    return target


def plant(source, target, marker, entry="learning_rate"):
    """``source`` with ``entry`` of its data replaced by a pickle that creates ``marker``."""
    with zipfile.ZipFile(source) as archive:
        data = json.loads(archive.read("data"))
    data[entry] = {
        ":type:": "<class 'object'>",
        ":serialized:": base64.b64encode(pickle.dumps(_Planted(marker))).decode(),
    }
    return _replace_entries(source, target, {"data": json.dumps(data).encode()})


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
    planted = _replace_entries(saved, tmp_path / "tensor.zip", {"data": json.dumps(data).encode()})
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
        return _replace_entries(saved, tmp_path / name, {"verl_sb3.json": metadata})

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
