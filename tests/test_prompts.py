"""Your own task: prompt sources, reference answers, compute_score, an end token, groups of samples per prompt."""

from __future__ import annotations

import math

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env as gymnasium_check_env
from stable_baselines3.common.env_checker import check_env as sb3_check_env

from textenv_gym import TextGenEnv, TextGenVectorEnv
from textenv_gym.sb3_vec_env import TextGenVecEnv, make_textgen_vec_env

VOCABULARY = ["a", "b", "c", "d", "=", "<end>"]
RECORDS = [
    {"prompt": "a b =", "ground_truth": "b a", "data_source": "reverse"},
    {"prompt": "c d =", "ground_truth": "d c", "data_source": "reverse"},
    {"prompt": "a c =", "ground_truth": "c a", "data_source": "reverse", "extra_info": {"split": "train"}},
    {"prompt": [3, 1, 4], "reward_model": {"ground_truth": "b d"}},  # veRL's nesting, token ids
]
TASK = dict(vocabulary=VOCABULARY, max_length=7, eos_token="<end>", prompts=RECORDS)


def exact_match(data_source, solution_str, ground_truth, extra_info=None):
    return {"score": float(solution_str == ground_truth), "answer": solution_str}


def ids(text):
    return [VOCABULARY.index(word) for word in text.split()]


# ------------------------------------------------------------------ prompts drawn per env and episode
def test_the_scalar_env_draws_a_prompt_per_episode_reproducibly():
    env = TextGenEnv(**TASK)
    drawn = [env.reset(seed=0)[1]] + [env.reset()[1] for _ in range(9)]
    assert {info["prompt_index"] for info in drawn} > {0}  # several prompts
    for info in drawn:
        record = RECORDS[info["prompt_index"]]
        assert env.reset(options={"prompt": record["prompt"]})[0].tolist()[: len(ids(info["prompt"]))]
        assert info["ground_truth"] == record.get("ground_truth", record.get("reward_model", {}).get("ground_truth"))
        assert info["data_source"] == record.get("data_source")
    again = TextGenEnv(**TASK)
    assert [again.reset(seed=0)[1]] + [again.reset()[1] for _ in range(9)] == drawn


def test_the_observation_starts_with_the_drawn_prompt():
    env = TextGenEnv(**TASK)
    obs, info = env.reset(seed=3)
    prompt = ids(info["prompt"])
    assert obs.tolist()[: len(prompt)] == prompt and info["length"] == len(prompt)
    assert env.tokenizer.decode(env.sequence) == info["prompt"]


@pytest.mark.parametrize("form", ["gymnasium", "sb3"])
def test_the_vector_forms_draw_per_environment_and_per_episode_from_the_seed(form):
    def episode_prompts(seed):
        if form == "gymnasium":
            env = TextGenVectorEnv(num_envs=3, max_length=4, vocabulary=VOCABULARY, prompts=RECORDS[:3])
            _, info = env.reset(seed=seed)
            seen = [list(info["prompt_index"])]
            for _ in range(6):  # a 3-token prompt and max_length 4: every other step autoresets
                _, _, _, _, info = env.step(np.zeros(3, dtype=np.int64))
                if "prompt_index" in info:
                    seen.append([i if m else None for i, m in zip(info["prompt_index"], info["_prompt_index"])])
            return seen
        env = TextGenVecEnv(3, seed=seed, max_length=4, vocabulary=VOCABULARY, prompts=RECORDS[:3])
        env.reset()
        seen = [[info["prompt_index"] for info in env.reset_infos]]
        for _ in range(3):
            env.step(np.zeros(3, dtype=np.int64))
            seen.append([info["prompt_index"] for info in env.reset_infos])
        return seen

    first = episode_prompts(0)
    assert first == episode_prompts(0)
    assert first != episode_prompts(1)
    flat = [index for row in first for index in row if index is not None]
    assert set(flat) == {0, 1, 2} and len(first) == 4


def test_a_callable_source_draws_with_the_envs_generator():
    def draw(rng):
        a, b = rng.choice(4, size=2, replace=False)
        return {"prompt": [int(a), int(b), 4], "ground_truth": f"{VOCABULARY[b]} {VOCABULARY[a]}"}

    env = TextGenEnv(**{**TASK, "prompts": draw})
    first = [env.reset(seed=5)[1]["ground_truth"] for _ in range(1)] + [
        env.reset()[1]["ground_truth"] for _ in range(5)
    ]
    again = TextGenEnv(**{**TASK, "prompts": draw})
    assert [again.reset(seed=5)[1]["ground_truth"]] + [again.reset()[1]["ground_truth"] for _ in range(5)] == first
    assert env.reset()[1]["prompt_index"] == -1  # a drawn record has no position


# ------------------------------------------------------------------ explicit prompts win
def test_an_explicit_prompt_wins_over_the_source_until_cleared():
    env = TextGenEnv(**TASK)
    obs, info = env.reset(seed=0, options={"prompt": {"prompt": "d d =", "ground_truth": "d d"}})
    assert info["prompt"] == "d d =" and info["ground_truth"] == "d d" and info["prompt_index"] == -1
    assert env.reset()[1]["prompt"] == "d d ="  # it stays
    assert env.reset(options={"prompt": None})[1]["prompt"] in {"a b =", "c d =", "a c =", "d b ="}


def test_per_environment_options_in_both_vector_forms():
    gym_env = TextGenVectorEnv(num_envs=2, **TASK)
    obs, info = gym_env.reset(seed=0, options={"prompt": ["a a =", [2]]})
    assert obs[:, :3].tolist() == [ids("a a ="), [2, 6, 6]] and list(info["prompt"]) == ["a a =", "c"]
    obs, _ = gym_env.reset(options={"prompt": "b ="})  # one prompt: every environment
    assert obs[:, :2].tolist() == [ids("b =")] * 2
    sb3_env = TextGenVecEnv(2, seed=0, **TASK)
    sb3_env.set_options([{"prompt": "a a ="}, {}])  # the second keeps drawing from the source
    obs = sb3_env.reset()
    assert obs[0, :3].tolist() == ids("a a =") and sb3_env.reset_infos[1]["prompt_index"] in range(4)
    with pytest.raises(ValueError, match=r"options\['prompt'\]: 3 prompts for 2 environments"):
        gym_env.reset(options={"prompt": ["a", "b", "c"]})


# ------------------------------------------------------------------ groups
@pytest.mark.parametrize("form", ["gymnasium", "sb3"])
def test_groups_answer_the_same_prompts_in_order_at_their_own_pace(form):
    kwargs = dict(vocabulary=VOCABULARY, max_length=8, eos_token="<end>", prompts=RECORDS[:3])
    end = VOCABULARY.index("<end>")
    # environment 0 ends each episode at once, 1 after three tokens, 2 and 3 after two and five
    pace = np.array([1, 3, 2, 5])
    starts: dict[int, list] = {i: [] for i in range(4)}
    counters = np.zeros(4, dtype=np.int64)
    if form == "gymnasium":
        env = TextGenVectorEnv(num_envs=4, group_size=2, **kwargs)
        _, info = env.reset(seed=0)
    else:
        env = TextGenVecEnv(4, seed=0, group_size=2, **kwargs)
        env.reset()
        info = None

    def record(info_or_infos, rows):
        for i in rows:
            if form == "gymnasium":
                starts[i].append((int(info_or_infos["group"][i]), int(info_or_infos["group_episode"][i]),
                                  int(info_or_infos["prompt_index"][i])))  # fmt: skip
            else:
                r = env.reset_infos[i]
                starts[i].append((r["group"], r["group_episode"], r["prompt_index"]))

    record(info, range(4))
    for _ in range(40):
        counters += 1
        actions = np.where(counters >= pace, end, 0)
        if form == "gymnasium":
            _, _, terminated, _, info = env.step(actions)
            if "group" in info:
                record(info, np.flatnonzero(info["_group"]))
            counters[terminated] = -1  # the next step only resets it
        else:
            _, _, done, infos = env.step(actions)
            record(None, np.flatnonzero(done))
            for i in np.flatnonzero(done):
                assert infos[i]["group"] == i // 2 and infos[i]["group_episode"] == starts[i][-2][1]
            counters[done] = 0
    for group in (0, 1):
        a, b = starts[2 * group], starts[2 * group + 1]
        assert len(a) > len(b) > 3  # different paces
        assert a[: len(b)] == b  # same prompts, same order
        assert [episode for _, episode, _ in a] == list(range(len(a)))
        assert {g for g, _, _ in a} == {group}
    assert starts[0] != starts[2]  # the groups draw their own prompts


def test_a_group_size_that_does_not_divide_num_envs_is_refused():
    with pytest.raises(ValueError, match=r"group_size: num_envs \(5\) must be a multiple of group_size \(2\)"):
        TextGenVectorEnv(num_envs=5, group_size=2, **TASK)
    with pytest.raises(ValueError, match="group_size"):
        make_textgen_vec_env(6, group_size=4, **TASK)
    with pytest.raises(ValueError, match="group_size: expected an integer >= 1"):
        TextGenVecEnv(4, group_size=0, **TASK)


# ------------------------------------------------------------------ compute_score and the end token
def test_compute_score_gets_the_decoded_answer_and_the_reference():
    calls = []

    def scorer(data_source, solution_str, ground_truth, extra_info=None):
        calls.append((data_source, solution_str, ground_truth, extra_info))
        return exact_match(data_source, solution_str, ground_truth, extra_info)

    env = TextGenEnv(**TASK, compute_score=scorer, reward_weights={"diversity": 0.0, "repetition": 0.0})
    env.reset(options={"prompt": RECORDS[2]})
    for word in ["c", "a"]:
        _, reward, terminated, _, info = env.step(VOCABULARY.index(word))
        assert not terminated and reward == 0.0 and info["reward_components"]["score"] == 0.0
    _, reward, terminated, _, info = env.step(VOCABULARY.index("<end>"))
    assert terminated and calls == [("reverse", "c a", "c a", {"split": "train"})]  # prompt and end token left out
    assert reward == info["reward_components"]["score"] == 1.0
    assert info["score_details"] == {"answer": "c a"}
    env.reset()
    env.step(0), env.step(VOCABULARY.index("<end>"))
    assert calls[-1][1] == "a" and calls[-1][2] != "a"


def test_compute_score_is_called_with_keywords_as_verl_calls_it():
    def reordered(solution_str, ground_truth, data_source=None, *, extra_info=None):
        return float(solution_str == ground_truth)

    env = TextGenEnv(**TASK, compute_score=reordered, reward_weights={"diversity": 0.0, "repetition": 0.0})
    env.reset(options={"prompt": RECORDS[0]})
    env.step(VOCABULARY.index("b")), env.step(VOCABULARY.index("a"))
    assert env.step(VOCABULARY.index("<end>"))[1] == 1.0


def test_verl_records_load_and_chat_messages_are_refused_with_a_reason():
    row = {"prompt": "a b =", "data_source": "d", "ability": "reverse", "reward_model": {"style": "rule",
           "ground_truth": "b a"}, "extra_info": {"index": 0}}  # fmt: skip
    _, info = TextGenEnv(**{**TASK, "prompts": [row]}).reset(seed=0)
    assert info["ground_truth"] == "b a" and info["data_source"] == "d"
    with pytest.raises(ValueError, match=r"prompts\[0\]: chat messages .* are not supported"):
        TextGenEnv(**{**TASK, "prompts": [{**row, "prompt": [{"role": "user", "content": "a b ="}]}]})
    with pytest.raises(ValueError, match="prompts\\[0\\]: prompt: expected integer token ids"):
        TextGenEnv(**{**TASK, "prompts": [[1.0, 2.0]]})  # not silently cast


def test_the_score_is_weighted_like_any_component_and_added_to_the_default_reward():
    env = TextGenEnv(**TASK, compute_score=lambda **scored: 0.75, reward_weights={"score": 2.0})
    env.reset(options={"prompt": "a b ="})
    _, reward, terminated, _, info = env.step(VOCABULARY.index("<end>"))
    components = info["reward_components"]
    assert terminated and components["score"] == 1.5 and reward == pytest.approx(sum(components.values()))
    assert components["diversity"] == 1.0  # a b = <end>: four distinct tokens


def test_an_episode_also_ends_at_max_length_and_is_scored_there():
    env = TextGenEnv(**TASK, compute_score=exact_match)
    env.reset(options={"prompt": "a b ="})
    for _ in range(3):
        _, _, terminated, _, _ = env.step(0)
        assert not terminated
    _, _, terminated, _, info = env.step(1)  # the seventh token
    assert terminated and info["score_details"] == {"answer": "a a a b"}


@pytest.mark.parametrize("form", ["gymnasium", "sb3"])
def test_the_vector_forms_report_the_score(form):
    kwargs = dict(TASK, compute_score=exact_match, reward_weights={"diversity": 0.0, "repetition": 0.0})
    answer = [VOCABULARY.index(w) for w in ["b", "a", "<end>"]]
    if form == "gymnasium":
        env = TextGenVectorEnv(num_envs=2, **kwargs)
        env.reset(options={"prompt": [RECORDS[0], RECORDS[1]]})
        for action in answer:
            _, reward, terminated, _, info = env.step(np.array([action, action]))
        assert terminated.all() and reward.tolist() == [1.0, 0.0]
        assert info["reward_components"]["score"].tolist() == [1.0, 0.0]
        assert info["score_details"]["answer"].tolist() == ["b a", "b a"]
    else:
        env = TextGenVecEnv(2, **kwargs)
        env.set_options([{"prompt": RECORDS[0]}, {"prompt": RECORDS[1]}])
        env.reset()
        for action in answer:
            _, reward, done, infos = env.step(np.array([action, action]))
        assert done.all() and reward.tolist() == [1.0, 0.0]
        assert [i["reward_components"]["score"] for i in infos] == [1.0, 0.0]
        assert [i["score_details"] for i in infos] == [{"answer": "b a"}] * 2


def test_the_end_token_is_known_by_its_id():
    assert TextGenEnv(**TASK).unwrapped.eos_id == 5 == TextGenEnv(**{**TASK, "eos_token": 5}).eos_id
    assert TextGenEnv().eos_id is None


# ------------------------------------------------------------------ the checkers
def test_gymnasiums_and_sb3s_checkers_pass():
    env = TextGenEnv(**TASK, compute_score=exact_match)
    gymnasium_check_env(env, skip_render_check=True)
    sb3_check_env(TextGenEnv(**TASK, compute_score=exact_match))
    gym.make("TextGen-v0", **TASK, compute_score=exact_match).reset(seed=0)


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"prompts": []}, "prompts: the list is empty"),
        ({"prompts": "a b"}, "prompts: expected a list of prompts or records"),
        ({"prompts": {"prompt": "a"}}, "prompts: expected a list"),
        ({"prompts": ["a", {"ground_truth": "a"}]}, r"prompts\[1\]: a record needs a 'prompt'"),
        ({"prompts": [{"prompt": "a", "answer": "b"}]}, r"prompts\[0\]: unknown keys \['answer'\]"),
        ({"prompts": ["a", "zebra"]}, r"prompts\[1\]: text: unknown words \['zebra'\]"),
        ({"prompts": [[0, 9]]}, r"prompts\[0\]: prompt: token ids must lie in \[0, 5\]"),
        ({"prompts": ["a b c d a b c"]}, r"prompts\[0\]: prompt: has 7 tokens but at most max_length - 1 = 6"),
        ({"prompts": [None]}, r"prompts\[0\]: expected a prompt"),
        ({"prompts": [{"prompt": "a", "data_source": 3}]}, r"prompts\[0\]\['data_source'\]: expected a str"),
        ({"prompts": [{"prompt": "a", "extra_info": 3}]}, r"prompts\[0\]\['extra_info'\]: expected a mapping"),
        ({"eos_token": "stop"}, r"eos_token: expected one word of the vocabulary"),
        ({"eos_token": 6}, r"eos_token: expected an integer <= 5"),
        ({"eos_token": "a b"}, r"eos_token: expected one word"),
        ({"compute_score": "exact"}, r"compute_score: expected a callable"),
        ({"compute_score": exact_match, "reward_fns": {"score": lambda t, n: n}}, r"reward_fns\['score'\]: clashes"),
    ],
)
def test_bad_task_arguments_name_themselves(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TextGenEnv(**{**TASK, **kwargs})


@pytest.mark.parametrize(
    "scorer, match",
    [
        (lambda **scored: 1 / 0, r"compute_score \(.*<lambda>\): raised ZeroDivisionError"),
        (lambda **scored: math.nan, r"compute_score \(.*\): returned the non-finite score nan for 'a'"),
        (lambda **scored: "1.0", r"compute_score \(.*\): returned '1.0', expected a number"),
        (lambda **scored: {"acc": 1.0}, r"compute_score \(.*\): returned a dict without 'score'"),
    ],
)
def test_a_failing_compute_score_names_itself_and_leaves_the_episode_as_it_was(scorer, match):
    env = TextGenEnv(**TASK, compute_score=scorer)
    env.reset(options={"prompt": "a b ="})
    env.step(0)
    with pytest.raises(ValueError, match=match):
        env.step(VOCABULARY.index("<end>"))
    assert env.tokenizer.decode(env.sequence) == "a b = a"  # the step did not happen


def test_a_failing_callable_source_names_itself():
    def broken(rng):
        raise KeyError("dataset")

    with pytest.raises(ValueError, match=r"prompts \(broken\): raised KeyError"):
        TextGenEnv(**{**TASK, "prompts": broken}).reset(seed=0)
    with pytest.raises(ValueError, match=r"prompts \(<lambda>\): text: unknown words"):
        TextGenEnv(**{**TASK, "prompts": lambda rng: "zebra"}).reset(seed=0)


@pytest.mark.parametrize("form", ["gymnasium", "sb3"])
def test_a_prompt_that_cannot_be_drawn_at_an_autoreset_undoes_the_whole_step(form):
    calls = {"n": 0, "fail": False}

    def flaky(rng):
        calls["n"] += 1
        if calls["fail"]:
            raise ConnectionError("dataset offline")
        return RECORDS[int(rng.integers(3))]

    kwargs = dict(vocabulary=VOCABULARY, max_length=5, prompts=flaky)
    if form == "gymnasium":
        env = TextGenVectorEnv(num_envs=4, group_size=2, **kwargs)
        env.reset(seed=0)
        env.step(np.zeros(4, dtype=np.int64))
        env.step(np.zeros(4, dtype=np.int64))  # the 3-token prompts and max_length 5: the episodes end
    else:
        env = TextGenVecEnv(4, seed=0, group_size=2, **kwargs)
        env.reset()
        env.step(np.zeros(4, dtype=np.int64))  # the next step ends the episodes and autoresets
    before = env.sequences.tokens.copy(), env.sequences.lengths.copy(), env.starter.episode.copy()
    rng_state = (env.np_random if form == "gymnasium" else env._rng).bit_generator.state
    calls["fail"] = True
    with pytest.raises(ValueError, match=r"prompts \(flaky\): raised ConnectionError"):
        env.step(np.ones(4, dtype=np.int64))
    assert np.array_equal(env.sequences.tokens, before[0]) and np.array_equal(env.sequences.lengths, before[1])
    assert np.array_equal(env.starter.episode, before[2])
    assert (env.np_random if form == "gymnasium" else env._rng).bit_generator.state == rng_state
    calls["fail"] = False
    env.step(np.ones(4, dtype=np.int64))  # the same step again, now that the source works
    episodes = env.starter.episode
    assert list(episodes) == [1, 1, 1, 1] and list(env.sequences.lengths) == [3, 3, 3, 3]
    for row in range(4):  # the groups still answer the same prompts
        assert env.sequences.records[row] is env.sequences.records[row - row % 2]


def test_sb3_set_options_are_checked_when_given():
    env = TextGenVecEnv(4, seed=0, **TASK)
    with pytest.raises(ValueError, match=r"set_options\[1\]\['prompt'\]: .*unknown words"):
        env.set_options([{}, {"prompt": "zebra"}, {}, {}])
    with pytest.raises(ValueError, match="set_options: 3 options for 4 environments"):
        env.set_options([{"prompt": "a b ="}] * 3)
    env.reset()  # the refused options were not kept
    env.set_options({"prompt": "c d ="})
    env.reset()
    assert {info["prompt"] for info in env.reset_infos} == {"c d ="}
