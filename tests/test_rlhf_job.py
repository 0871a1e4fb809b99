"""Human feedback on the command line and in the training job: ``verl-sb3 reward-model``, ``train --reward-model``
(proxy against gold), the example."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch as th
from stable_baselines3.common.callbacks import BaseCallback
from test_rlhf import CONFIG, random_preferences

from verl_sb3.app.cli import main
from verl_sb3.app.config import TrainConfig
from verl_sb3.app.training import resume, train
from verl_sb3.checkpoints import load_checkpoint
from verl_sb3.generation import textgen_config
from verl_sb3.rlhf import (
    SequenceRewardModel,
    append_preferences,
    environment_settings,
    read_reward_model,
    save_reward_model,
)

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(
    total_timesteps=4_800,
    n_envs=8,
    n_steps=20,
    batch_size=80,
    eval_freq=960,
    checkpoint_freq=960,
    eval_sequences=16,
    final_eval_sequences=20,
    critic_warmup=2,
    threads=1,
    progress_bar=False,
    ref_kl_coef=0.05,
)


@pytest.fixture(scope="module")
def preference_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prefs") / "prefs.jsonl"
    append_preferences(path, random_preferences(120, length=20))
    return path


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("rm") / "reward_model"
    th.manual_seed(0)
    return save_reward_model(SequenceRewardModel(50, 8, 16), folder, environment_settings(CONFIG))


def job(folder: Path, reward_model: Path, **overrides) -> TrainConfig:
    return TrainConfig(**{**TINY, "output_dir": str(folder), "reward_model": str(reward_model), **overrides})


def test_reward_model_command(preference_file, tmp_path, capsys):
    output = tmp_path / "rm"
    argv = ["reward-model", str(preference_file), "--output", str(output), "--epochs", "3", "--hidden-size", "16"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "120 preferences" in printed and "epoch 3: train loss" in printed
    assert "held-out preference accuracy" in printed and "on 24 pairs" in printed
    module, config = read_reward_model(output)
    assert module.settings()["hidden_size"] == 16 and len(config["fit"]["history"]) == 3
    assert main(argv) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert main([*argv, "--overwrite"]) == 0
    assert main(["reward-model", str(preference_file), "--from-policy"]) == 2
    assert "--from-policy: needs --checkpoint" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "", "a": "x", "b": "y", "choice": "left"}\n')
    assert main(["reward-model", str(bad), "--output", str(tmp_path / "none")]) == 2
    assert "line 1: choice 'left' names neither completion" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()


def test_reward_model_command_from_a_policy(preference_file, tmp_path, capsys):
    from textenv_gym.sb3_vec_env import make_textgen_vec_env
    from verl_sb3 import VerifiedRecurrentPPO
    from verl_sb3.checkpoints import save_checkpoint

    model = VerifiedRecurrentPPO("SLMLstmPolicy", make_textgen_vec_env(2), n_steps=20, batch_size=40, seed=0)
    model.env_kwargs = CONFIG.as_kwargs()
    save_checkpoint(model, tmp_path / "policy.zip")
    argv = ["reward-model", str(preference_file), "--output", str(tmp_path / "rm"), "--epochs", "1"]
    assert main([*argv, "--checkpoint", str(tmp_path / "policy.zip"), "--from-policy"]) == 0
    module, _ = read_reward_model(tmp_path / "rm")
    assert module.lstm.hidden_size == model.policy.lstm_actor.hidden_size
    assert module.embedding.weight.shape == model.policy.embedding.weight.shape


def test_training_against_a_reward_model_logs_proxy_and_gold(reward_model, tmp_path, capsys):
    result = train(job(tmp_path / "run", reward_model))
    history = json.loads((tmp_path / "run" / "overoptimisation.json").read_text())
    assert [row["timesteps"] for row in history] == [0, 960, 1920, 2880, 3840, 4800]
    assert history[0]["kl"] == 0.0 and history[-1]["kl"] > 0.0
    assert (tmp_path / "run" / "overoptimisation.png").stat().st_size > 10_000
    model = result["model"]
    assert model.env.get_attr("config")[0].reward_fns.keys() == {"reward_model"}  # trained on the proxy
    assert textgen_config(model).reward_fns is None  # evaluated on the environment's own reward: the gold
    saved = load_checkpoint(tmp_path / "run" / "model_checkpoints" / "final_model.zip")
    assert saved.env_kwargs["reward_fns"] is None
    assert 10 < result["figures"]["mean_return"] < 21  # TextGen-v0's return, not the reward model's


def test_a_job_against_a_reward_model_resumes_to_the_uninterrupted_run(reward_model, tmp_path):
    class CtrlC(BaseCallback):
        def _on_step(self) -> bool:
            if self.num_timesteps == 2_000:
                os.kill(os.getpid(), signal.SIGINT)
            return True

    train(job(tmp_path / "whole", reward_model))
    stopped = train(job(tmp_path / "stopped", reward_model), callbacks=[CtrlC()])
    assert stopped["interrupted"]
    resume(tmp_path / "stopped")
    for name in ("overoptimisation.json", "evaluations.json"):
        whole = json.loads((tmp_path / "whole" / name).read_text())
        again = json.loads((tmp_path / "stopped" / name).read_text())
        strip = [{k: v for k, v in row.items() if k != "wall_time"} for row in whole]
        assert [{k: v for k, v in row.items() if k != "wall_time"} for row in again] == strip
    policies = []
    for folder in ("whole", "stopped"):
        with zipfile.ZipFile(tmp_path / folder / "model_checkpoints" / "final_model.zip") as archive:
            import io

            policies.append(th.load(io.BytesIO(archive.read("policy.pth")), weights_only=True))
    assert all(th.equal(policies[0][k], policies[1][k]) for k in policies[0])


def test_the_reward_model_setting_is_checked(reward_model, tmp_path):
    with pytest.raises(ValueError, match="needs the KL penalty to the reference; set ref_kl_coef"):
        job(tmp_path, reward_model, ref_kl_coef=None)
    with pytest.raises(ValueError, match="on a task, pass reward_fns"):
        TrainConfig.for_task("TextGen-Reverse-v0", reward_model=str(reward_model), ref_kl_coef=0.05)
    with pytest.raises(ValueError, match="fitted on vocab_size 50, max_length 20; this run has 50, 12"):
        job(tmp_path, reward_model, max_length=12)
    with pytest.raises(ValueError, match="reward_model: .*no such reward-model folder"):
        job(tmp_path, tmp_path / "missing")
    with pytest.raises(ValueError, match="reward_weights is set by reward_model"):
        job(tmp_path, reward_model, env_kwargs={"reward_weights": {"diversity": 1.0}})


def test_train_command_takes_the_reward_model(reward_model, tmp_path, capsys):
    argv = [
        "train",
        "--reward-model",
        str(reward_model),
        "--ref-kl-coef",
        "0.05",
        "--output-dir",
        str(tmp_path),
        "--total-timesteps",
        "960",
        "--n-envs",
        "8",
        "--critic-warmup",
        "2",
        "--no-progress-bar",
    ]
    assert main(argv) in (0, 1)
    assert "proxy vs gold" in capsys.readouterr().out
    assert main([*argv[:3], "--output-dir", str(tmp_path / "b")]) == 2
    assert "set ref_kl_coef" in capsys.readouterr().err


def test_the_example_short_mode(tmp_path):
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "rlhf.py"), "--short", "--output-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["pairs"] == 300
    assert results["held_out_accuracy"] > 0.6  # the labeller's rule, learnt in part from 240 pairs
    (run,) = results["runs"]
    assert run["timesteps"] == 10_240 and run["ref_kl_coef"] == 0.2
    assert run["kl_after"] > 0.0
    assert run["gold_after"] > run["gold_before"] and run["proxy_after"] > run["proxy_before"]
    assert "held-out preference accuracy" in done.stdout and "gold score" in done.stdout
    assert (tmp_path / "overoptimisation.png").stat().st_size > 10_000
    assert (tmp_path / "reward_model" / "model.safetensors").is_file()
