"""Named, weighted reward components and user components (``reward_weights``, ``reward_fns``).

The reward is ``sum(weight[name] * value[name])`` over the built-in components (diversity,
repetition, forbidden) then the user components; ``info["reward_components"]`` holds the weighted
contributions. Expected rewards are worked out by hand; the batched environments must agree with
the scalar one to the last bit.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import warnings
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch

from textenv_gym import TextGenConfig, TextGenEnv, TextGenVectorEnv, TorchRewardModel
from textenv_gym.sb3_vec_env import TextGenVecEnv, make_textgen_vec_env

README = Path(__file__).resolve().parent.parent / "README.md"


def newest(tokens: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    return tokens[np.arange(len(lengths)), lengths - 1]


def newest_is_even(tokens, lengths):
    """A pure user component: 1.0 when the newest token id is even."""
    return (newest(tokens, lengths) % 2 == 0).astype(float)


def length_over_ten(tokens, lengths):
    return lengths / 10


class Recorder:
    """A user component that records its arguments and returns the lengths."""

    def __init__(self):
        self.calls = []

    def __call__(self, tokens, lengths):
        self.calls.append((tokens.copy(), lengths.copy()))
        return lengths.astype(float)


# --------------------------------------------------------------------------------------------
# The reward, by hand
# --------------------------------------------------------------------------------------------


def test_weights_scale_the_builtin_components_by_hand():
    env = TextGenEnv(vocab_size=5, reward_weights={"diversity": 2.0, "repetition": 3.0})
    env.reset()
    rewards = [env.step(1)[1] for _ in range(3)]
    # [1]: diversity 1; [1, 1]: 1/2; [1, 1, 1]: 1/3 and the repetition rule fires (-0.5)
    assert rewards == pytest.approx([2.0 * 1, 2.0 * 1 / 2, 2.0 * 1 / 3 + 3.0 * -0.5])


def test_forbidden_weight_and_zero_weight_by_hand():
    env = TextGenEnv(vocab_size=5, forbidden_tokens=[2], reward_weights={"forbidden": 0.5, "diversity": 0.0})
    env.reset()
    _, reward, _, _, info = env.step(2)
    assert reward == pytest.approx(0.5 * -1.0)
    assert info["reward_components"] == {"diversity": 0.0, "repetition": 0.0, "forbidden": -0.5}


def test_user_components_are_added_with_their_weights_by_hand():
    env = TextGenEnv(
        vocab_size=5, reward_fns={"even": newest_is_even, "length": length_over_ten}, reward_weights={"length": -2.0}
    )
    env.reset(options={"prompt": [1]})
    _, reward, _, _, info = env.step(4)  # [1, 4]: diversity 1, even 1, length 2 / 10 weighted -2
    assert info["reward_components"] == pytest.approx(
        {"diversity": 1.0, "repetition": 0.0, "forbidden": 0.0, "even": 1.0, "length": -0.4}
    )
    assert list(info["reward_components"]) == ["diversity", "repetition", "forbidden", "even", "length"]
    assert reward == pytest.approx(1.0 + 1.0 - 0.4)


def test_default_weights_give_the_default_reward_bit_for_bit():
    rng = np.random.default_rng(0)
    actions = rng.integers(0, 4, size=40)
    plain = TextGenEnv(vocab_size=4, max_length=40, forbidden_tokens=[3])
    ones = TextGenEnv(
        vocab_size=4,
        max_length=40,
        forbidden_tokens=[3],
        reward_weights={"diversity": 1.0, "repetition": 1, "forbidden": 1.0},
    )
    plain.reset(), ones.reset()
    for action in actions:
        a, b = plain.step(action), ones.step(action)
        assert a[1] == b[1] and a[4] == b[4]
    assert TextGenConfig(reward_weights={}, reward_fns={}) == TextGenConfig()


def test_components_sum_exactly_to_the_reward():
    env = TextGenEnv(
        vocab_size=3,
        max_length=30,
        forbidden_tokens=[0],
        repetition_penalty=-1 / 3,
        reward_fns={"even": newest_is_even, "length": length_over_ten},
        reward_weights={"diversity": 0.7, "forbidden": 1 / 3, "length": 0.1},
    )
    env.reset()
    for action in np.random.default_rng(1).integers(0, 3, size=30):
        _, reward, _, _, info = env.step(action)
        assert sum(info["reward_components"].values()) == reward  # exactly, not approximately


def test_a_user_component_gets_a_batch_of_padded_int64_copies_once_per_step():
    recorder = Recorder()
    envs = TextGenVectorEnv(3, vocab_size=6, max_length=3, reward_fns={"rec": recorder})
    envs.reset(options={"prompt": [5]})
    envs.step(np.array([0, 1, 2]))
    assert len(recorder.calls) == 1
    tokens, lengths = recorder.calls[0]
    assert tokens.dtype == np.int64 and tokens.shape == (3, 3) and lengths.dtype == np.int64
    assert tokens.tolist() == [[5, 0, 6], [5, 1, 6], [5, 2, 6]]  # padded with pad_id = vocab_size
    assert lengths.tolist() == [2, 2, 2]


def test_a_user_component_cannot_alter_the_sequences():
    def vandal(tokens, lengths):
        tokens[:] = 0
        lengths[:] = 99
        return np.zeros(len(lengths))

    env = TextGenEnv(vocab_size=6, max_length=3, reward_fns={"vandal": vandal})
    env.reset()
    obs, _, terminated, _, info = env.step(4)
    assert obs.tolist() == [4, 6, 6] and not terminated and info["length"] == 1


def test_no_call_when_every_environment_autoresets():
    recorder = Recorder()
    envs = TextGenVectorEnv(2, vocab_size=4, max_length=1, reward_fns={"rec": recorder})
    envs.reset()
    envs.step(np.array([0, 1]))  # both episodes end
    _, reward, _, _, info = envs.step(np.array([0, 1]))  # both autoreset: nothing is stepped
    assert len(recorder.calls) == 1 and reward.tolist() == [0.0, 0.0] and "reward_components" not in info


# --------------------------------------------------------------------------------------------
# The three environments pass user components through identically
# --------------------------------------------------------------------------------------------

KWARGS = dict(
    vocab_size=5,
    max_length=4,
    forbidden_tokens=[4],
    repetition_window=2,
    reward_fns={"even": newest_is_even, "length": length_over_ten},
    reward_weights={"even": 0.25, "repetition": 2.0},
)


def test_gymnasium_vector_env_equals_scalar_envs_with_user_components():
    num_envs = 3
    envs = gym.make_vec("TextGen-v0", num_envs=num_envs, vectorization_mode="vector_entry_point", **KWARGS)
    scalars = [gym.make("TextGen-v0", **KWARGS) for _ in range(num_envs)]
    envs.reset(seed=0)
    for env in scalars:
        env.reset(seed=0)
    autoreset = np.zeros(num_envs, dtype=bool)
    for actions in np.random.default_rng(2).integers(0, 5, size=(14, num_envs)):
        _, reward, terminated, _, info = envs.step(actions)
        for i, env in enumerate(scalars):
            if autoreset[i]:  # every environment autoresets together here: no reward_components at all
                env.reset()
                assert reward[i] == 0.0 and "reward_components" not in info
                continue
            _, r, term, _, single = env.step(actions[i])
            assert reward[i] == r and terminated[i] == term
            assert info["_reward_components"][i]
            for name, value in single["reward_components"].items():
                assert info["reward_components"][name][i] == value and info["reward_components"][f"_{name}"][i]
        autoreset = terminated


def test_sb3_vec_env_equals_scalar_envs_with_user_components():
    num_envs = 3
    venv = make_textgen_vec_env(num_envs, seed=0, **KWARGS)
    scalars = [TextGenEnv(**KWARGS) for _ in range(num_envs)]
    venv.reset()
    for env in scalars:
        env.reset()
    for actions in np.random.default_rng(3).integers(0, 5, size=(14, num_envs)):
        _, reward, done, infos = venv.step(actions)
        for i, env in enumerate(scalars):
            _, r, term, _, single = env.step(actions[i])
            assert reward[i] == np.float32(r) and done[i] == term
            assert infos[i]["reward_components"] == single["reward_components"]  # also in the terminal info
            if term:
                assert infos[i]["length"] == 4 and "terminal_observation" in infos[i]
                env.reset()


def test_sb3_vec_env_per_step_info_stays_empty_with_the_default_reward():
    venv = TextGenVecEnv(2, vocab_size=5, max_length=3)
    venv.reset()
    assert venv.step(np.array([0, 1]))[3] == [{}, {}]
    weighted = TextGenVecEnv(2, vocab_size=5, max_length=3, reward_weights={"diversity": 2.0})
    weighted.reset()
    assert [info["reward_components"]["diversity"] for info in weighted.step(np.array([0, 1]))[3]] == [2.0, 2.0]


def test_gymnasium_and_sb3_env_checkers_pass_with_user_components(capsys):
    from gymnasium.utils.env_checker import check_env
    from stable_baselines3.common.env_checker import check_env as sb3_check_env

    kwargs = dict(KWARGS, reward_fns={**KWARGS["reward_fns"], "model": TorchRewardModel(TokenScore(5))})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_env(gym.make("TextGen-v0", **kwargs).unwrapped)
        sb3_check_env(TextGenEnv(**kwargs))
    capsys.readouterr()  # check_env tries render_mode="human", which prints


# --------------------------------------------------------------------------------------------
# TorchRewardModel
# --------------------------------------------------------------------------------------------


class TokenScore(torch.nn.Module):
    """Score = sum of a per-token weight (token id / 10) over the sequence; records its mode."""

    def __init__(self, vocab_size: int, keepdim: bool = False) -> None:
        super().__init__()
        self.weights = torch.nn.Embedding(vocab_size + 1, 1)
        self.keepdim = keepdim
        self.seen = []
        with torch.no_grad():
            self.weights.weight.copy_(torch.arange(vocab_size + 1, dtype=torch.float32)[:, None] / 10)

    def forward(self, tokens, lengths):
        self.seen.append((self.training, torch.is_grad_enabled(), tokens.dtype, lengths.dtype))
        inside = torch.arange(tokens.shape[1]) < lengths[:, None]
        scores = (self.weights(tokens).squeeze(-1) * inside).sum(dim=1)
        return scores[:, None] if self.keepdim else scores


@pytest.mark.parametrize("keepdim", [False, True])
def test_torch_reward_model_matches_a_hand_computation(keepdim):
    module = TokenScore(6, keepdim=keepdim)
    module.train()
    model = TorchRewardModel(module)
    tokens = np.array([[1, 2, 6, 6], [5, 5, 3, 6], [0, 6, 6, 6]], dtype=np.int64)
    lengths = np.array([2, 3, 1], dtype=np.int64)
    scores = model(tokens, lengths)
    assert scores.dtype == np.float64 and scores.shape == (3,)
    assert scores == pytest.approx([0.1 + 0.2, 0.5 + 0.5 + 0.3, 0.0])
    assert module.seen == [(False, False, torch.int64, torch.int64)]  # eval mode, no_grad
    assert module.training  # its mode is restored


def test_torch_reward_model_in_an_environment_by_hand():
    env = gym.make(
        "TextGen-v0", vocab_size=6, reward_fns={"model": TorchRewardModel(TokenScore(6))}, reward_weights={"model": 2.0}
    )
    env.reset(options={"prompt": [3]})
    _, reward, _, _, info = env.step(4)  # [3, 4]: diversity 1, model score 0.3 + 0.4, weighted 2
    assert info["reward_components"]["model"] == pytest.approx(2.0 * 0.7)
    assert reward == pytest.approx(1.0 + 1.4)


def test_torch_reward_model_errors():
    class Wrong(torch.nn.Module):
        def __init__(self, output):
            super().__init__()
            self.output = output

        def forward(self, tokens, lengths):
            return self.output(tokens)

    tokens, lengths = np.zeros((4, 3), dtype=np.int64), np.ones(4, dtype=np.int64)
    with pytest.raises(
        ValueError, match=re.escape("TorchRewardModel(Wrong): the module returned shape (4, 2), expected (4,)")
    ):
        TorchRewardModel(Wrong(lambda t: torch.zeros(len(t), 2)))(tokens, lengths)
    with pytest.raises(ValueError, match=re.escape("the module returned shape (3,), expected (4,)")):
        TorchRewardModel(Wrong(lambda t: torch.zeros(3)))(tokens, lengths)
    with pytest.raises(ValueError, match="returned list, expected a tensor"):
        TorchRewardModel(Wrong(lambda t: [0.0] * 4))(tokens, lengths)
    with pytest.raises(ValueError, match="module: expected a torch.nn.Module"):
        TorchRewardModel(lambda t, n: n)
    with pytest.raises(ValueError, match="device: expected a torch device"):
        TorchRewardModel(TokenScore(3), device="nowhere")


def test_torch_is_not_imported_with_the_package():
    code = "import sys, textenv_gym; assert 'torch' not in sys.modules; print(textenv_gym.TorchRewardModel.__name__)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "TorchRewardModel", done.stderr


# --------------------------------------------------------------------------------------------
# Bad inputs
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            {"reward_weights": {"divrsity": 2.0}},
            "reward_weights: unknown components ['divrsity']; known components are ['diversity', 'repetition', "
            "'forbidden']",
        ),
        (
            {"reward_weights": {"topic": 2.0}, "reward_fns": {"even": newest_is_even}},
            "reward_weights: unknown components ['topic']; known components are ['diversity', 'repetition', "
            "'forbidden', 'even']",
        ),
        (
            {"reward_weights": {"diversity": float("nan")}},
            "reward_weights['diversity']: expected a finite number, got nan",
        ),
        (
            {"reward_weights": {"forbidden": float("inf")}},
            "reward_weights['forbidden']: expected a finite number, got inf",
        ),
        ({"reward_weights": {"diversity": "2"}}, "reward_weights['diversity']: expected a finite number, got '2'"),
        ({"reward_weights": [("diversity", 2.0)]}, "reward_weights: expected a mapping of component name -> weight"),
        ({"reward_fns": {"diversity": newest_is_even}}, "reward_fns['diversity']: clashes with a built-in component"),
        ({"reward_fns": {"topic": 0.25}}, "reward_fns['topic']: expected a callable fn(tokens, lengths)"),
        ({"reward_fns": {3: newest_is_even}}, "reward_fns: component names must be non-empty strings, got 3"),
        ({"reward_fns": [newest_is_even]}, "reward_fns: expected a mapping of component name -> callable"),
    ],
)
def test_bad_reward_arguments(kwargs, message):
    for build in (
        lambda: TextGenEnv(**kwargs),
        lambda: gym.make_vec("TextGen-v0", 2, "vector_entry_point", **kwargs),
        lambda: make_textgen_vec_env(2, **kwargs),
    ):
        with pytest.raises(ValueError, match=re.escape(message)):
            build()


@pytest.mark.parametrize(
    "fn, message",
    [
        (lambda tokens, lengths: np.zeros(3), "reward_fns['topic']: returned shape (3,), expected (4,)"),
        (lambda tokens, lengths: np.zeros((4, 1)), "reward_fns['topic']: returned shape (4, 1), expected (4,)"),
        (lambda tokens, lengths: 1.0, "reward_fns['topic']: returned shape (), expected (4,)"),
        (
            lambda tokens, lengths: np.array([0.0, np.nan, 1.0, np.inf]),
            "reward_fns['topic']: returned non-finite values [nan, inf], expected finite numbers",
        ),
        (
            lambda tokens, lengths: ["a"] * 4,
            "reward_fns['topic']: returned ['a', 'a', 'a', 'a'], expected numbers of shape (4,)",
        ),
    ],
)
def test_bad_user_component_outputs_name_the_component(fn, message):
    envs = TextGenVectorEnv(4, reward_fns={"topic": fn})
    envs.reset()
    with pytest.raises(ValueError, match=re.escape(message)):
        envs.step(np.zeros(4, dtype=np.int64))


def test_nan_from_the_scalar_env_names_the_component():
    env = gym.make("TextGen-v0", reward_fns={"judge": lambda tokens, lengths: np.full(len(lengths), np.nan)})
    env.reset()
    with pytest.raises(ValueError, match=re.escape("reward_fns['judge']: returned non-finite values [nan]")):
        env.step(0)


# --------------------------------------------------------------------------------------------
# as_kwargs and saving
# --------------------------------------------------------------------------------------------


def test_as_kwargs_round_trip_rebuilds_an_equal_reward():
    config = TextGenConfig(
        vocab_size=5, max_length=6, reward_fns={"even": newest_is_even}, reward_weights={"even": -0.5, "diversity": 3}
    )
    kwargs = config.as_kwargs()
    assert kwargs["reward_fns"] == {"even": newest_is_even} and kwargs["reward_weights"] == {
        "even": -0.5,
        "diversity": 3.0,
    }
    assert TextGenConfig(**kwargs) == config
    a, b = TextGenEnv(**config.as_kwargs()), TextGenEnv(**kwargs)
    a.reset(), b.reset()
    for action in [2, 2, 1, 4, 3, 2]:
        step_a, step_b = a.step(action), b.step(action)
        assert step_a[1] == step_b[1] and step_a[4] == step_b[4]


def test_default_as_kwargs_stay_json_serialisable():
    kwargs = TextGenConfig().as_kwargs()
    assert kwargs["reward_weights"] is None and kwargs["reward_fns"] is None
    assert TextGenConfig(**json.loads(json.dumps(kwargs))) == TextGenConfig()
    weighted = TextGenConfig(reward_weights={"diversity": 2.0}).as_kwargs()
    assert TextGenConfig(**json.loads(json.dumps(weighted))) == TextGenConfig(reward_weights={"diversity": 2.0})


def test_saved_model_keeps_its_user_components(tmp_path):
    from stable_baselines3 import PPO

    from verl_sb3.checkpoints import UntrustedCheckpointError, load_checkpoint, save_checkpoint
    from verl_sb3.generation import textgen_config

    config = TextGenConfig(
        vocab_size=5, max_length=3, reward_fns={"even": newest_is_even}, reward_weights={"even": 2.0}
    )
    model = PPO("MlpPolicy", make_textgen_vec_env(2, seed=0, **config.as_kwargs()), n_steps=4, batch_size=8)
    model.env_kwargs = config.as_kwargs()
    path = save_checkpoint(model, tmp_path / "model.zip")
    with pytest.raises(
        UntrustedCheckpointError, match="entry 'env_kwargs' needs test_reward_components.newest_is_even"
    ):
        load_checkpoint(path)  # the components are functions, saved by name: loading them needs trust
    assert textgen_config(load_checkpoint(path, trusted=True)) == config


# --------------------------------------------------------------------------------------------
# README
# --------------------------------------------------------------------------------------------


def test_readme_reward_components_snippet_runs(capsys):
    text = README.read_text()
    block = re.search(r"\*\*Your own reward components.*?```python\n(.*?)```", text, flags=re.S).group(1)
    exec(compile(block, "README.md", "exec"), {})
    assert capsys.readouterr().out == "2.5 {'diversity': 2.0, 'repetition': 0.0, 'forbidden': 0.0, 'river': 0.5}\n"
