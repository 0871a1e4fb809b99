"""Training, evaluating and sampling on a task: the SLM policies, task evaluation, the job and the CLI."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
import torch as th
from stable_baselines3 import PPO

from textenv_gym.sb3_vec_env import make_textgen_vec_env
from textenv_gym.tasks import task_kwargs
from verl_sb3 import VerifiedRecurrentPPO
from verl_sb3.app.cli import main
from verl_sb3.app.config import TASK_DEFAULTS, TrainConfig
from verl_sb3.app.training import train
from verl_sb3.checkpoints import load_checkpoint
from verl_sb3.task_evaluation import evaluate_task, sample_answers, task_prompts

REVERSE = "TextGen-Reverse-v0"
TINY_TASK = dict(total_timesteps=1024, n_envs=8, n_steps=16, batch_size=64, eval_freq=512, checkpoint_freq=512)


def oracle(env_id: str = REVERSE, answer=None, **kwargs):
    """A model whose policy writes ``answer(prompt words)`` then the end token, whatever it learnt."""
    config = task_kwargs(env_id, **kwargs)
    model = PPO("MlpPolicy", make_textgen_vec_env(2, seed=0, **config), n_steps=8, batch_size=16)
    model.env_kwargs, model.env_id, model.task_kwargs = config, env_id, kwargs
    vocabulary = config["vocabulary"]
    answer = answer or (lambda words: list(reversed(words[: words.index("=")])))

    def get_distribution(obs):
        logits = th.full((len(obs), len(vocabulary)), -30.0)
        for row, sequence in enumerate(obs.tolist()):
            words = [vocabulary[t] for t in sequence if t < len(vocabulary)]
            written = words[words.index("=") + 1 :]
            target = [*answer(words), "<end>"]
            logits[row, vocabulary.index(target[len(written)] if len(written) < len(target) else "<end>")] = 30.0
        return th.distributions.Categorical(logits=logits), None

    class Wrapped:
        distribution = None

    def distribution(obs):
        wrapped = Wrapped()
        wrapped.distribution = get_distribution(obs)[0]
        return wrapped

    model.policy.get_distribution = distribution  # the oracle stands for a trained policy
    return model


def test_an_oracle_answers_every_test_prompt_exactly():
    model = oracle(length=2, n_symbols=4)
    figures = evaluate_task(model, k=3, seed=0)
    assert figures["pass@1"] == figures["pass@3"] == figures["mean_score"] == 1.0
    assert figures["ended"] == 1.0 and figures["mean_answer_length"] == 2.0
    assert figures["n_prompts"] == len(task_kwargs(REVERSE, split="test", length=2, n_symbols=4)["prompts"])
    assert figures["distinct_answers"] == pytest.approx(1 / 3)  # one answer, three times


def test_wrong_and_half_right_answers_are_scored_as_the_task_says():
    always_a = oracle(answer=lambda words: ["a", "a", "a"])
    answers = sample_answers(always_a, task_prompts(always_a)[:20], k=2, seed=1)
    expected = [
        1.0 if r.ground_truth == "a a a" else 0.5 * sum(w == "a" for w in r.ground_truth.split()) / 3
        for r in answers.prompts
    ]
    assert np.allclose(answers.scores, np.array(expected)[:, None])
    assert evaluate_task(oracle(answer=lambda words: []), k=1)["pass@1"] == 0.0  # the end token at once


def test_the_lstm_policy_reads_prompts_of_any_length_and_stops_at_the_end_token():
    prompts = [[], [0], [1, 2], [3, 0, 1, 2], [2, 2, 2, 2, 2]]
    env = make_textgen_vec_env(6, seed=0, vocab_size=6, max_length=6, eos_token=5, prompts=prompts)
    model = VerifiedRecurrentPPO(
        "SLMLstmPolicy", env, n_steps=12, batch_size=24, n_epochs=2, seed=0,
        policy_kwargs=dict(lstm_hidden_size=16, n_lstm_layers=1, embedding_dim=8, enable_critic_lstm=False),
    )  # fmt: skip
    model.learn(3 * 72)
    assert len(model.verification_log) == 3
    # every update is checked against the rollout's recorded logits, which the whole prompt conditions
    assert all(entry["accepted"] for entry in model.verification_log), model.verification_log


def test_task_configurations_start_from_the_task_defaults():
    config = TrainConfig.for_task(REVERSE, env_kwargs={"length": 2})
    assert config.task and config.total_timesteps == TASK_DEFAULTS["total_timesteps"]
    assert config.target_entropy is None and config.textgen.max_length == 6
    assert TrainConfig.from_dict({"env_id": REVERSE, "n_envs": 8}).n_envs == 8
    with pytest.raises(ValueError, match="env_id: expected 'TextGen-v0' or a task"):
        TrainConfig.for_task("TextGen-Sort-v0")
    with pytest.raises(ValueError, match="vocab_size: set by the task TextGen-Reverse-v0"):
        TrainConfig.for_task(REVERSE, vocab_size=12)
    with pytest.raises(ValueError, match="length: expected an integer >= 1"):
        TrainConfig.for_task(REVERSE, env_kwargs={"length": 0})


@pytest.fixture(scope="module")
def task_job(tmp_path_factory):
    output = tmp_path_factory.mktemp("task") / "results"
    config = TrainConfig.for_task(REVERSE, **TINY_TASK, output_dir=str(output), progress_bar=False)
    return train(config), output


def test_the_job_trains_on_a_task_and_holds_it_to_the_tasks_targets(task_job):
    result, output = task_job
    assert [row["metric"] for row in result["rows"]] == ["pass@1", "ended"]
    evaluations = json.loads((output / "evaluations.json").read_text())
    assert len(evaluations) >= 1 and all(0.0 <= e["pass@1"] <= 1.0 for e in evaluations)
    assert (output / "training_curves.png").stat().st_size > 0
    model = load_checkpoint(output / "model_checkpoints" / "final_model.zip")  # untrusted: allowed
    assert model.env_id == REVERSE and model.task_kwargs == {}
    assert evaluate_task(model, k=1)["n_prompts"] == len(task_prompts(model, "test"))


def test_the_command_line_evaluates_and_samples_a_tasks_model(task_job):
    _, output = task_job
    checkpoint = str(output / "model_checkpoints" / "final_model.zip")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(["evaluate", checkpoint, "--n-sequences", "2", "--threads", "2"])
    assert code == 1 and "| Exact match (pass@1) | pass@1 | >= 95.0% |" in stdout.getvalue()
    assert "| k | 2 |" in stdout.getvalue()
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        main(["evaluate", checkpoint])
    assert "| k | 8 |" in stdout.getvalue()  # a task's default: 8 answers per test prompt
    with contextlib.redirect_stdout(io.StringIO()):  # nearly greedy: one answer per prompt, k times
        main(["evaluate", checkpoint, "--temperature", "1e-4", "--output-dir", str(output / "cold")])
    assert json.loads((output / "cold" / "evaluation.json").read_text())["figures"]["distinct_answers"] == 1 / 8
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(["generate", checkpoint, "--num-sequences", "3", "--seed", "0"]) == 0
    text = stdout.getvalue()
    assert text.count("Reference: ") == 3 and text.count("Prompt: ") == 3
    assert main(["evaluate", checkpoint, "--prompt", "a b ="]) == 2


def test_train_takes_an_env_and_its_arguments_on_the_command_line(tmp_path):
    output = tmp_path / "run"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(["train", "--env", REVERSE, "--env-kwargs", "{length: 2, n_symbols: 3}", "--total-timesteps",
                     "512", "--n-envs", "8", "--output-dir", str(output), "--no-progress-bar"])  # fmt: skip
    assert code in (0, 1) and "test pass@1" in stdout.getvalue()
    assert load_checkpoint(output / "model_checkpoints" / "final_model.zip").task_kwargs == {
        "length": 2,
        "n_symbols": 3,
    }
    assert main(["train", "--env-kwargs", "[1, 2]", "--output-dir", str(tmp_path / "x")]) == 2
    for env in ([], ["--env", REVERSE]):
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr):
            assert main(["train", *env, "--env-kwargs", "{lenght: 2}", "--output-dir", str(tmp_path / "y")]) == 2
        assert "env_kwargs: " in stderr.getvalue() and "unknown arguments ['lenght']" in stderr.getvalue()
        assert not (tmp_path / "y").exists()
