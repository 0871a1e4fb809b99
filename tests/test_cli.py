"""The ``verl-sb3`` command line (verl_sb3.app.cli.main) and the example scripts."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import verl_sb3
from verl_sb3.app.cli import build_parser, main, parse_token_ids, train_config, with_default_checkpoint
from verl_sb3.app.config import TrainConfig
from verl_sb3.checkpoints import load_checkpoint
from verl_sb3.evaluation import evaluate_model
from verl_sb3.generation import generate
from verl_sb3.metrics import unique_ratio

ROOT = Path(__file__).resolve().parents[1]
TABLE_HEADER = "| Test case | Metric | Target | Actual |"
TINY = dict(
    total_timesteps=2048,
    n_envs=8,
    n_steps=20,
    batch_size=80,
    eval_freq=1024,
    checkpoint_freq=1024,
    eval_sequences=20,
    final_eval_sequences=50,
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """``verl-sb3 train --config tiny.yaml --seed 3 --output-dir ... --no-progress-bar``:
    (exit code, stdout, output)."""
    folder = tmp_path_factory.mktemp("cli")
    config = folder / "tiny.yaml"
    config.write_text(yaml.safe_dump({**TINY, "seed": 0, "progress_bar": True}))
    output = folder / "results"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(["train", "--config", str(config), "--seed", "3", "--output-dir", str(output), "--no-progress-bar"])
    return code, stdout.getvalue(), output


@pytest.fixture(scope="module")
def checkpoint(trained):
    return trained[2] / "model_checkpoints" / "final_model.zip"


def test_train_prints_the_table_and_the_outputs(trained):
    code, stdout, output = trained
    assert TABLE_HEADER in stdout
    for name in ("training_curves.png", "updates.csv", "evaluation.md", "evaluation.json", "model_checkpoints"):
        assert str(output / name) in stdout
        assert (output / name).exists()
    assert "final_model.zip" in stdout


def test_train_exit_code_follows_the_targets(trained):
    code, stdout, output = trained
    evaluation = json.loads((output / "evaluation.json").read_text())
    assert code == (0 if evaluation["all_passed"] else 1)
    failed = [row["test_case"] for row in evaluation["targets"] if not row["passed"]]
    if failed:
        line = next(line for line in stdout.splitlines() if line.startswith("Targets not met:"))
        assert all(case in line for case in failed)
    else:
        assert "All evaluation targets met." in stdout


def test_options_override_the_yaml_and_defaults_stay_trainconfigs(trained):
    _, _, output = trained
    used = yaml.safe_load((output / "config.yaml").read_text())
    assert used["seed"] == 3  # --seed over the YAML's 0
    assert used["progress_bar"] is False  # --no-progress-bar over the YAML's true
    assert used["output_dir"] == str(output)
    assert all(used[name] == value for name, value in TINY.items())  # from the YAML
    defaults = TrainConfig().as_dict()
    for name in ("learning_rate", "kl_threshold", "gamma", "n_epochs", "vocab_size"):  # given nowhere
        assert used[name] == defaults[name]


def test_evaluate(checkpoint, tmp_path, capsys):
    code = main(["evaluate", str(checkpoint), "--n-sequences", "30", "--seed", "1", "--output-dir", str(tmp_path)])
    stdout = capsys.readouterr().out
    assert TABLE_HEADER in stdout and "| Figure | Value |" in stdout
    saved = json.loads((tmp_path / "evaluation.json").read_text())
    expected = evaluate_model(load_checkpoint(checkpoint), n_sequences=30, seed=1)
    assert saved["figures"] == expected
    assert code == (0 if saved["all_passed"] else 1)  # a model of 2,048 steps misses some targets
    assert code == 1 and "Targets not met: " in stdout
    assert f"| diversity | {expected['diversity']:.3f}".rstrip("0") in stdout
    assert (tmp_path / "evaluation.md").read_text().startswith(TABLE_HEADER)


def test_evaluate_with_a_prompt_uses_the_prompts_optimum(checkpoint, capsys):
    assert main(["evaluate", str(checkpoint), "--n-sequences", "5", "--prompt", "the the"]) == 1  # targets missed
    stdout = capsys.readouterr().out
    assert "| optimal_return | 15.902 |" in stdout
    assert "| Return vs optimum | mean_return | >= 15.402 |" in stdout


def test_generate(checkpoint, capsys):
    code = main(
        [
            "generate",
            str(checkpoint),
            "--prompt",
            "Start sequence generation",
            "--num-sequences",
            "2",
            "--length",
            "5",
            "--seed",
            "0",
        ]
    )
    stdout = capsys.readouterr().out
    assert code == 0
    expected = generate(load_checkpoint(checkpoint), "Start sequence generation", num_sequences=2, length=5, seed=0)
    assert stdout.count("Prompt: Start sequence generation\n") == 2
    generated = re.findall(r"^Generated: (.*)$", stdout, re.M)
    assert generated == expected.texts and all(len(text.split()) == 5 for text in generated)
    scores = [float(s) for s in re.findall(r"^Quality Score: ([0-9.]+)$", stdout, re.M)]
    assert scores == [round(unique_ratio(tokens), 3) for tokens in expected.tokens]
    returns = [float(r) for r in re.findall(r"^Return: (-?[0-9.]+)", stdout, re.M)]
    assert returns == pytest.approx(expected.returns, abs=1e-3)
    assert len(re.findall(r"^Repetition: (yes|no)", stdout, re.M)) == 2


def test_generate_with_token_ids_and_defaults(checkpoint, capsys):
    assert main(["generate", str(checkpoint), "--prompt-ids", "0,1 2"]) == 0
    stdout = capsys.readouterr().out
    assert stdout.count("Prompt: start sequence generation (ids [0, 1, 2])") == 3  # 3 sequences by default
    assert all(len(line.split()) == 1 + 17 for line in re.findall(r"^Generated: .*$", stdout, re.M))


def run_error(argv, capsys) -> str:
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 2, captured
    message = captured.err.strip()
    assert "\n" not in message and "Traceback" not in message
    assert message.startswith("verl-sb3")
    return message


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["evaluate", "{missing}"], "no such file"),
        (["evaluate", "{noise}"], "truncated or corrupt"),
        (["evaluate", "{checkpoint}", "--n-sequences", "-5"], "--n-sequences: expected an integer >= 1, got -5"),
        (["evaluate", "{checkpoint}", "--n-sequences", "0"], "--n-sequences"),
        (["evaluate", "{checkpoint}", "--temperature", "nan"], "--temperature"),
        (["generate", "{checkpoint}", "--temperature", "0"], "--temperature: expected a finite number > 0"),
        (["generate", "{checkpoint}", "--temperature", "-1"], "--temperature"),
        (
            ["generate", "{checkpoint}", "--prompt", "hello zebra world"],
            "--prompt: text: unknown words ['hello', 'zebra']",
        ),
        (["generate", "{checkpoint}", "--prompt-ids", "1,x"], "--prompt-ids: expected integer token ids"),
        (["generate", "{checkpoint}", "--prompt-ids", ",".join(map(str, range(20)))], "prompt: has 20 tokens"),
        (["generate", "{checkpoint}", "--prompt", "the " * 25], "prompt: has 25 tokens"),
        (["generate", "{checkpoint}", "--length", "50"], "length: expected an integer in [1, 20]"),
        (["generate", "{checkpoint}", "--num-sequences", "0"], "--num-sequences"),
        (["train", "--forbidden-tokens", "1,a"], "--forbidden-tokens: expected integer token ids"),
        (
            ["train", "--forbidden-tokens", "99", "--output-dir", "{out}"],
            "forbidden_tokens: token ids must lie in [0, 49]",
        ),
        (["train", "--n-envs", "0", "--output-dir", "{out}"], "n_envs: expected an integer >= 1"),
        (["train", "--total-timesteps", "many"], "--total-timesteps"),
        (["train", "--advantage-estimator", "ppo"], "--advantage-estimator: invalid choice"),
        (
            ["train", "--advantage-estimator", "grpo", "--group-size", "4", "--output-dir", "{out}"],
            "critic_warmup: advantage_estimator 'grpo' trains no critic; set critic_warmup to 0",
        ),
        (
            ["train", "--advantage-estimator", "grpo", "--critic-warmup", "0", "--output-dir", "{out}"],
            "group_size: advantage_estimator 'grpo' compares the episodes of a group",
        ),
        (["train", "--config", "{unknown_key}"], "unknown settings ['nope']"),
        (["train", "--config", "{bad_yaml}"], "not valid YAML"),
        (["train", "--config", "{missing}"], "no such file"),
        (["train", "--config", "{bad_verification}", "--output-dir", "{out}"], "unexpected keyword argument 'nope'"),
        (["train", "--config", "{bad_env_kwargs}", "--output-dir", "{out}"], "env_kwargs: "),
        (
            ["train", "--config", "{bad_forbidden}", "--output-dir", "{out}"],
            "forbidden_tokens: expected a list of token ids",
        ),
        (["train", "--config", "{bad_seed}", "--output-dir", "{out}"], "seed: expected an integer >= 0"),
        (["evaluate"], "required: checkpoint"),
        ([], "required"),
    ],
)
def test_errors_exit_2_with_one_line(argv, expected, checkpoint, tmp_path, capsys):
    files = dict(
        checkpoint=checkpoint,
        missing=tmp_path / "missing.zip",
        noise=tmp_path / "noise.zip",
        unknown_key=tmp_path / "unknown.yaml",
        bad_yaml=tmp_path / "bad.yaml",
        out=tmp_path / "out",
        bad_verification=tmp_path / "verification.yaml",
        bad_env_kwargs=tmp_path / "env.yaml",
        bad_forbidden=tmp_path / "forbidden.yaml",
        bad_seed=tmp_path / "seed.yaml",
    )
    files["noise"].write_bytes(os.urandom(2048))
    files["unknown_key"].write_text("nope: 1\n")
    files["bad_yaml"].write_text("n_envs: [1\n")
    files["bad_verification"].write_text(yaml.safe_dump({**TINY, "verification": {"nope": 1}}))
    files["bad_env_kwargs"].write_text(yaml.safe_dump({"env_kwargs": {"colour": "red"}}))
    files["bad_forbidden"].write_text("forbidden_tokens: 5\n")
    files["bad_seed"].write_text(yaml.safe_dump({**TINY, "seed": "abc"}))
    message = run_error([arg.format(**{k: str(v) for k, v in files.items()}) for arg in argv], capsys)
    assert expected in message
    if "{missing}" in argv or "{noise}" in argv:
        assert str(files["missing" if "{missing}" in argv else "noise"]) in message  # names the file
    assert not files["out"].exists()  # a bad configuration writes nothing


def test_parse_token_ids():
    assert parse_token_ids("1,2, 3") == parse_token_ids("1 2 3") == parse_token_ids(["1", "2,3"]) == [1, 2, 3]
    assert parse_token_ids("") == []
    with pytest.raises(ValueError, match="1.5"):
        parse_token_ids("1.5")


def test_examples_default_to_the_final_model():
    default = "results/model_checkpoints/final_model.zip"
    assert with_default_checkpoint("generate", [], default) == ["generate", default]
    assert with_default_checkpoint("generate", ["--seed", "1"], default) == ["generate", default, "--seed", "1"]
    assert with_default_checkpoint("generate", ["--seed", "1", "m.zip"], default) == [
        "generate",
        "--seed",
        "1",
        "m.zip",
    ]
    assert with_default_checkpoint("evaluate", ["m.zip", "--n-sequences", "5"], default)[1] == "m.zip"
    assert with_default_checkpoint("evaluate", ["--prompt=the", "m.zip"], default) == [
        "evaluate",
        "--prompt=the",
        "m.zip",
    ]


def run_script(*args, cwd=ROOT):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


def test_example_evaluate_uses_results_final_model(checkpoint, tmp_path):
    target = tmp_path / "results" / "model_checkpoints" / "final_model.zip"
    target.parent.mkdir(parents=True)
    shutil.copy(checkpoint, target)
    done = run_script(ROOT / "examples" / "evaluate.py", "--n-sequences", "10", cwd=tmp_path)
    assert done.returncode == 1 and "Targets not met" in done.stdout, done.stderr  # a model of 2,048 steps
    assert TABLE_HEADER in done.stdout


@pytest.mark.parametrize("variant", [[], ["--reward-model", "--topic-weight", "2"]], ids=["function", "torch-model"])
def test_example_custom_reward(tmp_path, variant):
    done = run_script(
        ROOT / "examples" / "custom_reward.py", "--total-timesteps", "320", "--episodes", "8", *variant, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert ("TorchRewardModel" in done.stdout) == bool(variant)
    rows = {
        line.split()[0]: [float(x) for x in line.split()[1:]]
        for line in done.stdout.splitlines()
        if re.match(r"^\s+(diversity|repetition|forbidden|topic|total)\s", line)
    }
    assert set(rows) == {"diversity", "repetition", "forbidden", "topic", "total"}
    for column in (0, 1):  # before, after: the total is the sum of the components
        assert rows["total"][column] == pytest.approx(sum(rows[n][column] for n in rows if n != "total"), abs=2e-3)
    assert rows["topic"][0] > 0


def test_example_custom_verifier(tmp_path):
    done = run_script(
        ROOT / "examples" / "custom_verifier.py",
        "--total-timesteps",
        "480",
        "--max-kl-per-state",
        "1e-6",
        "--output-dir",
        tmp_path,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    # a bound of 1e-6 vetoes every update at the full step
    assert re.search(r"'max_kl_per_state' \(largest per-state KL <= 1e-06\) vetoed 3 of 3 updates", done.stdout), (
        done.stdout
    )
    assert "reloaded with MaxStateKLRecurrentPPO.load: max_kl_per_state 1e-06, 3 log entries" in done.stdout
    assert (tmp_path / "max_kl_model.zip").is_file()


def test_version_and_python_dash_m(capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"verl-sb3 {verl_sb3.__version__}"
    done = run_script("-m", "verl_sb3", "--version", cwd=ROOT)
    assert done.returncode == 0 and done.stdout.strip() == f"verl-sb3 {verl_sb3.__version__}"
    done = run_script("-m", "verl_sb3", "evaluate", "missing.zip", cwd=ROOT)
    assert done.returncode == 2 and "verl-sb3 evaluate: error: checkpoint 'missing.zip': no such file" in done.stderr


def test_threads_is_an_option_and_yaml_reads_exponents_as_numbers(tmp_path):
    config = tmp_path / "settings.yaml"
    config.write_text("learning_rate: 3e-4\nlearning_rate_final: 1e-5\n")
    args = build_parser().parse_args(["train", "--config", str(config), "--threads", "1"])
    settings = train_config(args)
    assert (settings.learning_rate, settings.learning_rate_final, settings.threads) == (3e-4, 1e-5, 1)
    config.write_text("total_timesteps: 1e6\n")  # a float is not silently made an integer
    with pytest.raises(ValueError, match="total_timesteps: expected an integer >= 1, got 1000000.0"):
        train_config(build_parser().parse_args(["train", "--config", str(config)]))


def test_sft_is_train_with_a_warm_start_unless_its_share_is_set(tmp_path, capsys):
    parse = lambda *argv: train_config(build_parser().parse_args(["sft", *argv]))  # noqa: E731
    assert parse("--env", "TextGen-Reverse-v0").warm_start_share == 0.1
    assert parse("--env", "TextGen-Reverse-v0", "--warm-start-share", "0").warm_start_share == 0.0
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"env_id": "TextGen-Reverse-v0", "warm_start_share": 0.0}))
    assert parse("--config", str(config)).warm_start_share == 0.0  # the file says none: none
    config.write_text(yaml.safe_dump({"env_id": "TextGen-Reverse-v0", "warm_start_epochs": 2}))
    assert parse("--config", str(config)).warm_start_share == 0.1
    assert train_config(build_parser().parse_args(["train", "--env", "TextGen-Reverse-v0"])).warm_start_share == 0.0
    assert main(["sft", "--output-dir", str(tmp_path / "out")]) == 2
    assert "--env: sft fits a task's (prompt, answer) records" in capsys.readouterr().err


def test_sft_writes_its_warm_start_figures(tmp_path, capsys):
    out = tmp_path / "job"
    argv = ["sft", "--env", "TextGen-Reverse-v0", "--env-kwargs", "{length: 2}", "--total-timesteps", "1024"]
    main([*argv, "--warm-start-epochs", "3", "--output-dir", str(out), "--no-progress-bar", "--threads", "1"])
    figures = json.loads((out / "warm_start.json").read_text())
    assert figures["records"] >= 1 and figures["epochs"] == 3 and len(figures["epoch_losses"]) == 3
    assert figures["answer_loss_after"] < figures["answer_loss_before"]
    printed = capsys.readouterr().out
    assert re.search(r"^warm start: \d+ records \(\d+ answer tokens\), answer loss [\d.]+ -> [\d.]+", printed, re.M)
    assert f"warm start       {out / 'warm_start.json'}" in printed
