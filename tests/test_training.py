"""A short end-to-end training run: its outputs, its checkpoints, its reproducibility, its configuration."""

from __future__ import annotations

import csv
import json
import math
import os
import struct

import pytest
import torch
import yaml

from verl_sb3.app.config import TrainConfig
from verl_sb3.app.dashboard import plot_dashboard
from verl_sb3.app.recorder import TrainingRecorder
from verl_sb3.app.training import build_model, train
from verl_sb3.checkpoints import load_checkpoint
from verl_sb3.evaluation import evaluate_model

TINY = dict(
    total_timesteps=2048,
    n_envs=8,
    n_steps=20,
    batch_size=80,
    eval_freq=1024,
    checkpoint_freq=1024,
    eval_sequences=20,
    final_eval_sequences=50,
    progress_bar=False,
    ref_kl_coef=0.02,  # off by default; on here so that the CSV's reference-KL columns are tested
)
ROLLOUT = TINY["n_envs"] * TINY["n_steps"]
N_UPDATES = math.ceil(TINY["total_timesteps"] / ROLLOUT)  # SB3 collects whole rollouts: 13


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    output = tmp_path_factory.mktemp("run")
    config = TrainConfig(**TINY, output_dir=str(output))
    return config, output, train(config)


@pytest.fixture(scope="module")
def rerun(tmp_path_factory):
    output = tmp_path_factory.mktemp("rerun")
    config = TrainConfig(**TINY, output_dir=str(output))
    return config, output, train(config)


def read_csv(path):
    with open(path, newline="") as file:
        reader = csv.DictReader(file)
        return reader.fieldnames, list(reader)


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG file"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_outputs_exist(run):
    _, output, _ = run
    for name in (
        "training_curves.png",
        "updates.csv",
        "evaluation.md",
        "evaluation.json",
        "config.yaml",
        "evaluations.json",
    ):
        assert (output / name).is_file(), name
    checkpoints = output / "model_checkpoints"
    assert (checkpoints / "final_model.zip").is_file() and (checkpoints / "best_model.zip").is_file()
    periodic = sorted(checkpoints.glob("model_*_steps.zip"))
    assert periodic, "no periodic checkpoint"
    for path in periodic:  # named after the timestep, saved at a rollout boundary past checkpoint_freq
        steps = int(path.stem.split("_")[1])
        assert steps % ROLLOUT == 0 and steps >= TINY["checkpoint_freq"]
    assert not list(checkpoints.glob("*.tmp"))


def test_dashboard_is_a_real_png(run):
    _, output, _ = run
    path = output / "training_curves.png"
    width, height = png_size(path)
    assert (width, height) == (1300, 1200)  # 13 x 12 inches at 100 dpi
    assert path.stat().st_size > 30_000  # six plots with data, not a blank image


def test_updates_csv_has_one_row_per_update(run):
    _, output, result = run
    model = result["model"]
    columns, rows = read_csv(output / "updates.csv")
    assert tuple(columns) == TrainingRecorder.COLUMNS
    assert len(rows) == N_UPDATES == len(model.verification_log) == len(result["recorder"].updates)
    assert [int(r["update"]) for r in rows] == list(range(N_UPDATES))
    assert [int(r["timesteps"]) for r in rows] == [ROLLOUT * (i + 1) for i in range(N_UPDATES)]
    for row, entry in zip(rows, model.verification_log):
        assert int(row["accepted"]) == int(entry["accepted"]) and int(row["rolled_back"]) == int(entry["rolled_back"])
        assert float(row["kl"]) == pytest.approx(entry["kl"])
        assert 0.0 <= float(row["mean_episode_reward"]) <= 20.0
        assert math.isnan(float(row["loss"])) != bool(entry["accepted"])  # losses only for accepted updates
    assert float(rows[-1]["verification_rate"]) == pytest.approx(model.verification_rate)
    # reference-KL control: a frozen initial policy, a fixed coefficient
    assert model.ref_policy is not None and model.kl_ctrl.value == TINY["ref_kl_coef"]
    assert {float(r["kl_coef"]) for r in rows} == {TINY["ref_kl_coef"]}
    ref_kl = [float(r["ref_kl"]) for r in rows]
    assert ref_kl[0] == 0.0 and all(math.isfinite(v) for v in ref_kl) and max(ref_kl) > 0.0
    wall = [float(r["wall_time"]) for r in rows]
    assert wall == sorted(wall)


def test_learning_rate_decays_linearly_over_the_run(run):
    config, _, result = run
    model = result["model"]
    assert model.lr_schedule(1.0) == pytest.approx(config.learning_rate)
    assert model.lr_schedule(0.5) == pytest.approx((config.learning_rate + config.learning_rate_final) / 2)
    assert model.lr_schedule(0.0) == pytest.approx(config.learning_rate_final)
    # the optimizer ends the run near the final rate (SB3 sets it from the progress before each update)
    last = model.policy.optimizer.param_groups[0]["lr"]
    assert (
        config.learning_rate_final
        <= last
        < config.learning_rate_final + 0.1 * (config.learning_rate - config.learning_rate_final)
    )
    constant = build_model(TrainConfig(**{**TINY, "learning_rate_final": None}))
    assert constant.lr_schedule(0.0) == constant.lr_schedule(1.0) == config.learning_rate


def test_the_training_job_checks_the_repeat_mass(run):
    config, _, result = run
    model = result["model"]
    assert model.max_repeat_prob == config.max_repeat_prob == TrainConfig().max_repeat_prob == 0.03  # 1.5 / 50
    assert all(entry["checks"]["repeat_mass"]["threshold"] == 0.03 for entry in model.verification_log)
    assert build_model(TrainConfig(**{**TINY, "repeat_mass_factor": None})).max_repeat_prob is None
    assert TrainConfig(vocab_size=20).max_repeat_prob == pytest.approx(0.075)  # scales with the vocabulary
    assert TrainConfig(vocab_size=2, repeat_mass_factor=3.0).max_repeat_prob == 1.0


def test_the_training_job_judges_each_update_on_the_next_rollout(run):
    config, _, result = run
    model = result["model"]
    assert model.max_reuse_rise == config.max_reuse_rise == 3.0
    measured = model.rollout_judgement.measured
    assert measured is not None and 0.0 < measured[0] < 1.0
    # the critic warm-up's updates leave the policy unchanged: only the later ones are judged
    assert all("undone" in entry and "lr_scale" in entry for entry in model.verification_log)
    assert build_model(TrainConfig(**{**TINY, "max_reuse_rise": None})).max_reuse_rise is None
    kwargs = TrainConfig(verification={"lr_shrink": 0.25}).verification_kwargs()
    assert kwargs["max_reuse_rise"] == 3.0 and kwargs["lr_shrink"] == 0.25 and kwargs["max_repeat_prob"] == 0.03


def test_evaluation_files_agree_with_the_result(run):
    config, output, result = run
    markdown = (output / "evaluation.md").read_text()
    assert markdown.startswith("| Test case | Metric | Target | Actual | Result |")
    assert result["table"] in markdown
    data = json.loads((output / "evaluation.json").read_text())
    assert data["all_passed"] == all(row["passed"] for row in result["rows"])
    assert [row["test_case"] for row in data["targets"]] == [row["test_case"] for row in result["rows"]]
    assert data["figures"]["n_sequences"] == config.final_eval_sequences
    assert data["figures"]["optimal_return"] == pytest.approx(20.0)
    evaluations = json.loads((output / "evaluations.json").read_text())
    assert evaluations and all(e["n_sequences"] == config.eval_sequences for e in evaluations)


def test_config_yaml_rebuilds_the_configuration(run):
    config, output, _ = run
    assert yaml.safe_load((output / "config.yaml").read_text()) == config.as_dict()
    assert TrainConfig.from_yaml(output / "config.yaml").as_dict() == config.as_dict()


def test_final_checkpoint_reloads_with_the_same_evaluation(run):
    config, output, result = run
    loaded = load_checkpoint(output / "model_checkpoints" / "final_model.zip")
    figures = evaluate_model(loaded, n_sequences=config.final_eval_sequences, seed=config.seed + 10_000)
    expected = {k: v for k, v in result["figures"].items() if k not in ("train_seconds", "timesteps")}
    assert figures == expected
    assert loaded.num_timesteps == result["figures"]["timesteps"] == N_UPDATES * ROLLOUT


def test_same_seed_same_numbers(run, rerun):
    _, output, result = run
    _, output_again, result_again = rerun
    columns, rows = read_csv(output / "updates.csv")
    _, rows_again = read_csv(output_again / "updates.csv")
    numbers = [c for c in columns if c != "wall_time"]
    assert [[r[c] for c in numbers] for r in rows] == [[r[c] for c in numbers] for r in rows_again]
    drop = ("train_seconds",)
    assert {k: v for k, v in result["figures"].items() if k not in drop} == {
        k: v for k, v in result_again["figures"].items() if k not in drop
    }
    assert result["recorder"].episode_returns == result_again["recorder"].episode_returns


@pytest.mark.parametrize(
    "values, field",
    [
        (dict(n_envs=0), "n_envs"),
        (dict(n_envs=True), "n_envs"),
        (dict(total_timesteps=1.5), "total_timesteps"),
        (dict(batch_size="80"), "batch_size"),
        (dict(learning_rate="fast"), "learning_rate"),
        (dict(learning_rate_final=0.0), "learning_rate_final"),
        (dict(learning_rate_final="slow"), "learning_rate_final"),
        (dict(critic_warmup=-1), "critic_warmup"),
        (dict(critic_warmup=2.5), "critic_warmup"),
        (dict(kl_threshold=-0.1), "kl_threshold"),
        (dict(kl_threshold=float("inf")), "kl_threshold"),
        (dict(vocab_size=1), "vocab_size"),
        (dict(max_length=0), "max_length"),
        (dict(forbidden_tokens=[50]), "forbidden_tokens"),
        (dict(forbidden_tokens=["a"]), "forbidden_tokens"),
        (dict(env_kwargs=dict(repetition_window=1)), "repetition_window"),
        (dict(threads=0), "threads"),
        (dict(nope=1, also_not=2), "unknown settings \\['also_not', 'nope'\\]"),
    ],
)
def test_config_errors_name_the_field(values, field):
    with pytest.raises(ValueError, match=field):
        TrainConfig.from_dict(values)


def test_threads_default_to_one_per_core_at_most_two_and_train_applies_them(monkeypatch, tmp_path):
    for cpus, threads in (({0}, 1), ({0, 1}, 2), (set(range(8)), 2)):  # the cores this process may use
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, cpus=cpus: cpus, raising=False)
        assert TrainConfig().threads == threads
    monkeypatch.delattr(os, "sched_getaffinity")  # where there is none (macOS, Windows): os.cpu_count()
    for cores, threads in ((1, 1), (2, 2), (8, 2), (None, 1)):
        monkeypatch.setattr(os, "cpu_count", lambda cores=cores: cores)
        assert TrainConfig().threads == threads
    before = torch.get_num_threads()
    try:
        for threads in (2, 1):
            train(TrainConfig(**TINY, threads=threads, output_dir=str(tmp_path / str(threads))))
            assert torch.get_num_threads() == threads
        build_model(TrainConfig(**TINY, threads=2)).get_env().close()  # building a model leaves them alone
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_config_from_yaml(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("n_envs: 4\nforbidden_tokens: [3, 5]\n")
    config = TrainConfig.from_yaml(path, seed=7)
    assert (config.n_envs, config.forbidden_tokens, config.seed) == (4, [3, 5], 7)
    assert config.total_timesteps == TrainConfig().total_timesteps  # the rest: TrainConfig's defaults
    path.write_text("- a list\n")
    with pytest.raises(ValueError, match="mapping"):
        TrainConfig.from_yaml(path)
    path.write_text("n_steps: 0\n")
    with pytest.raises(ValueError, match="n_steps"):
        TrainConfig.from_yaml(path)
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        TrainConfig.from_yaml(tmp_path / "missing.yaml")


def test_dashboard_without_updates_and_with_a_zero_optimum(tmp_path):
    path = plot_dashboard([], [], [], tmp_path / "empty.png")
    assert png_size(path) == (1300, 1200)
    updates = [
        dict(
            timesteps=10,
            loss=math.nan,
            value_loss=math.nan,
            policy_gradient_loss=math.nan,
            accepted=0,
            backtracks=0,
            rolled_back=1,
        )
    ]
    path = plot_dashboard([5, 10], [-3.0, -1.0], updates, tmp_path / "negative.png", optimum=0.0, random_baseline=-2.0)
    assert png_size(path) == (1300, 1200)


@pytest.mark.parametrize(
    "settings, name",
    [
        ({"seed": -1}, "seed"),
        ({"gamma": 1.5}, "gamma"),
        ({"gae_lambda": -0.1}, "gae_lambda"),
        ({"clip_range": 0}, "clip_range"),
        ({"env_kwargs": {"reward_fns": {"bonus": len}}}, "env_kwargs: reward_fns"),
        ({"ent_coef": float("nan")}, "ent_coef"),
        ({"ref_kl_coef": -0.1}, "ref_kl_coef"),
        ({"target_entropy": -1.0}, "target_entropy"),
        ({"repeat_mass_factor": 0.0}, "repeat_mass_factor"),
        ({"repeat_mass_factor": "low"}, "repeat_mass_factor"),
        ({"verification": {"max_repeat_prob": 0.1}}, r"verification: \['max_repeat_prob'\]"),
        ({"max_reuse_rise": -1.0}, "max_reuse_rise"),
        ({"verification": {"max_reuse_rise": 2.0}}, r"verification: \['max_reuse_rise'\]"),
        ({"verification": {"kl_threshold": 0.1, "min_entropy": 0.0}}, r"verification: \['kl_threshold'\]"),
        ({"progress_bar": "no"}, "progress_bar"),
        ({"verbose": 5}, "verbose"),
        ({"output_dir": ""}, "output_dir"),
        ({"forbidden_tokens": 5}, "forbidden_tokens"),
        ({"env_kwargs": {"vocab_size": 10}}, "env_kwargs"),
        ({"env_kwargs": {"colour": 1}}, "env_kwargs"),
        ({"policy_kwargs": [1]}, "policy_kwargs"),
        ({"advantage_estimator": "ppo"}, "advantage_estimator: expected one of"),
        ({"loss_agg_mode": "sum"}, "loss_agg_mode: expected one of"),
        ({"clip_range_high": 0}, "clip_range_high"),
        ({"filter_groups": "yes"}, "filter_groups"),
        ({"stop_on_targets": 1}, "stop_on_targets"),
        ({"group_size": 0}, "group_size"),
        ({"group_size": 3}, r"group_size: n_envs \(128\) must be a multiple"),
        ({"advantage_estimator": "grpo", "group_size": 4}, "critic_warmup: advantage_estimator 'grpo' trains no"),
        ({"advantage_estimator": "rloo", "critic_warmup": 0}, "group_size: advantage_estimator 'rloo' compares"),
    ],
)
def test_more_train_config_errors_name_the_field(settings, name):
    with pytest.raises(ValueError, match=name):
        TrainConfig(**settings)


def test_the_loss_panel_stays_readable_after_a_spike_and_the_panels_show_their_bars():
    import matplotlib.pyplot as plt

    from verl_sb3.app import dashboard

    updates = [dict(timesteps=t, loss=1000.0 if t == 1 else 0.1 + 0.01 * (t % 3), accepted=1, backtracks=0,
                    rolled_back=0, entropy=2.0 + 0.01 * t, kl=0.01) for t in range(1, 60)]  # fmt: skip
    figure, (losses, entropy) = plt.subplots(1, 2)
    dashboard._plot_losses(losses, updates)
    assert losses.get_ylim()[1] < 1.0 and "the first updates' off the chart" in losses.get_title()
    dashboard._plot_update_figure(entropy, updates, "entropy", "Policy entropy", "mean entropy", 2.3, "target")
    assert [line.get_label() for line in entropy.get_lines()] == ["mean entropy", "target 2.3"]
    assert entropy.get_lines()[1].get_ydata()[0] == 2.3
    evaluations = [dict(timesteps=100 * i, mean_return=18.0 + i, repetition_rate=0.01 / i) for i in range(1, 4)]
    figure, ax = plt.subplots()
    dashboard._plot_evaluations(ax, evaluations, 20.0, 18.24, 0.00705)
    labels = [line.get_label() for axis in figure.axes for line in axis.get_lines()]
    assert labels == ["mean return", "optimum 20", "random policy's return 18.24", "repetition",
                      "random policy's repetition 0.705%"]  # fmt: skip
    assert figure.axes[1].get_ylim()[1] > 100 * 0.01  # the highest repetition shows
    figure, ax = plt.subplots()
    dashboard._plot_evaluations(ax, [{**e, "repetition_rate": 0.0} for e in evaluations], 20.0, 18.24, 0.00705)
    assert figure.axes[1].get_ylim()[1] > 1.2 * 0.705  # the random policy's line stays below the optimum's
    plt.close("all")


def test_the_training_job_builds_a_group_estimator_on_grouped_environments():
    config = TrainConfig(
        **{**TINY, "ref_kl_coef": None},
        advantage_estimator="rloo",
        critic_warmup=0,
        group_size=4,
        loss_agg_mode="seq-mean-token-mean",
        clip_range_high=0.28,
    )
    model = build_model(config)
    assert (model.advantage_estimator, model.loss_agg_mode, model.clip_range_high(1.0)) == (
        "rloo",
        "seq-mean-token-mean",
        0.28,
    )
    assert model.get_env().get_attr("group_size") == [4] * TINY["n_envs"]
    model.learn(ROLLOUT)
    assert model.logger.name_to_value["verl/groups"] == TINY["n_envs"] // 4


def stubbed_targets(monkeypatch, verdicts):
    """The recorder's target table replaced by one that passes or fails as ``verdicts`` say, in turn."""
    from verl_sb3.app import recorder as recorder_module

    answers = iter(verdicts)
    monkeypatch.setattr(recorder_module, "evaluation_table", lambda figures, targets: [{"passed": next(answers)}])


def test_training_stops_once_the_targets_hold_on_a_confirming_evaluation(tmp_path, monkeypatch):
    stubbed_targets(monkeypatch, [True, True])  # the first evaluation meets them, its confirmation too
    result = train(TrainConfig(**{**TINY, "ref_kl_coef": None}, output_dir=str(tmp_path)))
    recorder = result["recorder"]
    first_evaluation = math.ceil(TINY["eval_freq"] / ROLLOUT) * ROLLOUT  # 1120: between rollouts
    assert recorder.targets_met_at == first_evaluation
    # SB3 stops on the first step of the next rollout, which is not trained on
    assert result["model"].num_timesteps == first_evaluation + TINY["n_envs"]
    assert len(recorder.updates) == first_evaluation // ROLLOUT
    evaluation = recorder.evaluations[0]
    assert evaluation["targets_met"] == evaluation["confirmed"] == 1.0
    assert set(evaluation["confirming"]) == {"mean_return", "diversity", "repetition_rate", "entropy"}
    assert (tmp_path / "model_checkpoints" / "final_model.zip").is_file() and "figures" in result


def test_an_unconfirmed_evaluation_does_not_stop_training(tmp_path, monkeypatch):
    stubbed_targets(monkeypatch, [True, False] * 10)  # met, then not confirmed, at every evaluation
    result = train(TrainConfig(**{**TINY, "ref_kl_coef": None}, output_dir=str(tmp_path)))
    recorder = result["recorder"]
    assert recorder.targets_met_at is None and result["model"].num_timesteps == N_UPDATES * ROLLOUT
    assert [(e["targets_met"], e["confirmed"]) for e in recorder.evaluations] == [(1.0, 0.0)]  # at 1,120 steps


def test_the_training_job_runs_a_critic_free_estimator_end_to_end(tmp_path):
    config = TrainConfig(
        **{**TINY, "ref_kl_coef": None},
        advantage_estimator="grpo",
        group_size=4,
        critic_warmup=0,
        output_dir=str(tmp_path),
    )
    result = train(config)
    _, rows = read_csv(tmp_path / "updates.csv")
    assert rows and all(math.isnan(float(row["value_loss"])) for row in rows)  # no critic, no value loss
    assert all(row["policy_gradient_loss"] for row in rows if row["accepted"] == "1")
    assert result["model"].advantage_estimator == "grpo" and (tmp_path / "training_curves.png").is_file()
    assert load_checkpoint(tmp_path / "model_checkpoints" / "final_model.zip").advantage_estimator == "grpo"
