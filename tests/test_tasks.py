"""The registered tasks: TextGen-Reverse-v0 and TextGen-Arithmetic-v0."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env as gymnasium_check_env
from stable_baselines3.common.env_checker import check_env as sb3_check_env

import textenv_gym  # noqa: F401 (registers the tasks)
from textenv_gym.sb3_vec_env import make_textgen_vec_env
from textenv_gym.tasks import TASKS, task_kwargs
from textenv_gym.tasks import arithmetic as arithmetic_module
from textenv_gym.tasks import reverse as reverse_module

TASK_IDS = sorted(TASKS)


def records(env_id, **kwargs):
    return task_kwargs(env_id, **kwargs)["prompts"]


def answer_episode(env, record, answer):
    """Reward and info of the episode answering ``record`` with the words ``answer`` and the end token."""
    env.reset(options={"prompt": record})
    tokenizer = env.unwrapped.tokenizer
    total = 0.0
    for token in [*tokenizer.encode(answer), env.unwrapped.eos_id]:
        _, reward, terminated, truncated, info = env.step(token)
        total += reward
        if terminated:
            return total, info
    raise AssertionError("the episode did not end")


@pytest.mark.parametrize("env_id", TASK_IDS)
def test_the_checkers_pass(env_id):
    gymnasium_check_env(gym.make(env_id).unwrapped, skip_render_check=True)
    sb3_check_env(gym.make(env_id).unwrapped)


@pytest.mark.parametrize("env_id", TASK_IDS)
def test_the_splits_are_disjoint_seeded_and_cover_every_prompt(env_id):
    train, test = records(env_id), records(env_id, split="test")
    train_prompts, test_prompts = {r["prompt"] for r in train}, {r["prompt"] for r in test}
    assert not train_prompts & test_prompts and len(test) > 10
    assert 0.1 < len(test) / (len(train) + len(test)) < 0.3
    assert records(env_id, split="test") == test  # the same every time
    assert {r["prompt"] for r in records(env_id, split="test", seed=1)} != test_prompts
    assert len(train_prompts | test_prompts) == len(train) + len(test)


@pytest.mark.parametrize("env_id", TASK_IDS)
def test_the_ground_truth_and_the_end_token_score_exactly_one_and_a_wrong_answer_less(env_id):
    env = gym.make(env_id, split="test")
    for record in records(env_id, split="test")[:20]:
        reward, info = answer_episode(env, record, record["ground_truth"])
        assert reward == 1.0 and info["reward_components"]["score"] == 1.0
        wrong = " ".join(reversed(record["ground_truth"].split())) + " " + record["ground_truth"].split()[0]
        reward, _ = answer_episode(env, record, wrong)
        assert 0.0 <= reward < 1.0


def test_reverse_scores_its_partial_answers():
    score = reverse_module.compute_score
    assert score(None, "c b a", "c b a") == 1.0
    assert score(None, "c b x", "c b a") == pytest.approx(0.5 * 2 / 3)
    assert score(None, "c b a a", "c b a") == pytest.approx(0.5 * 3 / 4)  # too long: not exact
    assert score(None, "", "c b a") == 0.0
    env = gym.make("TextGen-Reverse-v0", length=2, n_symbols=3)
    assert env.unwrapped.tokenizer.vocabulary == ("a", "b", "c", "=", "<end>") and env.unwrapped.config.max_length == 6


def test_arithmetic_scores_how_close_a_number_is():
    score = arithmetic_module.compute_score
    assert score(None, "1 2", "1 2") == 1.0
    assert score(None, "1 3", "1 2") == pytest.approx(0.45)
    assert score(None, "9 9", "1 2") == 0.0
    assert score(None, "1 +", "1 2") == 0.0 and score(None, "", "1 2") == 0.0
    record = records("TextGen-Arithmetic-v0", n_terms=3, max_value=12)[0]
    terms = [int(t.replace(" ", "")) for t in record["prompt"][:-2].split("+")]
    assert " ".join(str(sum(terms))) == record["ground_truth"]


@pytest.mark.parametrize("env_id", TASK_IDS)
def test_all_env_forms_build_and_other_arguments_replace_the_tasks(env_id):
    vector = gym.make_vec(env_id, num_envs=4, vectorization_mode="vector_entry_point", group_size=2, split="test")
    _, info = vector.reset(seed=0)
    assert info["group"].tolist() == [0, 0, 1, 1] and info["prompt"][0] == info["prompt"][1]
    sb3 = make_textgen_vec_env(4, seed=0, **task_kwargs(env_id, split="test"))
    assert sb3.reset().shape == (4, sb3.observation_space.shape[0])
    weighted = gym.make(env_id, reward_weights={"score": 2.0}).unwrapped.config.reward_weights
    assert weighted == {"score": 2.0}


@pytest.mark.parametrize(
    "env_id, kwargs, match",
    [
        ("TextGen-Reverse-v0", {"split": "validation"}, r"split: expected one of \('train', 'test'\)"),
        ("TextGen-Reverse-v0", {"length": 0}, "length: expected an integer >= 1"),
        ("TextGen-Reverse-v0", {"n_symbols": 27}, "n_symbols: expected an integer <= 26"),
        ("TextGen-Reverse-v0", {"length": 9, "n_symbols": 26}, "more than 200,000"),
        ("TextGen-Arithmetic-v0", {"n_terms": 0}, "n_terms: expected an integer >= 1"),
        ("TextGen-Arithmetic-v0", {"max_value": 1.5}, "max_value: expected an integer >= 1"),
        ("TextGen-Reverse-v0", {"seed": "a"}, r"seed: expected an integer >= 0 \(it picks the train/test split\)"),
        ("TextGen-Reverse-v0", {"lenght": 4}, r"unknown arguments \['lenght'\]; the task's own are .*'length'"),
        ("TextGen-Arithmetic-v0", {"n_terms": 1, "max_value": 1, "split": "test"}, "split='test': no prompt falls"),
    ],
)
def test_bad_task_arguments_name_themselves(env_id, kwargs, match):
    with pytest.raises(ValueError, match=match):
        gym.make(env_id, **kwargs)


def test_an_unknown_task_is_named():
    with pytest.raises(ValueError, match="env_id: expected one of the tasks"):
        task_kwargs("TextGen-Sort-v0")


def test_a_random_policy_rarely_answers_exactly():
    env = gym.make("TextGen-Reverse-v0")
    env.reset(seed=0)
    env.action_space.seed(0)
    rewards = []
    for _ in range(200):
        env.reset()
        terminated, total = False, 0.0
        while not terminated:
            _, reward, terminated, _, _ = env.step(env.action_space.sample())
            total += reward
        rewards.append(total)
    assert np.mean(np.array(rewards) == 1.0) < 0.05 and 0.0 < np.mean(rewards) < 0.3
