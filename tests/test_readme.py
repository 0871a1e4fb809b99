"""The README's Python snippets run as written (in a temporary folder)."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch as th

from verl_sb3.checkpoints import UntrustedCheckpointError, load_checkpoint, save_checkpoint

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_the_two_command_quick_start():
    text = README.read_text()
    quick_start = text[text.index("## Quick start") : text.index("## The environment")]
    commands = re.findall(r"```bash\n(.*?)```", quick_start, flags=re.S)
    assert commands[:2] == [
        "pip install torch==2.13.0 && pip install -e . && python examples/train.py\n",
        'pip install torch==2.13.0 && pip install -e ".[test]" && python -m pytest\n',
    ]
    ci = (README.parent / ".ci" / "run").read_text().splitlines()
    install, test = commands[1].strip().rsplit(" && ", 1)
    assert install in ci and test in ci  # CI runs the README's test command (and lints in between)
    assert ci.index(install) < ci.index("ruff check . && ruff format --check .") < ci.index(test)


def block_with(marker: str) -> str:
    """The one README Python snippet that contains ``marker``."""
    matching = [block for block in python_blocks() if marker in block]
    assert len(matching) == 1, f"{len(matching)} README snippets contain {marker!r}"
    return matching[0]


def run(block: str) -> dict:
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    return namespace


def test_every_readme_snippet_is_run_by_a_test():
    markers = (
        "TextGen-v0",
        "no_token_dominates",
        "load_checkpoint(",
        "ref_kl_target=0.1",
        '"SLMTransformerPolicy"',
        "vocab_size=5000",
        "CriticWarmupCallback(5)",
        "max_reuse_rise=3.0",
        "EntropyDropJudge",
        "advantage_estimator=",
        '"HFCausalLMPolicy"',
        "export_dataset(",
        "ppo_config(",
        "fit_reward_model(",
    )
    for block in python_blocks():
        assert any(marker in block for marker in markers), f"a README snippet no test runs:\n{block}"


def test_readme_environment_snippets_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}  # the environment's snippets build on each other
    for block in python_blocks():
        if "TextGen-v0" in block:
            exec(compile(block, "README.md", "exec"), namespace)
    assert "start sequence to 1.0 {'length': 3, 'diversity': 1.0" in capsys.readouterr().out


def test_readme_verification_evaluation_and_generation_snippets_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    model = run(block_with("no_token_dominates"))["model"]
    assert len(model.verification_log) > 0 and "no_token_dominates" in model.verification_log[-1]["checks"]
    path = save_checkpoint(model, tmp_path / "results" / "model_checkpoints" / "final_model.zip")
    with pytest.raises(UntrustedCheckpointError, match="entry 'checks'"):  # its own check, a function
        load_checkpoint(path)
    model.checks = []
    save_checkpoint(model, path)
    capsys.readouterr()
    run(block_with("load_checkpoint("))  # evaluation and generation, on that checkpoint
    printed = capsys.readouterr().out
    assert "| Test case | Metric | Target | Actual | Result |" in printed
    assert printed.strip().splitlines()[-1].startswith("[")  # the generated texts


def test_readme_reference_kl_snippet_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    model = run(block_with("ref_kl_target=0.1"))["model"]
    assert model.ref_policy is not None and model.kl_ctrl.value != 0.05  # adapted
    assert "AdaptiveKLController" in capsys.readouterr().out


def test_readme_critic_warmup_snippet_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    log = run(block_with("CriticWarmupCallback(5)"))["model"].verification_log
    assert len(log) == 10
    assert all(entry["kl"] < 1e-6 for entry in log[:5]) and all(entry["kl"] > 1e-4 for entry in log[5:])


def test_readme_next_rollout_judgement_snippet_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    model = run(block_with("max_reuse_rise=3.0"))["judged"]
    rollouts = model.num_timesteps // (model.n_steps * model.n_envs)  # 10, or 11 when the last update was undone
    assert model.max_reuse_rise == 3.0 and len(model.verification_log) + model.n_undone == rollouts
    assert model.rollout_judgement.measured is not None  # every rollout was measured
    assert capsys.readouterr().out.startswith(f"{model.n_undone} {model.lr_scale}")


def test_readme_own_judge_snippet_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    model = run(block_with("EntropyDropJudge"))["own"]
    assert type(model.rollout_judgement.judge).__name__ == "EntropyDropJudge"
    assert model.rollout_judgement.measured is not None and 0.0 < model.rollout_judgement.measured[0] <= math.log(50)
    assert len(model.verification_log) + model.n_undone == model.num_timesteps // (model.n_steps * model.n_envs)
    assert capsys.readouterr().out.startswith(f"{model.n_undone} ")


def test_readme_transformer_and_large_vocabulary_snippet_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = run(block_with('"SLMTransformerPolicy"'))  # and the large vocabulary
    model = namespace["transformer"]
    assert type(model.policy).__name__ == "SLMTransformerPolicy" and len(model.verification_log) == 2
    assert namespace["large"].action_space.n == 5000
    assert len(namespace["lstm"].verification_log) == 1


if __name__ == "__main__":  # pragma: no cover
    pytest.main([__file__])


def test_readme_task_snippet_prints_what_it_says(capsys):
    run(block_with("group_size=2"))
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "city light -> sound"
    assert out[1].startswith("1.0 True {") and "'score': 1.0}" in out[1]
    assert out[2] == "[(0, 'river ocean'), (0, 'river ocean'), (1, 'city light'), (1, 'city light')]"


def test_readme_task_table_counts_the_prompts():
    from textenv_gym.tasks import task_kwargs

    text = README.read_text()
    row = next(line for line in text.splitlines() if line.startswith("| prompts (train / test) at the defaults"))
    counts = [
        f"{len(task_kwargs(env_id)['prompts'])} / {len(task_kwargs(env_id, split='test')['prompts'])}"
        for env_id in ("TextGen-Reverse-v0", "TextGen-Arithmetic-v0")
    ]
    assert row == f"| prompts (train / test) at the defaults | {counts[0]} | {counts[1]} |"


def test_readme_group_algorithms_snippet_runs(capsys):
    grpo = run(block_with("advantage_estimator="))["grpo"]
    assert (grpo.advantage_estimator, grpo.loss_agg_mode, grpo.filter_groups) == ("grpo", "seq-mean-token-mean", True)
    assert grpo.logger.name_to_value["train/ref_kl_loss"] >= 0 and grpo.verification_log
    groups, passed = capsys.readouterr().out.split()
    assert int(groups) >= 4 and passed == "True"


def test_readme_hugging_face_snippet_runs(tmp_path, monkeypatch, capsys):
    pytest.importorskip("transformers")
    monkeypatch.chdir(tmp_path)
    namespace = run(block_with('"HFCausalLMPolicy"'))
    model, loaded = namespace["model"], namespace["loaded"]
    assert namespace["warm"].loss_after < namespace["warm"].loss_before
    assert len(model.verification_log) == 4
    obs = th.as_tensor(model.get_env().reset())
    with th.no_grad():
        same = th.equal(model.policy.get_distribution(obs).distribution.logits,
                        loaded.policy.get_distribution(obs).distribution.logits)  # fmt: skip
    assert same and capsys.readouterr().out.startswith("answer loss ")


def test_readme_verl_export_snippet_runs(tmp_path, monkeypatch, capsys):
    pq = pytest.importorskip("pyarrow.parquet")
    monkeypatch.chdir(tmp_path)
    run(block_with("export_dataset("))
    assert capsys.readouterr().out.strip() == "1.0"
    rows = pq.read_table(tmp_path / "reverse_test.parquet").to_pylist()
    assert rows and rows[0]["reward_model"]["style"] == "rule" and rows[0]["prompt"][0]["role"] == "user"


def test_readme_rllib_snippet_runs(capsys):
    pytest.importorskip("ray.rllib")
    run(block_with("ppo_config("))
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    assert printed == str(
        ["verl/advantage_finite", "verl/entropy", "verl/finite_parameters", "verl/kl", "verl/rolled_back"]
    )


def test_readme_human_feedback_snippet_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    namespace = run(block_with("fit_reward_model("))
    history = namespace["curve"].history
    assert [row["timesteps"] for row in history] == [0, 1600, 3200]
    assert history[-1]["kl"] > 0.0
    assert namespace["fit"].best["held_out_accuracy"] > 0.6
    assert sorted(p.name for p in (tmp_path / "reward_model").iterdir()) == ["config.json", "model.safetensors"]
    assert "held-out accuracy" in capsys.readouterr().out
