"""Sampling from a policy (verl_sb3.generation.generate) and the optimum (optimal_return)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch as th

from textenv_gym import TextGenEnv
from textenv_gym.dynamics import SequenceBatch, TextGenConfig
from textenv_gym.sb3_vec_env import make_textgen_vec_env
from verl_sb3 import VerifiedRecurrentPPO
from verl_sb3.generation import generate, optimal_return, textgen_config

SMALL_POLICY = dict(lstm_hidden_size=16, n_lstm_layers=1, embedding_dim=8)


def small_model(policy_kwargs=SMALL_POLICY, **env_kwargs) -> VerifiedRecurrentPPO:
    config = TextGenConfig(**env_kwargs)
    model = VerifiedRecurrentPPO(
        "SLMLstmPolicy",
        make_textgen_vec_env(2, seed=0, **config.as_kwargs()),
        n_steps=8,
        batch_size=16,
        seed=0,
        policy_kwargs=dict(policy_kwargs),
    )
    model.env_kwargs = config.as_kwargs()
    return model


@pytest.fixture(scope="module")
def model() -> VerifiedRecurrentPPO:
    return small_model()


def replayed_return(config: TextGenConfig, prompt, generated) -> float:
    """The return of ``generated`` after ``prompt`` in the scalar environment."""
    env = TextGenEnv(**config.as_kwargs())
    env.reset(options={"prompt": prompt})
    return sum(env.step(token)[1] for token in generated)


def test_generate_without_prompt(model):
    config = textgen_config(model)
    generation = generate(model, None, num_sequences=5, seed=0)
    assert generation.prompt == []
    assert len(generation.tokens) == len(generation.generated) == len(generation.texts) == 5
    assert generation.returns.shape == (5,)
    for tokens, generated, text, episode_return in zip(
        generation.tokens, generation.generated, generation.texts, generation.returns
    ):
        assert len(tokens) == config.max_length and generated == tokens
        assert all(0 <= t < config.vocab_size for t in tokens)
        assert text == config.tokenizer.decode(generated) and len(text.split()) == config.max_length
        assert episode_return == pytest.approx(replayed_return(config, None, generated))
    assert 0 < generation.entropy <= np.log(config.vocab_size) + 1e-6


def test_generate_with_text_prompt(model):
    config = textgen_config(model)
    generation = generate(model, "Start sequence generation", num_sequences=3, seed=1)
    assert generation.prompt == [0, 1, 2]
    for tokens, generated, text, episode_return in zip(
        generation.tokens, generation.generated, generation.texts, generation.returns
    ):
        assert tokens[:3] == [0, 1, 2] and tokens[3:] == generated
        assert len(generated) == config.max_length - 3
        assert text == config.tokenizer.decode(generated)  # the generated words only, not the prompt
        assert episode_return == pytest.approx(replayed_return(config, [0, 1, 2], generated))


def test_generate_with_token_ids_and_length(model):
    config = textgen_config(model)
    generation = generate(model, [7, 7, 3], num_sequences=4, length=5, seed=2)
    assert generation.prompt == [7, 7, 3]
    for tokens, generated, episode_return in zip(generation.tokens, generation.generated, generation.returns):
        assert len(generated) == 5 and len(tokens) == 8 and tokens[:3] == [7, 7, 3]
        assert episode_return == pytest.approx(replayed_return(config, [7, 7, 3], generated))


def test_generate_is_reproducible_with_a_seed(model):
    first = generate(model, "the model", num_sequences=6, seed=123)
    again = generate(model, "the model", num_sequences=6, seed=123)
    other = generate(model, "the model", num_sequences=6, seed=124)
    assert first.tokens == again.tokens and np.array_equal(first.returns, again.returns)
    assert first.tokens != other.tokens  # 6 x 18 tokens of a nearly uniform policy over 50


def test_unseeded_generate_leaves_torch_global_generator_alone(model):
    th.manual_seed(1234)
    expected = th.rand(3)
    th.manual_seed(1234)
    generate(model, num_sequences=2)
    assert th.equal(th.rand(3), expected)


def test_temperature_near_zero_is_the_deterministic_choice(model):
    greedy = generate(model, "a", num_sequences=3, deterministic=True)
    assert all(row == greedy.tokens[0] for row in greedy.tokens)  # argmax: the same for every sequence
    for temperature in (1e-6, 1e-300):  # a tiny temperature must not turn the probabilities into NaN
        cold = generate(model, "a", num_sequences=3, temperature=temperature, seed=5)
        assert cold.tokens == greedy.tokens
    hot = generate(model, "a", num_sequences=3, temperature=1.0, seed=5)
    assert hot.tokens != greedy.tokens


def test_generate_uses_evaluation_mode_and_restores_training_mode():
    model = small_model(dict(lstm_hidden_size=16, n_lstm_layers=2, embedding_dim=8, lstm_kwargs=dict(dropout=0.5)))
    model.policy.set_training_mode(False)
    in_eval_mode = generate(model, num_sequences=4, seed=0)
    model.policy.set_training_mode(True)  # as after loading, or right after train()
    th.manual_seed(0)
    first = generate(model, num_sequences=4, seed=0)
    th.manual_seed(1)
    second = generate(model, num_sequences=4, seed=0)
    # dropout was off: the same logits (the entropy is computed from them), whatever torch's global seed
    assert first.entropy == second.entropy == in_eval_mode.entropy
    assert first.tokens == second.tokens == in_eval_mode.tokens
    assert model.policy.training


def test_optimal_return_defaults_is_twenty():
    assert optimal_return(TextGenConfig()) == pytest.approx(20.0)
    assert optimal_return(TextGenConfig(), length=5) == pytest.approx(5.0)


def test_optimal_return_with_a_prompt_by_hand():
    # "the the": 2 tokens, 1 distinct, a run of two. Best: 18 new tokens, the k-th gives (1 + k) / (2 + k)
    # (never a third "the": it would complete the window and repeat).
    expected = sum((1 + k) / (2 + k) for k in range(1, 19))
    assert expected == pytest.approx(18 - sum(1 / n for n in range(3, 21)))
    assert optimal_return(TextGenConfig(), "the the") == pytest.approx(expected)
    assert optimal_return(TextGenConfig(), [3, 3]) == pytest.approx(expected)


def test_optimal_return_when_a_forbidden_token_pays_for_itself():
    # 3 allowed tokens, 1 forbidden, 20 steps: after the 3 allowed ones, taking the forbidden token once
    # (reward 4/4 - 1 = 0) raises every later step's diversity: 3 + sum_{n=5}^{20} 4/n = 9.058, more than
    # never taking it, 3 + sum_{n=4}^{20} 3/n = 8.293 (a greedy "allowed tokens only" answer).
    config = TextGenConfig(vocab_size=4, max_length=20, forbidden_tokens=[3])
    assert optimal_return(config) == pytest.approx(3 + sum(4 / n for n in range(5, 21)))


def brute_force_optimum(config: TextGenConfig, prompt) -> float:
    sequences = SequenceBatch(config, 1)
    sequences.set_prompt(prompt)
    room = config.max_length - len(config.encode_prompt(prompt))
    best = -np.inf
    for candidate in itertools.product(range(config.vocab_size), repeat=room):
        sequences.reset()
        best = max(best, sum(float(sequences.append(np.array([t])).reward[0]) for t in candidate))
    return best


@pytest.mark.parametrize(
    "settings, prompt",
    [
        (dict(vocab_size=3, max_length=6), None),
        (dict(vocab_size=3, max_length=6), [1, 1]),
        (dict(vocab_size=3, max_length=6, forbidden_tokens=[0]), [0]),
        (dict(vocab_size=3, max_length=6, forbidden_tokens=[1, 2], forbidden_penalty=-0.2), None),
        (dict(vocab_size=2, max_length=7, repetition_penalty=0.4), None),  # repeating pays
        (dict(vocab_size=3, max_length=6, forbidden_tokens=[2], forbidden_penalty=0.3, repetition_window=2), [2]),
        (dict(vocab_size=4, max_length=5, repetition_window=2), [3, 3, 3]),
        (dict(vocab_size=3, max_length=6, reward_weights={"diversity": 0.5, "repetition": 3.0}), [1]),
        (
            dict(
                vocab_size=3, max_length=6, forbidden_tokens=[0], reward_weights={"diversity": -1.0, "forbidden": -0.5}
            ),
            None,
        ),
    ],
)
def test_optimal_return_matches_exhaustive_search(settings, prompt):
    config = TextGenConfig(**settings)
    assert optimal_return(config, prompt) == pytest.approx(brute_force_optimum(config, prompt))


def test_optimal_return_is_unknown_with_user_components():
    assert np.isnan(optimal_return(TextGenConfig(reward_fns={"bonus": lambda tokens, lengths: lengths * 0.0})))


def test_no_sample_beats_the_optimum(model):
    config = textgen_config(model)
    for prompt in (None, "the the the"):
        generation = generate(model, prompt, num_sequences=20, seed=0)
        assert generation.returns.max() <= optimal_return(config, prompt) + 1e-9


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(length=21), "length: expected an integer in \\[1, 20\\]"),
        (dict(prompt="start sequence", length=19), "length: expected an integer in \\[1, 18\\]"),
        (dict(length=0), "length"),
        (dict(temperature=0.0), "temperature: expected a finite number > 0"),
        (dict(temperature=-1.0), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(num_sequences=0), "num_sequences: expected an integer >= 1"),
        (dict(num_sequences=True), "num_sequences"),
        (dict(prompt="start hello"), "unknown words \\['hello'\\]"),
        (dict(prompt=list(range(20))), "prompt: has 20 tokens"),
        (dict(prompt=[50]), "prompt: token ids must lie in \\[0, 49\\]"),
        (dict(seed=-1), "seed"),
    ],
)
def test_generate_errors_name_the_argument(model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate(model, **kwargs)


def test_model_and_env_settings_that_do_not_match():
    model = small_model()
    model.env_kwargs = dict(max_length=10)  # the model observes 20 tokens
    with pytest.raises(ValueError, match="env_kwargs: .*max_length=10"):
        generate(model)
    model.env_kwargs = dict(vocab_size=30)  # the model acts on 50 tokens
    with pytest.raises(ValueError, match="env_kwargs: .*vocab_size=30"):
        generate(model)
    model.env_kwargs = None  # unrecorded: TextGen-v0's defaults, which fit this model
    assert len(generate(model, seed=0).tokens[0]) == 20


def test_optimal_return_errors():
    with pytest.raises(ValueError, match="length"):
        optimal_return(TextGenConfig(), length=21)
    with pytest.raises(ValueError, match="unknown words"):
        optimal_return(TextGenConfig(), "zebra")


def test_a_prompt_given_to_a_task_model_is_not_scored():
    from textenv_gym.sb3_vec_env import make_textgen_vec_env
    from textenv_gym.tasks import task_kwargs

    kwargs = task_kwargs("TextGen-Reverse-v0", length=2)
    model = VerifiedRecurrentPPO("SLMLstmPolicy", make_textgen_vec_env(4, **kwargs), n_steps=6, batch_size=24)
    generation = generate(model, prompt="a c =", seed=0)  # no reference answer: its compute_score is not called
    assert generation.prompt == model.get_env().config.tokenizer.encode("a c =") and len(generation.texts) == 1
