"""The training job owns its folder: one job at a time, an earlier run kept unless replaced, a
run continued exactly after kill -9 or Ctrl-C, errors of the file system in one line."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch as th
import yaml
from _scripts import REPO_ROOT
from stable_baselines3.common.callbacks import BaseCallback

from verl_sb3.app.cli import main
from verl_sb3.app.config import TrainConfig
from verl_sb3.app.job import LOCK_NAME, JobError, owned_folder
from verl_sb3.app.training import resume, train

TINY = dict(
    total_timesteps=4_800,
    n_envs=8,
    n_steps=20,
    batch_size=80,
    eval_freq=1_600,
    checkpoint_freq=960,
    eval_sequences=20,
    final_eval_sequences=30,
    critic_warmup=2,
    threads=1,
    progress_bar=False,
)


def config(folder: Path, **overrides) -> TrainConfig:
    return TrainConfig(**{**TINY, "output_dir": str(folder), **overrides})


def final_policy(folder: Path) -> dict[str, th.Tensor]:
    with zipfile.ZipFile(folder / "model_checkpoints" / "final_model.zip") as archive:
        import io

        return th.load(io.BytesIO(archive.read("policy.pth")), weights_only=True)


def rows(folder: Path) -> list[dict]:
    with open(folder / "updates.csv", newline="") as file:
        return [{k: v for k, v in row.items() if k != "wall_time"} for row in csv.DictReader(file)]


def evaluations(folder: Path) -> list[dict]:
    return [
        {k: v for k, v in e.items() if k != "wall_time"} for e in json.loads((folder / "evaluations.json").read_text())
    ]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("job") / "whole"
    train(config(folder))
    return folder


def assert_same_run(folder: Path, reference: Path) -> None:
    a, b = final_policy(folder), final_policy(reference)
    assert a.keys() == b.keys() and all(th.equal(a[k], b[k]) for k in a)
    assert rows(folder) == rows(reference)
    assert evaluations(folder) == evaluations(reference)
    evaluation = json.loads((folder / "evaluation.json").read_text())["figures"]
    expected = json.loads((reference / "evaluation.json").read_text())["figures"]
    assert {k: v for k, v in evaluation.items() if k != "train_seconds"} == {
        k: v for k, v in expected.items() if k != "train_seconds"
    }


def test_a_job_killed_with_kill_9_and_resumed_ends_where_the_uninterrupted_job_ends(uninterrupted, tmp_path):
    folder = tmp_path / "killed"
    settings = tmp_path / "settings.yaml"
    settings.write_text(yaml.safe_dump(config(folder).as_dict()))
    job = subprocess.Popen(
        [sys.executable, "-m", "verl_sb3", "train", "--config", str(settings)],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    first = folder / "model_checkpoints" / "model_960_steps.zip"
    deadline = time.monotonic() + 120
    while not first.exists() and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    job.send_signal(signal.SIGKILL)
    job.wait()
    assert job.returncode == -signal.SIGKILL and first.exists(), job.stderr.read()
    assert not (folder / "model_checkpoints" / "final_model.zip").exists()  # killed before the end
    assert main(["train", "--resume", str(folder)]) in (0, 1)  # the evaluation targets of a tiny run may fail
    assert_same_run(folder, uninterrupted)


def test_a_job_stopped_with_ctrl_c_saves_a_checkpoint_and_resumes_exactly(uninterrupted, tmp_path, capsys):
    class CtrlC(BaseCallback):
        def _on_step(self) -> bool:
            if self.num_timesteps == 2_000:
                os.kill(os.getpid(), signal.SIGINT)
            return True

    folder = tmp_path / "stopped"
    result = train(config(folder), callbacks=[CtrlC()])
    assert result["interrupted"] and result["checkpoint"].name == "model_2080_steps.zip"  # the next boundary
    assert "stopping after this update" in capsys.readouterr().err
    assert resume(folder)["model"].num_timesteps == 4_800
    assert_same_run(folder, uninterrupted)


def test_a_used_folder_is_refused_and_overwrite_clears_what_the_old_run_left(uninterrupted, tmp_path, capsys):
    folder = tmp_path / "used"
    train(config(folder, total_timesteps=2_000))
    stale = folder / "model_checkpoints" / "model_1920_steps.zip"
    assert stale.exists()
    mine = folder / "notes.txt"  # not a run's output: kept
    mine.write_text("mine")
    assert main(["train", "--output-dir", str(folder), "--total-timesteps", "960"]) == 2
    err = capsys.readouterr().err
    assert f"output_dir {str(folder)!r}: holds an earlier run (config.yaml, updates.csv" in err
    assert "pass --overwrite to replace it, or --resume" in err and stale.exists()
    train(config(folder, total_timesteps=960), overwrite=True)
    assert not stale.exists() and mine.read_text() == "mine"
    assert len(rows(folder)) == 960 // 160


def test_a_job_never_writes_through_a_symbolic_link(uninterrupted, tmp_path, capsys):
    victim = tmp_path / "home" / ".bashrc"  # a file outside the job's folder
    victim.parent.mkdir()
    victim.write_text("mine")
    run = tmp_path / "run"
    shutil.copytree(uninterrupted, run)  # a run to resume, its updates.csv swapped for a link
    (run / "updates.csv").unlink()
    (run / "updates.csv").symlink_to(victim)
    assert main(["train", "--resume", str(run)]) == 2
    assert "holds links or special files a job would write through" in capsys.readouterr().err
    planted = tmp_path / "planted"
    planted.mkdir()
    (planted / "updates.csv").symlink_to(victim)  # a dangling link would be written through too
    assert main(["train", "--output-dir", str(planted), "--total-timesteps", "160", "--n-envs", "8"]) == 2
    assert "holds links or special files a job would write through" in capsys.readouterr().err
    (planted / "updates.csv").unlink()
    (planted / "logs").mkdir()
    (planted / "logs" / "progress.csv").symlink_to(victim)
    os.link(victim, planted / "evaluation.md")  # a hard link (as an archive can hold), and a FIFO
    os.mkfifo(planted / "evaluations.json")
    refused = pytest.raises(JobError, match="progress.csv.*evaluation.md|evaluation.md.*progress.csv")
    with refused, owned_folder(planted, resume=True):
        pass
    with owned_folder(planted, overwrite=True):  # --overwrite removes the entries, not what they point to
        assert not any(planted.glob("*.json")) and not (planted / "evaluation.md").exists()
    assert victim.read_text() == "mine"


def test_outputs_are_replaced_not_written_through(tmp_path):
    from verl_sb3.app.files import replace_text

    victim = tmp_path / "victim"
    victim.write_text("mine")
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "evaluation.md").symlink_to(victim)
    for pid in (os.getpid(), 1):  # temporary names are random, not .NAME.<pid>.tmp
        (folder / f".evaluation.md.{pid}.tmp.md").symlink_to(victim)
    replace_text(folder / "evaluation.md", "table")
    assert (folder / "evaluation.md").read_text() == "table" and not (folder / "evaluation.md").is_symlink()
    assert victim.read_text() == "mine"
    link = tmp_path / "link"
    link.symlink_to(folder)  # a folder that is a link: --overwrite would clear what it points to
    with pytest.raises(JobError, match="is a symbolic link"), owned_folder(link, overwrite=True):
        pass
    (folder / "evaluation.md").unlink()
    (folder / "evaluation.md").mkdir()  # a folder where a file goes
    with pytest.raises(JobError, match="evaluation.md"), owned_folder(folder, resume=True):
        pass


@pytest.mark.skipif(os.geteuid() == 0, reason="root lists any folder")
def test_a_folder_the_job_cannot_look_into_is_refused(tmp_path):
    folder = tmp_path / "run"
    (folder / "logs").mkdir(parents=True)
    (folder / "logs" / "progress.csv").symlink_to(tmp_path / "elsewhere")
    (folder / "logs").chmod(0o333)
    try:
        with pytest.raises(JobError, match="cannot look into"), owned_folder(folder, resume=True):
            pass
    finally:
        (folder / "logs").chmod(0o755)


def test_a_folder_that_cannot_be_listed_is_refused_not_skipped(tmp_path, monkeypatch):
    from verl_sb3.app import job

    folder = tmp_path / "run"
    (folder / "logs").mkdir(parents=True)

    def unlistable(top, onerror=None, **kwargs):  # what os.walk does with a folder it cannot read
        onerror(PermissionError(13, "Permission denied", str(top)))
        return iter(())

    monkeypatch.setattr(job.os, "walk", unlistable)
    refused = pytest.raises(JobError, match="cannot look into .*logs.* \\(Permission denied\\)")
    with refused, owned_folder(folder, resume=True):
        pass


def test_a_second_job_into_a_folder_in_use_is_refused(tmp_path, capsys):
    folder = tmp_path / "busy"
    with owned_folder(folder):  # another job holds it
        assert main(["train", "--output-dir", str(folder), "--total-timesteps", "160", "--n-envs", "8"]) == 2
    assert (
        f"output_dir {str(folder)!r}: in use by another training job (it holds {LOCK_NAME})" in capsys.readouterr().err
    )
    with owned_folder(folder):  # the lock is released with the job
        pass


@pytest.mark.parametrize("problem", ["a file", "inside a file"])
def test_an_output_folder_that_cannot_be_written_is_one_line_and_exit_code_2(tmp_path, capsys, problem):
    (tmp_path / "file").write_text("not a folder")
    folder = tmp_path / "file" if problem == "a file" else tmp_path / "file" / "results"
    code = main(["train", "--output-dir", str(folder), "--total-timesteps", "160", "--n-envs", "8"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "verl-sb3 train: error: " in err


def test_a_final_model_that_cannot_be_saved_is_saved_elsewhere_and_said(tmp_path, monkeypatch):
    from verl_sb3.app import training

    real = training.save_checkpoint

    def full_disk(model, path, **kwargs):
        if Path(path).name == "final_model.zip" and str(tmp_path) in str(path):
            raise OSError(28, "No space left on device")
        return real(model, path, **kwargs)

    monkeypatch.setattr(training, "save_checkpoint", full_disk)
    with (
        pytest.warns(UserWarning, match="saved it to"),
        pytest.raises(OSError, match="it is saved in (.*)final_model.zip") as error,
    ):
        train(config(tmp_path / "full", total_timesteps=1_920))
    saved = Path(str(error.value).rsplit("it is saved in ", 1)[1])
    assert saved.is_file() and saved.stat().st_size > 0
    assert (tmp_path / "full" / "model_checkpoints" / "model_960_steps.zip").is_file()  # the periodic one is whole


def test_progress_lines_show_when_no_progress_bar_can(tmp_path, capsys):
    train(config(tmp_path / "quiet", total_timesteps=3_200))
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("verl-sb3: ")]
    assert "1,600 / 3,200 steps (50%)" in lines[0] and "evaluation: return" in lines[0]  # at the evaluation
    assert "3,200 / 3,200 steps (100%)" in lines[-1] and "20 updates" in lines[-1]


def test_resume_refuses_a_folder_without_a_run_or_with_changed_settings(uninterrupted, tmp_path, capsys):
    with pytest.raises(JobError, match="holds no run to resume"):
        resume(tmp_path / "empty")
    folder = tmp_path / "changed"
    train(config(folder, total_timesteps=1_920))
    settings = yaml.safe_load((folder / "config.yaml").read_text())
    (folder / "config.yaml").write_text(yaml.safe_dump({**settings, "learning_rate": 0.01}))
    with pytest.raises(JobError, match=r"config.yaml changed since model_960_steps.zip: \['learning_rate'\]"):
        resume(folder)
    assert main(["train", "--resume", str(folder), "--seed", "3"]) == 2
    assert (
        "--resume: the run goes on with its own settings (its config.yaml); leave out ['--seed']"
        in capsys.readouterr().err
    )


def test_a_job_written_before_the_added_settings_resumes_as_it_was_configured(tmp_path, monkeypatch):
    from verl_sb3.app import training
    from verl_sb3.app.config import ADDED_SETTINGS
    from verl_sb3.app.job import JOB_STATE_ENTRY

    folder = tmp_path / "old"
    train(config(folder, total_timesteps=1_920))
    checkpoint = folder / "model_checkpoints" / "model_960_steps.zip"
    # as an earlier version wrote it: none of the settings added since, in config.yaml or the checkpoint
    settings = {
        k: v for k, v in yaml.safe_load((folder / "config.yaml").read_text()).items() if k not in ADDED_SETTINGS
    }
    (folder / "config.yaml").write_text(yaml.safe_dump(settings))
    with zipfile.ZipFile(checkpoint) as archive:
        entries = {item.filename: archive.read(item.filename) for item in archive.infolist()}
    state = json.loads(entries[JOB_STATE_ENTRY])
    state["config"] = {k: v for k, v in state["config"].items() if k not in ADDED_SETTINGS}
    entries[JOB_STATE_ENTRY] = json.dumps(state).encode()
    with zipfile.ZipFile(checkpoint, "w") as archive:
        for name, content in entries.items():
            archive.writestr(name, content)
    for path in [*folder.glob("model_checkpoints/model_1*"), folder / "model_checkpoints" / "final_model.zip"]:
        path.unlink()  # resume from the first checkpoint
    seen = {}
    original = training._run

    def run(cfg, *args, **kwargs):
        seen["config"] = cfg
        return original(cfg, *args, **kwargs)

    monkeypatch.setattr(training, "_run", run)
    resume(folder)
    assert {name: getattr(seen["config"], name) for name in ADDED_SETTINGS} == ADDED_SETTINGS
    assert TrainConfig().stop_on_targets  # today's default differs: the old job does not stop early
