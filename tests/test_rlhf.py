"""Human feedback (verl_sb3.rlhf): the preference format, labelling, the Bradley-Terry reward model, RL against it."""

from __future__ import annotations

import io
import json
import math
import pickle
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch as th
from safetensors.torch import save_file
from stable_baselines3.common.logger import configure

import textenv_gym  # noqa: F401  (registers TextGen-v0)
from textenv_gym import DEFAULT_VOCABULARY, TorchRewardModel
from textenv_gym.dynamics import TextGenConfig
from textenv_gym.sb3_vec_env import make_textgen_vec_env
from textenv_gym.vector import TextGenVectorEnv
from verl_sb3 import VerifiedRecurrentPPO
from verl_sb3.app.cli import main
from verl_sb3.checkpoints import save_checkpoint
from verl_sb3.rlhf import (
    GoldScoreCallback,
    Preference,
    SequenceRewardModel,
    TerminalLabeller,
    append_preferences,
    bradley_terry_loss,
    environment_return,
    environment_settings,
    fit_reward_model,
    label_pairs,
    load_reward_model,
    measure_gold_and_proxy,
    plot_overoptimisation,
    preference_accuracy,
    read_preferences,
    read_reward_model,
    sample_pairs,
    save_reward_model,
)

ROOT = Path(__file__).resolve().parents[1]
CONFIG = TextGenConfig()
NATURE = {"river", "mountain", "forest", "ocean"}


def nature_count(prompt: str, completion: str) -> float:
    return float(len(NATURE & set(completion.split())))


def prefers_nature(prompt: str, a: str, b: str) -> str:
    gold_a, gold_b = nature_count(prompt, a), nature_count(prompt, b)
    return "a" if gold_a > gold_b else "b" if gold_b > gold_a else "tie"


def random_preferences(n: int, seed: int = 0, length: int = 12) -> list[Preference]:
    """Pairs of random word sequences labelled by the hidden nature-word rule."""
    rng = np.random.default_rng(seed)
    words = np.array(DEFAULT_VOCABULARY)
    preferences = []
    for _ in range(n):
        a, b = (" ".join(rng.choice(words, size=length)) for _ in range(2))
        preferences.append(Preference("", a, b, prefers_nature("", a, b)))
    return preferences


@pytest.fixture(scope="module")
def model():
    model = VerifiedRecurrentPPO("SLMLstmPolicy", make_textgen_vec_env(4, seed=0), n_steps=20, batch_size=40, seed=0)
    model.env_kwargs = CONFIG.as_kwargs()
    return model


@pytest.fixture(scope="module")
def checkpoint(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("rlhf") / "initial.zip"
    save_checkpoint(model, path)
    return path


@pytest.fixture(scope="module")
def fitted():
    return fit_reward_model(random_preferences(500), CONFIG, SequenceRewardModel(50, 32, 64), seed=0)


# ---------------------------------------------------------------------- the JSONL format
def test_preferences_round_trip(tmp_path):
    path = tmp_path / "prefs.jsonl"
    written = [
        Preference("the", "river ocean", "start start", "a", "alice", 0),
        Preference("", "a b", "c", "tie"),
        Preference("quick", "dark", "light", "b", None, 7),
    ]
    append_preferences(path, written[:2])
    append_preferences(path, written[2:])
    assert read_preferences(path) == written
    lines = path.read_text().splitlines()
    assert json.loads(lines[1]) == {"prompt": "", "a": "a b", "b": "c", "choice": "tie"}
    assert [Preference.from_dict(json.loads(line)) for line in lines] == written


def test_preferences_read_trl_form_and_blank_lines(tmp_path):
    path = tmp_path / "trl.jsonl"
    path.write_text('{"prompt": "p", "chosen": "good", "rejected": "bad"}\n\n')
    assert read_preferences(path) == [Preference("p", "good", "bad", "a")]
    assert read_preferences(path)[0].target == 1.0


@pytest.mark.parametrize(
    "line, message",
    [
        ("not json", "line 2: not JSON"),
        ('{"prompt": "", "a": "x", "b": "y"}', r"line 2: missing field\(s\) \['choice'\]"),
        ('{"prompt": "", "a": "x", "choice": "a"}', r"line 2: missing field\(s\) \['b'\]"),
        ('{"prompt": "", "a": "x", "b": "y", "choice": "c"}', "line 2: choice 'c' names neither completion"),
        ('{"prompt": "", "a": "x", "b": "y", "choice": "a", "choise": 1}', r"line 2: unknown field\(s\) \['choise'\]"),
        ('["a", "b"]', "line 2: expected a JSON object, got list"),
        ('{"prompt": 3, "a": "x", "b": "y", "choice": "a"}', "line 2: prompt: expected a string"),
        ('{"prompt": "", "a": "x", "b": "y", "choice": "a", "pair": -1}', "line 2: pair: expected an integer >= 0"),
        ('{"prompt": "", "chosen": "x"}', r"line 2: missing field\(s\) \['rejected'\]"),
    ],
)
def test_preferences_errors_name_the_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "", "a": "x", "b": "y", "choice": "a"}\n' + line + "\n")
    with pytest.raises(ValueError, match=message):
        read_preferences(path)


def test_append_refuses_a_cut_line_and_keeps_the_file(tmp_path):
    path = tmp_path / "cut.jsonl"
    path.write_text('{"prompt": "", "a": "x", "b": "y", "choice": "a"}\n{"prompt": "", "a"')
    before = path.read_bytes()
    with pytest.raises(ValueError, match="last line is incomplete"):
        append_preferences(path, [Preference("", "x", "y", "b")])
    assert path.read_bytes() == before
    with pytest.raises(ValueError, match="no such preference file"):
        read_preferences(tmp_path / "missing.jsonl")


# ---------------------------------------------------------------------- labelling
def test_sample_pairs_are_reproducible_and_independent_of_the_count(model):
    first = sample_pairs(model, 5, seed=3)
    assert sample_pairs(model, 2, seed=3, start=3) == first[3:]
    assert [pair.index for pair in first] == list(range(5))
    assert all(pair.prompt == "" and pair.a and pair.b for pair in first)
    assert sample_pairs(model, 5, seed=4) != first
    prompted = sample_pairs(model, 2, prompts=["the river"], seed=0)
    assert all(pair.prompt == "the river" for pair in prompted)
    with pytest.raises(ValueError, match="num_pairs"):
        sample_pairs(model, 0)
    with pytest.raises(ValueError, match="temperature"):
        sample_pairs(model, 1, temperature=0)


def test_label_pairs_records_skips_quits_and_resumes(model, tmp_path):
    pairs = sample_pairs(model, 6, seed=0)
    path = tmp_path / "prefs.jsonl"
    answers = iter(["a", "skip", "tie", "quit"])
    asked = []

    def scripted(prompt, a, b):
        asked.append((a, b))
        return next(answers)

    session = label_pairs(pairs, scripted, path, labeller="script")
    assert session.quit and session.skipped == [1] and len(asked) == 4
    assert [(p.pair, p.choice, p.labeller) for p in read_preferences(path)] == [
        (0, "a", "script"),
        (2, "tie", "script"),
    ]
    asked.clear()
    answers = iter(["b", "b", "b", "b"])
    resumed = label_pairs(pairs, scripted, path)
    assert resumed.already_labelled == 2 and not resumed.quit
    assert asked == [(pair.a, pair.b) for pair in pairs if pair.index in (1, 3, 4, 5)]  # the skipped one again
    assert [p.pair for p in read_preferences(path)] == [0, 2, 1, 3, 4, 5]
    with pytest.raises(ValueError, match="pair 0 was labelled on other completions"):
        label_pairs(sample_pairs(model, 1, seed=99), scripted, path)
    with pytest.raises(ValueError, match="label_fn: returned 'left'"):
        label_pairs(sample_pairs(model, 1, seed=5), lambda *_: "left")


def test_terminal_labeller_reads_keys():
    typed = io.StringIO("x\nL\n r \nt\ns\nq\n")
    shown = io.StringIO()
    labeller = TerminalLabeller(typed, shown, total=6)
    assert [labeller("p", "one", "two") for _ in range(5)] == ["a", "b", "tie", "skip", "quit"]
    assert labeller("p", "one", "two") == "quit"  # the end of the input
    text = shown.getvalue()
    assert "pair 1 of 6" in text and "left : one" in text and "right: two" in text
    assert "unknown key 'x'" in text


def test_label_command_through_stdin(checkpoint, tmp_path, monkeypatch, capsys):
    output = tmp_path / "prefs.jsonl"
    argv = ["label", str(checkpoint), "--output", str(output), "--pairs", "4", "--labeller", "me"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("l\nwhat\ns\nr\nq\n"))
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "unknown key 'what'" in printed and "run the same command again" in printed
    assert [(p.pair, p.choice, p.labeller) for p in read_preferences(output)] == [(0, "a", "me"), (2, "b", "me")]
    monkeypatch.setattr(sys, "stdin", io.StringIO("t\nt\n"))  # resumes: pair 1 (skipped), then pair 3
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "pair 1 of 2 left" in printed and "4 of the session's 4 pairs labelled" in printed
    assert [(p.pair, p.choice) for p in read_preferences(output)] == [(0, "a"), (2, "b"), (1, "tie"), (3, "tie")]
    pairs = sample_pairs(load_model(checkpoint), 4, seed=0)
    assert [(p.a, p.b) for p in read_preferences(output)] == [(pairs[i].a, pairs[i].b) for i in (0, 2, 1, 3)]


def load_model(path):
    from verl_sb3.checkpoints import load_checkpoint

    return load_checkpoint(path)


def test_label_command_in_a_real_terminal_pipe(checkpoint, tmp_path):
    output = tmp_path / "piped.jsonl"
    command = [sys.executable, "-m", "verl_sb3", "label", str(checkpoint), "--output", str(output), "--pairs", "3"]
    done = subprocess.run(command, input="r\nq\n", capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert [p.choice for p in read_preferences(output)] == ["b"]
    output.write_text("not json\n")
    refused = subprocess.run(command, input="", capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert refused.returncode == 2 and "line 1: not JSON" in refused.stderr


# ---------------------------------------------------------------------- Bradley-Terry
def test_bradley_terry_loss_by_hand():
    reward_a = th.tensor([1.0, 0.0, 2.0, -0.5])
    reward_b = th.tensor([0.0, 1.0, 2.0, 1.5])
    target = th.tensor([1.0, 1.0, 0.5, 0.0])
    sigmoid = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    by_hand = [
        -math.log(sigmoid(1.0)),  # a preferred, r_a - r_b = 1
        -math.log(sigmoid(-1.0)),  # a preferred, r_a - r_b = -1
        -(0.5 * math.log(sigmoid(0.0)) + 0.5 * math.log(1 - sigmoid(0.0))),  # a tie: log 2
        -math.log(1 - sigmoid(-2.0)),  # b preferred, r_a - r_b = -2
    ]
    assert float(bradley_terry_loss(reward_a, reward_b, target)) == pytest.approx(sum(by_hand) / 4, rel=1e-6)
    assert by_hand[2] == pytest.approx(math.log(2))
    assert preference_accuracy(reward_a, reward_b, target) == pytest.approx(2 / 3)  # ties left out
    assert preference_accuracy(th.tensor([1.0]), th.tensor([1.0]), th.tensor([1.0])) == 0.5
    assert math.isnan(preference_accuracy(reward_a[2:3], reward_b[2:3], target[2:3]))


def test_reward_model_learns_a_hidden_preference(fitted):
    summary = fitted.summary()
    assert summary["n_held_out"] == 100 and summary["n_train"] == 400
    assert summary["held_out_accuracy"] > 0.85, summary
    assert 1 <= fitted.best_epoch <= len(fitted.history)
    assert fitted.best["held_out_loss"] == min(row["held_out_loss"] for row in fitted.history)  # the best kept
    fresh = random_preferences(200, seed=7)
    tokens = [CONFIG.tokenizer.encode(p.a) for p in fresh]
    scores = fitted.module(th.tensor(tokens), th.full((200,), 12)).detach()
    gold = th.tensor([nature_count("", p.a) for p in fresh])
    assert np.corrcoef(scores.numpy(), gold.numpy())[0, 1] > 0.8  # it scores by the nature words


def test_fit_stops_early_and_checks_its_arguments():
    fit = fit_reward_model(
        random_preferences(60, seed=1), CONFIG, SequenceRewardModel(50, 8, 8), patience=2, epochs=200
    )
    assert len(fit.history) < 200 and len(fit.history) - fit.best_epoch <= 2
    with pytest.raises(ValueError, match="need at least 2 labelled pairs"):
        fit_reward_model(random_preferences(1), CONFIG)
    with pytest.raises(ValueError, match="held_out_share"):
        fit_reward_model(random_preferences(4), CONFIG, held_out_share=1.0)
    with pytest.raises(ValueError, match=r"preferences\[1\]: text: unknown words \['zebra'\]"):
        fit_reward_model([*random_preferences(1), Preference("", "zebra", "river", "b")], CONFIG)
    with pytest.raises(ValueError, match=r"preferences\[0\]: a has 21 tokens"):
        fit_reward_model([Preference("", " ".join(["river"] * 21), "a", "a")] * 2, CONFIG)


# ---------------------------------------------------------------------- saving and loading
def test_save_and_load_without_pickle(fitted, tmp_path, monkeypatch):
    folder = save_reward_model(fitted.module, tmp_path / "rm", environment_settings(CONFIG), fitted.summary())
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]

    def no_pickle(*args, **kwargs):
        raise AssertionError("pickle used")

    monkeypatch.setattr(pickle, "loads", no_pickle)
    monkeypatch.setattr(pickle, "load", no_pickle)
    monkeypatch.setattr(th, "load", no_pickle)
    component = load_reward_model(folder)
    assert isinstance(component, TorchRewardModel) and component.at_end
    tokens = th.randint(0, 50, (6, 20))
    lengths = th.tensor([20, 20, 5, 1, 0, 20])
    with th.no_grad():
        expected = fitted.module(tokens, lengths).double().numpy()
    assert np.array_equal(component.scores(tokens.numpy(), lengths.numpy()), expected)
    config = json.loads((folder / "config.json").read_text())
    assert config["environment"]["vocabulary"] == list(DEFAULT_VOCABULARY)
    assert config["fit"]["held_out_accuracy"] == fitted.summary()["held_out_accuracy"]


def test_saving_keeps_what_is_there(fitted, tmp_path):
    environment = environment_settings(CONFIG)
    folder = save_reward_model(fitted.module, tmp_path / "rm", environment)
    with pytest.raises(ValueError, match="already exists; pass overwrite=True"):
        save_reward_model(fitted.module, folder, environment)
    other = tmp_path / "notes"
    other.mkdir()
    (other / "mine.txt").write_text("keep")
    with pytest.raises(ValueError, match="not a saved reward model; it is left as it is"):
        save_reward_model(fitted.module, other, environment, overwrite=True)
    assert (other / "mine.txt").read_text() == "keep"
    small = SequenceRewardModel(50, 4, 4)
    save_reward_model(small, folder, environment, overwrite=True)
    assert read_reward_model(folder)[0].settings() == small.settings()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes", "rm"]  # no staging folder left


def test_tampered_reward_models_are_refused(fitted, tmp_path):
    folder = save_reward_model(fitted.module, tmp_path / "rm", environment_settings(CONFIG))
    config_file = folder / "config.json"
    good = json.loads(config_file.read_text())

    def refused(change, message):
        config = json.loads(json.dumps(good))
        change(config)
        config_file.write_text(json.dumps(config))
        with pytest.raises(ValueError, match=message):
            read_reward_model(folder)

    refused(lambda c: c.update(format="pickle"), "not a verl-sb3 reward model")
    refused(lambda c: c.update(version=2), "version 2")
    refused(lambda c: c.update(architecture="os.system"), "unknown architecture 'os.system'")
    refused(lambda c: c["settings"].update(vocab_size=1 << 24, embedding_dim=1 << 10), "more than")
    refused(lambda c: c["settings"].update(hidden_size="big"), "as integers")
    refused(lambda c: c["environment"].update(eos_id=99), "eos_id")
    refused(lambda c: c["settings"].update(hidden_size=65), "its tensors .* are not those of SequenceRewardModel")
    config_file.write_text(json.dumps(good))
    save_file({"embedding.weight": th.zeros(3, 3)}, str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match="are not those of"):
        read_reward_model(folder)
    (folder / "model.safetensors").write_bytes(b"\x80\x04not safetensors")
    with pytest.raises(ValueError, match="not a safetensors file"):
        read_reward_model(folder)
    with pytest.raises(ValueError, match="no such reward-model folder"):
        read_reward_model(tmp_path / "none")


def test_a_user_module_is_saved_and_loaded_into_an_instance(tmp_path):
    class CountNature(th.nn.Module):
        def __init__(self):
            super().__init__()
            self.weights = th.nn.Embedding(52, 1, padding_idx=50)

        def forward(self, tokens, lengths):
            return self.weights(tokens).sum(dim=(1, 2))

    module = CountNature()
    folder = save_reward_model(module, tmp_path / "user", environment_settings(CONFIG))
    with pytest.raises(ValueError, match="pass module= an instance"):
        read_reward_model(folder)
    loaded = load_reward_model(folder, module=CountNature())
    tokens = np.random.default_rng(0).integers(0, 50, (3, 20))
    assert np.allclose(loaded.scores(tokens, np.full(3, 20)), module(th.as_tensor(tokens), None).detach().numpy())


# ---------------------------------------------------------------------- as a reward component
def test_at_end_scores_only_finished_sequences():
    component = TorchRewardModel(SequenceRewardModel(50, 4, 4), at_end=True, eos_id=49)
    tokens = np.full((3, 5), 50)
    tokens[0, :5] = [1, 2, 3, 4, 5]  # full
    tokens[1, :2] = [1, 49]  # ended with the end token
    tokens[2, :2] = [1, 2]  # going on
    values = component(tokens, np.array([5, 2, 2]))
    assert values[2] == 0.0 and values[0] != 0.0 and values[1] != 0.0
    assert np.array_equal(values[:2], component.scores(tokens[:2], np.array([5, 2])))
    with pytest.raises(ValueError, match="at_end"):
        TorchRewardModel(SequenceRewardModel(50, 4, 4), at_end=1)


def test_a_loaded_reward_model_rewards_every_environment_form(fitted, tmp_path):
    folder = save_reward_model(fitted.module, tmp_path / "rm", environment_settings(CONFIG))
    weights = {"diversity": 0.0, "repetition": 0.0, "forbidden": 0.0}
    kwargs = dict(reward_fns={"rm": load_reward_model(folder)}, reward_weights=weights, max_length=20)
    env = gym.make("TextGen-v0", **kwargs)
    env.reset(seed=0)
    rewards = [env.step(int(token))[1] for token in [31, 32, 33, 34] + [3] * 16]
    assert rewards[:-1] == [0.0] * 19
    final = th.tensor([[31, 32, 33, 34] + [3] * 16])
    with th.no_grad():
        assert rewards[-1] == pytest.approx(float(fitted.module(final, th.tensor([20]))), abs=1e-6)
    vector = TextGenVectorEnv(3, **kwargs)
    vector.reset(seed=0)
    for _ in range(20):
        _, reward, *_ = vector.step(np.array([31, 32, 33]))
    assert np.all(reward != 0.0)
    sb3 = make_textgen_vec_env(2, seed=0, **kwargs)
    sb3.reset()
    for _ in range(20):
        _, reward, _, _ = sb3.step(np.array([31, 1]))
    assert reward[0] > reward[1]  # the river sequence wins


# ---------------------------------------------------------------------- over-optimisation
def test_environment_return_is_the_episode_return():
    env = gym.make("TextGen-v0")
    env.reset(seed=0)
    tokens = CONFIG.tokenizer.encode("the river the river river river quick")
    total = sum(env.step(token)[1] for token in tokens)
    assert environment_return(CONFIG, "", "the river the river river river quick") == pytest.approx(total)


def test_gold_and_proxy_during_training(fitted, tmp_path):
    folder = save_reward_model(fitted.module, tmp_path / "rm", environment_settings(CONFIG))
    component = load_reward_model(folder)
    weights = {"diversity": 0.0, "repetition": 0.0, "forbidden": 0.0}
    env = make_textgen_vec_env(16, seed=0, reward_fns={"rm": component}, reward_weights=weights)
    model = VerifiedRecurrentPPO(
        "SLMLstmPolicy", env, n_steps=20, batch_size=160, learning_rate=3e-3, seed=0, ref_kl_coef=0.01
    )
    model.env_kwargs = CONFIG.as_kwargs()
    model.set_logger(configure(str(tmp_path / "logs"), ["csv"]))
    start = measure_gold_and_proxy(model, component, nature_count, 64, seed=0)
    assert start["kl"] == 0.0  # the policy is its reference
    seen = []
    callback = GoldScoreCallback(component, nature_count, eval_freq=640, num_sequences=64, on_measure=seen.append)
    model.learn(3200, callback=callback)
    history = callback.history
    assert [row["timesteps"] for row in history] == [0, 640, 1280, 1920, 2560, 3200]
    assert history[0]["gold"] == start["gold"] and history[0]["proxy"] == start["proxy"]
    assert history[-1]["kl"] > 0.0
    assert history[-1]["proxy"] > history[0]["proxy"] and history[-1]["gold"] > history[0]["gold"]
    assert len(seen) == len(history)
    logged = (tmp_path / "logs" / "progress.csv").read_text().splitlines()[0].split(",")
    assert {"rlhf/gold", "rlhf/proxy", "rlhf/kl"} <= set(logged)
    plot = plot_overoptimisation(history, tmp_path / "over.png")
    assert plot.stat().st_size > 10_000
    without_reference = VerifiedRecurrentPPO("SLMLstmPolicy", make_textgen_vec_env(2), n_steps=20, batch_size=40)
    without_reference.env_kwargs = CONFIG.as_kwargs()
    with pytest.raises(ValueError, match="no ref_policy"):
        measure_gold_and_proxy(without_reference, component, nature_count)
    assert measure_gold_and_proxy(without_reference, component, nature_count, 8, reference=model.policy)["kl"] > 0
