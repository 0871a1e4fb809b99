"""Resuming from a checkpoint gives, bit for bit, the run that was not interrupted (CPU, same seed).

SB3's ``save`` keeps the model, the optimizer state, the counters, ``ent_coef`` and the
verification log, but not the random generators (torch's draws the actions, numpy's the
minibatches) nor the environments' state. ``save_checkpoint`` adds the generators' states;
``resume_checkpoint`` needs the checkpoint to sit at an episode boundary, which TextGen-v0's
fixed-length episodes give whenever ``n_steps`` is a multiple of ``max_length``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch as th
from stable_baselines3.common.callbacks import BaseCallback

from textenv_gym.dynamics import TextGenConfig
from textenv_gym.sb3_vec_env import make_textgen_vec_env
from verl_sb3 import CheckResult, VerifiedPPO, VerifiedRecurrentPPO
from verl_sb3.app.config import TrainConfig
from verl_sb3.app.training import train
from verl_sb3.checkpoints import (
    TRAINING_STATE_ENTRY,
    CheckpointError,
    load_checkpoint,
    resume_checkpoint,
    save_checkpoint,
)
from verl_sb3.warmup import CriticWarmupCallback

ENV = dict(vocab_size=8, max_length=6)
N_ENVS, N_STEPS = 2, 12  # n_steps a multiple of max_length: every rollout ends at an episode boundary
ROLLOUT = N_ENVS * N_STEPS
N = 3  # updates before the interruption, and after it
COMMON = dict(
    n_steps=N_STEPS, batch_size=24, n_epochs=2, learning_rate=3e-3, seed=0, ent_coef=0.01, target_entropy=2.5
)  # above ln 8: the entropy controller moves ent_coef at each update
REPO_ROOT = Path(__file__).resolve().parent.parent


class VetoFifth(VerifiedRecurrentPPO):
    """Rolls back the fifth update (after the interruption): the rollback state must resume too."""

    def verify(self, ctx):
        results = super().verify(ctx)
        n_verified = self.verification_report.n_verified
        results["veto_fifth"] = CheckResult(n_verified != 4, float(n_verified), 4.0, "fifth update vetoed")
        return results


SETTINGS = {
    "recurrent": (
        VetoFifth,
        "SLMLstmPolicy",
        dict(COMMON, policy_kwargs=dict(lstm_hidden_size=16, n_lstm_layers=1, embedding_dim=8)),
    ),
    "feed-forward": (VerifiedPPO, "MlpPolicy", dict(COMMON, policy_kwargs=dict(net_arch=[32]))),
    # an adaptive reference-KL coefficient and the reference's own LSTM state must resume too
    "reference-kl": (
        VetoFifth,
        "SLMLstmPolicy",
        dict(
            COMMON,
            policy_kwargs=dict(lstm_hidden_size=16, n_lstm_layers=1, embedding_dim=8),
            ref_kl_coef=0.1,
            ref_kl_target=0.01,
            ref_kl_horizon=100,
            ref_kl_estimator="k3",
        ),
    ),
    # a critic-free group estimator, with veRL's loss settings
    "grpo": (
        VetoFifth,
        "SLMLstmPolicy",
        dict(
            COMMON,
            policy_kwargs=dict(lstm_hidden_size=16, n_lstm_layers=1, embedding_dim=8),
            advantage_estimator="grpo",
            loss_agg_mode="seq-mean-token-mean",
            clip_range_high=0.28,
        ),
    ),
}


def env(n_envs: int = N_ENVS, **kwargs):
    return make_textgen_vec_env(n_envs, seed=0, group_size=2, **ENV, **kwargs)  # one group, for "grpo"


def make(kind: str, **overrides):
    cls, policy, settings = SETTINGS[kind]
    return cls(policy, env(), **{**settings, **overrides})


class SaveAt(BaseCallback):
    """Saves a checkpoint at the start of the rollout that follows ``timesteps`` (as the training job does)."""

    def __init__(self, timesteps: int, path: Path) -> None:
        super().__init__()
        self.timesteps, self.path = timesteps, path

    def _on_step(self) -> bool:
        return True

    def _on_rollout_start(self) -> None:
        if self.num_timesteps == self.timesteps:
            save_checkpoint(self.model, self.path)


def same_log(a: list[dict], b: list[dict]) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)  # NaN equal to NaN


def assert_identical(resumed, uninterrupted) -> None:
    a, b = resumed.policy.state_dict(), uninterrupted.policy.state_dict()
    assert a.keys() == b.keys() and all(th.equal(a[k], b[k]) for k in a)
    oa, ob = resumed.policy.optimizer.state_dict()["state"], uninterrupted.policy.optimizer.state_dict()["state"]
    assert oa.keys() == ob.keys()
    assert all(th.equal(oa[i][name], ob[i][name]) for i in oa for name in oa[i])
    assert same_log(resumed.verification_log, uninterrupted.verification_log)
    assert resumed.ent_coef == uninterrupted.ent_coef
    assert resumed.kl_ctrl == uninterrupted.kl_ctrl  # None without reference-KL control
    for counter in ("num_timesteps", "_n_updates"):
        assert getattr(resumed, counter) == getattr(uninterrupted, counter), counter
    for counter in ("n_verified", "n_accepted_first_try", "n_rolled_back", "n_undone"):
        assert getattr(resumed.verification_report, counter) == getattr(uninterrupted.verification_report, counter), (
            counter
        )


@pytest.fixture(scope="module", params=list(SETTINGS))
def uninterrupted(request, tmp_path_factory):
    """2N updates in one run, writing a checkpoint between update N and N + 1 on the way."""
    kind = request.param
    path = tmp_path_factory.mktemp(f"resume-{kind}") / "mid.zip"
    model = make(kind)
    model.learn(2 * N * ROLLOUT, callback=SaveAt(N * ROLLOUT, path))
    assert model.ent_coef != COMMON["ent_coef"] and len(model.verification_log) == 2 * N
    if kind in ("recurrent", "reference-kl", "grpo"):
        assert model.verification_log[4]["rolled_back"]
    if kind == "reference-kl":
        assert model.kl_ctrl.value != 0.1
    return kind, model, path


def test_a_checkpoint_written_during_training_resumes_to_the_uninterrupted_result(uninterrupted):
    kind, model, path = uninterrupted
    resumed = resume_checkpoint(path, env())
    assert type(resumed) is type(model) and resumed.num_timesteps == N * ROLLOUT
    resumed.learn(2 * N * ROLLOUT - resumed.num_timesteps, reset_num_timesteps=False)
    assert_identical(resumed, model)


def test_n_updates_save_load_n_more_equals_2n_updates(uninterrupted, tmp_path):
    kind, model, _ = uninterrupted
    first = make(kind)
    first.learn(N * ROLLOUT)
    path = save_checkpoint(first, tmp_path / "half.zip")
    del first
    resumed = resume_checkpoint(path, env())  # a fresh model object
    resumed.learn(N * ROLLOUT, reset_num_timesteps=False)
    assert_identical(resumed, model)


def test_without_the_random_generators_the_continuation_differs(uninterrupted):
    """What the saved generator states are for: SB3's own load and learn on diverge."""
    kind, model, path = uninterrupted
    loaded = load_checkpoint(path, env=env(), restore_training_state=False)
    loaded.learn(2 * N * ROLLOUT - loaded.num_timesteps, reset_num_timesteps=False)
    a, b = loaded.policy.state_dict(), model.policy.state_dict()
    assert not all(th.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("uninterrupted", ["recurrent"], indirect=True)  # one process start is enough
def test_resume_in_a_fresh_process(uninterrupted, tmp_path):
    """The real case: another process, whose generators start from scratch."""
    kind, model, path = uninterrupted
    final = tmp_path / "final.zip"
    script = textwrap.dedent(f"""
        import torch
        torch.set_num_threads(1)
        from test_resume import env  # also makes the checkpoint's class, test_resume.VetoFifth, importable
        from verl_sb3.checkpoints import resume_checkpoint, save_checkpoint
        model = resume_checkpoint({str(path)!r}, env())
        model.learn({2 * N * ROLLOUT} - model.num_timesteps, reset_num_timesteps=False)
        save_checkpoint(model, {str(final)!r})
    """)
    path_entries = [str(REPO_ROOT), str(REPO_ROOT / "tests"), os.environ.get("PYTHONPATH")]
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, path_entries)))
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=str(REPO_ROOT), env=environment, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert_identical(load_checkpoint(final), model)


def test_the_training_jobs_periodic_checkpoint_resumes_to_its_final_model(tmp_path):
    tiny = dict(
        total_timesteps=2048,
        n_envs=8,
        n_steps=20,
        batch_size=80,
        eval_freq=1024,
        checkpoint_freq=1024,
        eval_sequences=20,
        final_eval_sequences=20,
        progress_bar=False,
        target_entropy=3.8,
        critic_warmup=8,
        output_dir=str(tmp_path),
    )
    config = TrainConfig(**tiny)
    final = train(config)["model"]
    periodic = sorted((tmp_path / "model_checkpoints").glob("model_*_steps.zip"))
    assert periodic
    resumed = resume_checkpoint(
        periodic[0], make_textgen_vec_env(config.n_envs, seed=config.seed, **config.textgen.as_kwargs())
    )
    # the first checkpoint falls within the critic warm-up (8 updates of 160 steps): it goes on
    assert 0 < resumed.num_timesteps < config.critic_warmup * config.n_envs * config.n_steps
    resumed.learn(
        config.total_timesteps - resumed.num_timesteps,
        reset_num_timesteps=False,
        callback=CriticWarmupCallback(config.critic_warmup),
    )
    assert_identical(resumed, final)
    assert final.ent_coef > 0  # the controller moved


# ---------------------------------------------------------------- what cannot be resumed exactly is refused
def test_mid_episode_checkpoint_is_refused_unless_inexact_is_asked(tmp_path):
    model = VerifiedRecurrentPPO("SLMLstmPolicy", env(), **{**SETTINGS["recurrent"][2], "n_steps": 8, "batch_size": 16})
    model.learn(16)  # 8 steps per environment: mid-episode (length 6)
    path = save_checkpoint(model, tmp_path / "mid_episode.zip")
    with pytest.raises(CheckpointError, match=r"cannot resume exactly: 2 of 2 environments were mid-episode") as caught:
        resume_checkpoint(path, env())
    assert str(path) in str(caught.value)
    with pytest.warns(UserWarning, match="going on from freshly reset environments"):
        resumed = resume_checkpoint(path, env(), exact=False)
    resumed.learn(16, reset_num_timesteps=False)
    assert resumed.num_timesteps == 32


def test_an_environment_that_starts_differently_is_refused(uninterrupted):
    kind, _, path = uninterrupted
    other = env()
    other.set_options({"prompt": [1, 2]})
    with pytest.raises(CheckpointError, match="starts its episodes differently"):
        resume_checkpoint(path, other)


def test_a_checkpoint_without_training_state_is_refused(uninterrupted, tmp_path):
    kind, _, path = uninterrupted
    plain = load_checkpoint(path)
    plain.save(tmp_path / "sb3.zip")  # SB3's own save
    without = save_checkpoint(plain, tmp_path / "without.zip", training_state=False)
    for file in (tmp_path / "sb3.zip", without):
        with pytest.raises(CheckpointError, match="holds no training state") as caught:
            resume_checkpoint(file, env(), cls=type(plain))  # SB3's file does not name the class
        assert str(file) in str(caught.value)
        load_checkpoint(file, cls=type(plain))  # still an ordinary checkpoint


def test_a_corrupt_training_state_names_the_file(uninterrupted, tmp_path):
    kind, _, path = uninterrupted
    broken = tmp_path / "broken.zip"
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(broken, "w") as target:
        for item in source.infolist():
            data = source.read(item)
            target.writestr(item, data[: len(data) // 2] if item.filename == TRAINING_STATE_ENTRY else data)
    with pytest.raises(CheckpointError, match="cannot be loaded") as caught:
        load_checkpoint(broken)
    assert str(broken) in str(caught.value)


def test_a_checkpoint_saved_before_training_resumes_as_a_fresh_start(tmp_path):
    path = save_checkpoint(make("recurrent"), tmp_path / "untrained.zip")
    resumed = resume_checkpoint(path, env())
    resumed.learn(2 * ROLLOUT, reset_num_timesteps=False)
    fresh = make("recurrent")
    fresh.learn(2 * ROLLOUT)
    assert_identical(resumed, fresh)


def test_an_environment_with_other_settings_is_refused_naming_them(tmp_path):
    model = make("recurrent")
    model.env_kwargs = TextGenConfig(**ENV).as_kwargs()  # as the training job records them
    model.learn(ROLLOUT)
    save_checkpoint(model, tmp_path / "run.zip")
    with pytest.raises(CheckpointError, match=r"settings differ .*forbidden_tokens \[\] \(checkpoint\) against \[3\]"):
        resume_checkpoint(tmp_path / "run.zip", env(forbidden_tokens=[3]))
    with pytest.raises(CheckpointError, match=r"repetition_penalty -0.5 \(checkpoint\) against -2.0"):
        resume_checkpoint(tmp_path / "run.zip", env(repetition_penalty=-2.0))
    resume_checkpoint(tmp_path / "run.zip", env())  # the same settings resume
