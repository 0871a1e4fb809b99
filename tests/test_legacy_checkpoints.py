"""Checkpoints written by verl_sb3 0.1 (``tests/fixtures/legacy``, made by ``make_fixtures.py`` at
that version) load, give the same action probabilities and counters, and train on as that version did."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from verl_sb3 import VerifiedPPO, VerifiedRecurrentPPO
from verl_sb3.checkpoints import load_checkpoint, resume_checkpoint
from verl_sb3.verification.judgement import PendingJudgement

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "legacy"
EXPECTED = json.loads((FIXTURES / "expected.json").read_text())
CLASSES = {"VerifiedPPO": VerifiedPPO, "VerifiedRecurrentPPO": VerifiedRecurrentPPO}


def fixtures():
    """The script that wrote the fixtures: its environment and its reading of the probabilities."""
    spec = importlib.util.spec_from_file_location("make_fixtures", FIXTURES / "make_fixtures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", sorted(EXPECTED["models"]))
@pytest.mark.parametrize("how", ["load_checkpoint", "class load"])
def test_a_legacy_checkpoint_loads_with_the_same_probabilities_and_counters(name, how):
    make = fixtures()
    expected, path = EXPECTED["models"][name], FIXTURES / f"{name}.zip"
    cls = CLASSES[expected["class"]]
    model = load_checkpoint(path) if how == "load_checkpoint" else cls.load(path)
    assert type(model) is cls
    assert make.probabilities(model) == expected["probabilities"]  # bit for bit: the same float64 values
    assert (model.num_timesteps, model._n_updates) == (expected["num_timesteps"], expected["n_updates"])
    report = model.verification_report
    assert (report.n_verified, report.n_rolled_back, report.n_undone) == (
        expected["n_verified"],
        expected["n_rolled_back"],
        expected["n_undone"],
    )
    assert model.verification_rate == expected["verification_rate"]
    assert len(model.verification_log) == expected["n_verified"] and "checks" in model.verification_log[0]
    assert (model.lr_scale, float(model.ent_coef)) == (expected["lr_scale"], expected["ent_coef"])
    assert (None if model.kl_ctrl is None else model.kl_ctrl.value) == expected["kl_coef"]
    judgement = model.rollout_judgement
    if expected["pending_update"] is None:
        assert judgement is None
    else:  # the update that awaited its judgement is still there, with the state to undo it
        assert (
            isinstance(judgement.pending, PendingJudgement) and judgement.pending.update == expected["pending_update"]
        )
        assert judgement.pending.before.policy.keys() == model.policy.state_dict().keys()
        assert judgement.measured is not None


@pytest.mark.parametrize("name", sorted(EXPECTED["models"]))
def test_a_legacy_checkpoint_resumes_as_that_version_did(name):
    make = fixtures()
    expected = EXPECTED["models"][name]
    model = resume_checkpoint(FIXTURES / f"{name}.zip", make.env())
    model.learn(EXPECTED["updates_after"] * make.N_ENVS * make.N_STEPS, reset_num_timesteps=False)
    log = [
        {key: entry[key] for key in ("update", "accepted", "backtracks", "undone")} for entry in model.verification_log
    ]
    assert log == expected["resumed_log"]
    # a tolerance for the machine's float rounding only: the updates are the same
    np.testing.assert_allclose(make.probabilities(model), expected["resumed_probabilities"], rtol=1e-4, atol=1e-6)
