"""The tasks exported to veRL's parquet layout, and its reward function (veRL 0.8.0.dev, commit b178a3c)."""

from __future__ import annotations

import importlib
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

import textenv_gym.verl
from textenv_gym.tasks import TASKS, task_kwargs
from textenv_gym.verl import compute_score, dataset_rows, export_dataset, trl_reward

pq = pytest.importorskip("pyarrow.parquet")
pa = pytest.importorskip("pyarrow")

#: The layout of veRL's examples/data_preprocess/gsm8k.py rows, which RLHFDataset and the reward managers read.
MESSAGES = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
REWARD_MODEL = pa.struct([("style", pa.string()), ("ground_truth", pa.string())])


@pytest.mark.parametrize("env_id", sorted(TASKS))
@pytest.mark.parametrize("split", ["train", "test"])
def test_a_task_exports_verls_layout_and_its_reference_answers_score_1(env_id, split, tmp_path):
    path = tmp_path / "data.parquet"
    n = export_dataset(env_id, path, split=split)
    table = pq.read_table(path)
    assert table.num_rows == n == len(task_kwargs(env_id, split=split)["prompts"])
    schema = table.schema
    assert schema.names == ["data_source", "prompt", "ability", "reward_model", "extra_info"]
    assert schema.field("data_source").type == pa.string() and schema.field("ability").type == pa.string()
    assert schema.field("prompt").type == MESSAGES and schema.field("reward_model").type == REWARD_MODEL
    assert {f.name for f in schema.field("extra_info").type} == {"split", "index"}
    rows = table.to_pylist()
    prompts = task_kwargs(env_id, split=split)["prompts"]
    for index, (row, record) in enumerate(zip(rows, prompts)):
        assert row["prompt"] == [{"role": "user", "content": record["prompt"]}]
        assert row["reward_model"] == {"style": "rule", "ground_truth": record["ground_truth"]}
        assert row["extra_info"] == {"split": split, "index": index}
        # as veRL's NaiveRewardManager calls it, with the decoded response
        kwargs = dict(data_source=row["data_source"], ground_truth=row["reward_model"]["ground_truth"], extra_info={})
        assert compute_score(solution_str=record["ground_truth"], **kwargs) == 1.0
        assert compute_score(solution_str=record["ground_truth"] + " 1", **kwargs) < 1.0


def test_compute_score_loads_as_verls_custom_reward_function():
    # custom_reward_function.path=pkg://textenv_gym.verl: verl.utils.import_utils.load_module imports it by name
    assert importlib.import_module("textenv_gym.verl").compute_score is compute_score
    # a file path: load_module runs the file as a module of its own
    spec = importlib.util.spec_from_file_location("custom_module_test", textenv_gym.verl.__file__)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.compute_score("textgen/reverse", "c b a", "c b a", {"num_turns": 1}) == 1.0


def test_a_users_prompt_list_exports_and_bad_input_is_named(tmp_path):
    records = [
        {"prompt": "a b =", "ground_truth": "b a", "data_source": "textgen/reverse", "extra_info": {"level": 1}},
        {"prompt": "b c =", "ground_truth": "c b", "data_source": "textgen/reverse", "extra_info": {"level": 2}},
    ]
    vocabulary = task_kwargs("TextGen-Reverse-v0")["vocabulary"]
    rows = dataset_rows("TextGen-v0", prompts=records, vocabulary=vocabulary, max_length=8)
    assert [row["extra_info"] for row in rows] == [{"split": "train", "index": 0, "level": 1},
                                                   {"split": "train", "index": 1, "level": 2}]  # fmt: skip
    assert export_dataset("TextGen-Reverse-v0", tmp_path / "two.parquet", n=2) == 2
    with pytest.raises(ValueError, match=r"prompts\[0\]: has no ground_truth"):
        dataset_rows("TextGen-v0", prompts=["a b ="], vocabulary=vocabulary, max_length=8)
    with pytest.raises(ValueError, match="prompts: nothing to export"):
        dataset_rows("TextGen-v0")
    with pytest.raises(ValueError, match="env_id: expected TextGen-v0 or one of the tasks"):
        dataset_rows("CartPole-v1")
    with pytest.raises(ValueError, match="n: expected None or an integer >= 1"):
        dataset_rows("TextGen-Reverse-v0", n=0)
    with pytest.raises(ValueError, match="data_source: expected one of"):
        compute_score("openai/gsm8k", "4", "4")


def test_trl_reward_scores_texts_and_chat_completions():
    reference = {"style": "rule", "ground_truth": "b a"}
    completions = ["b a", [{"role": "assistant", "content": "a b"}]]
    scores = trl_reward(completions, reward_model=[reference, reference], data_source=["textgen/reverse"] * 2)
    assert scores[0] == 1.0 and scores[1] < 1.0
    with pytest.raises(ValueError, match="needs the dataset's reward_model and data_source"):
        trl_reward(["b a"])


def test_without_pyarrow_the_export_names_the_extra(tmp_path):
    script = f"""
import sys
sys.modules["pyarrow"] = None
from textenv_gym.verl import export_dataset, dataset_rows
assert dataset_rows("TextGen-Reverse-v0", n=1)
try:
    export_dataset("TextGen-Reverse-v0", {str(Path(tmp_path) / "x.parquet")!r})
except ImportError as error:
    assert '"verl"' in str(error), error
    print("ok")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
