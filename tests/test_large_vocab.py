"""TextGen-v0 and both SLM policies at a large size: a vocabulary of 5,000 tokens, sequences of 128.

The environment (scalar, Gymnasium vector, SB3 vec env), the default vocabulary and tokenizer,
verified training of the LSTM and the transformer policies, and generation, all on the CPU.
Each test takes a few seconds (1 thread).
"""

from __future__ import annotations

import math

import gymnasium as gym
import numpy as np
import pytest
import torch as th
from gymnasium.utils.env_checker import check_env

import textenv_gym  # noqa: F401  (registers TextGen-v0)
from textenv_gym import DEFAULT_VOCABULARY, TextGenConfig
from textenv_gym.sb3_vec_env import make_textgen_vec_env
from verl_sb3 import VerifiedPPO, VerifiedRecurrentPPO
from verl_sb3.generation import generate
from verl_sb3.policies import SPARSE_BAG_RATIO, BagOfTokensCritic, SLMTransformerPolicy

V, L = 5000, 128
FORBIDDEN = [0, V - 1]
ENV = dict(vocab_size=V, max_length=L, forbidden_tokens=FORBIDDEN)
N_ENVS = 4
#: A few updates: 4 environments x 128 steps (one whole episode each), minibatches of 128, 1 epoch.
TRAINING = dict(n_steps=L, batch_size=128, n_epochs=1, learning_rate=1e-3, seed=0)


def random_actions(rng: np.random.Generator, steps: int, num_envs: int) -> np.ndarray:
    """Actions ``(steps, num_envs)`` that exercise every reward rule: new tokens, a few tokens
    used again and again (repeats, runs of 3 for the repetition penalty) and the forbidden ones."""
    actions = rng.integers(0, V, size=(steps, num_envs))
    reused = rng.random((steps, num_envs)) < 0.4
    actions[reused] = rng.choice([7, 7, 7, 4321, *FORBIDDEN], size=int(reused.sum()))
    return actions


def scalar_rewards(actions: np.ndarray) -> list[float]:
    """Rewards of the scalar env stepping ``actions``, reset whenever an episode ends."""
    env = gym.make("TextGen-v0", **ENV)
    env.reset(seed=0)
    rewards = []
    for action in actions:
        _, reward, terminated, truncated, _ = env.step(int(action))
        rewards.append(reward)
        if terminated or truncated:
            env.reset()
    return rewards


# --------------------------------------------------------------------------- environment


def test_env_passes_the_checker_and_plays_a_full_episode():
    env = gym.make("TextGen-v0", vocab_size=V, max_length=L)
    check_env(env.unwrapped, skip_render_check=True)
    assert env.action_space == gym.spaces.Discrete(V)
    assert env.observation_space.shape == (L,) and int(env.observation_space.high.max()) == V
    obs, info = env.reset(seed=0)
    assert (obs == V).all() and info["length"] == 0
    total, steps, terminated = 0.0, 0, False
    while not terminated:
        obs, reward, terminated, truncated, info = env.step(V - 1 - steps)  # 128 distinct tokens
        assert not truncated and env.observation_space.contains(obs)
        total, steps = total + reward, steps + 1
    assert steps == L and info["length"] == L and info["diversity"] == 1.0
    assert total == pytest.approx(float(L))  # the optimum: 1.0 per step
    assert obs.tolist() == list(range(V - 1, V - 1 - L, -1))
    with pytest.raises(ValueError, match="reset"):
        env.step(0)


def test_gymnasium_vector_env_matches_the_scalar_env():
    rng = np.random.default_rng(0)
    steps = L + 10  # a whole episode, the autoreset step, then 9 steps of the next episode
    actions = random_actions(rng, steps, N_ENVS)
    envs = gym.make_vec("TextGen-v0", num_envs=N_ENVS, vectorization_mode="vector_entry_point", **ENV)
    assert type(envs.unwrapped).__name__ == "TextGenVectorEnv"
    envs.reset(seed=0)
    rewards, terminated = [], []
    for batch in actions:
        obs, reward, term, _, _ = envs.step(batch)
        assert obs.shape == (N_ENVS, L) and obs.dtype == np.int64
        rewards.append(reward)
        terminated.append(term)
    rewards, terminated = np.array(rewards), np.array(terminated)
    assert terminated[L - 1].all() and terminated.sum() == N_ENVS  # all end at step 128, once
    # next-step autoreset: the step after the last one is a reset (action ignored, reward 0)
    assert (rewards[L] == 0).all()
    for env_index in range(N_ENVS):
        played = np.delete(actions[:, env_index], L)
        expected = scalar_rewards(played)
        assert np.delete(rewards[:, env_index], L).tolist() == expected
    forbidden_used = np.isin(actions[:L], FORBIDDEN)
    assert forbidden_used.any() and (rewards[:L][forbidden_used] < 0.5).all()


def test_sb3_vec_env_matches_the_scalar_env():
    rng = np.random.default_rng(1)
    steps = 2 * L + 5  # two whole episodes (same-step reset) and a bit
    actions = random_actions(rng, steps, N_ENVS)
    venv = make_textgen_vec_env(N_ENVS, seed=0, **ENV)
    obs = venv.reset()
    assert obs.shape == (N_ENVS, L) and (obs == V).all()
    rewards, dones = [], []
    for batch in actions:
        obs, reward, done, infos = venv.step(batch)
        rewards.append(reward)
        dones.append(done)
        for index in np.flatnonzero(done):
            assert infos[index]["terminal_observation"].shape == (L,) and infos[index]["length"] == L
            assert "episode" in infos[index]  # VecMonitor
            assert (obs[index] == V).all()  # already reset
    rewards, dones = np.array(rewards), np.array(dones)
    assert rewards.dtype == np.float32
    assert dones.sum() == 2 * N_ENVS and dones[L - 1].all() and dones[2 * L - 1].all()
    for env_index in range(N_ENVS):
        expected = np.array(scalar_rewards(actions[:, env_index]), dtype=np.float32)
        np.testing.assert_array_equal(rewards[:, env_index], expected)


def test_default_vocabulary_extends_to_5000_tokens_and_round_trips():
    config = TextGenConfig(vocab_size=V, max_length=L)
    vocabulary = config.vocabulary
    assert len(vocabulary) == V and len(set(vocabulary)) == V
    assert vocabulary[: len(DEFAULT_VOCABULARY)] == DEFAULT_VOCABULARY
    assert vocabulary[50] == "tok50" and vocabulary[V - 1] == f"tok{V - 1}"
    tokenizer = config.tokenizer
    ids = [*np.random.default_rng(0).integers(0, V, size=L).tolist(), 0, 49, 50, V - 1]
    text = tokenizer.decode(ids)
    assert tokenizer.encode(text) == ids
    assert tokenizer.encode("The TOK4999 model tok50") == [3, V - 1, 5, 50]
    with pytest.raises(ValueError, match="tok5000"):
        tokenizer.encode("tok5000")
    env = gym.make("TextGen-v0", vocab_size=V, max_length=L, render_mode="ansi")
    env.reset(options={"prompt": "the tok4999"})
    env.step(V - 2)
    assert env.render() == f"the tok4999 tok{V - 2}"


# --------------------------------------------------------------------------- policies


def test_bag_of_tokens_critic_sparse_path_is_the_dense_function():
    """At V = 5000, L = 128 the critic's first layer is an embedding_bag: the same values and gradients."""
    assert V > SPARSE_BAG_RATIO * L
    th.manual_seed(0)
    critic = BagOfTokensCritic(V, L, hidden_dim=32, output_dim=16)
    assert critic.net[0].weight.shape == (32, 2 * V + 1)  # same parameters as the dense layout
    generator = th.Generator().manual_seed(0)
    tokens = th.randint(0, V, (64, L), generator=generator)
    tokens[:, 10:20] = tokens[:, :10]  # repeated tokens
    lengths = th.randint(0, L + 1, (64,), generator=generator)
    lengths[:3] = th.tensor([0, 1, L])
    tokens[th.arange(L) >= lengths.unsqueeze(1)] = V
    tokens[5, 40:] = 17  # tokens after the first padding are ignored
    features = tokens.float()

    def dense(features: th.Tensor) -> th.Tensor:
        bag = critic.bag_of_tokens(features)
        return critic.net(th.cat([(bag[:, :V] > 0).to(bag.dtype), bag], dim=1))

    sparse_value = critic(features)
    critic.zero_grad()
    sparse_value.sum().backward()
    sparse_grads = [p.grad.clone() for p in critic.parameters()]
    dense_value = dense(features)
    critic.zero_grad()
    dense_value.sum().backward()
    th.testing.assert_close(sparse_value, dense_value, rtol=1e-5, atol=1e-6)
    for sparse_grad, p in zip(sparse_grads, critic.parameters()):
        th.testing.assert_close(sparse_grad, p.grad, rtol=1e-4, atol=1e-5)


def check_training(model, updates: int) -> None:
    """Every update verified, its figures finite, the parameters finite, the policy still near uniform."""
    log = model.verification_log
    assert len(log) == updates
    for entry in log:
        assert entry["accepted"], entry["reason"]
        assert math.isfinite(entry["kl"]) and 0 <= entry["kl"] <= model.kl_threshold
        # entropy near log(5000) = 8.52 nats: a few small updates cannot concentrate the policy
        assert math.log(V) - 0.5 < entry["entropy"] <= math.log(V) + 1e-4
        assert all(math.isfinite(check["value"]) for check in entry["checks"].values()), entry["checks"]
        assert "forbidden_mass" in entry["checks"]  # taken from the environment's config
    assert all(bool(th.isfinite(p).all()) for p in model.policy.parameters())
    assert model.num_timesteps == updates * N_ENVS * L


def check_generation(model) -> None:
    model.env_kwargs = TextGenConfig(**ENV).as_kwargs()
    sampled = generate(model, num_sequences=3, seed=0)
    assert [len(row) for row in sampled.tokens] == [L] * 3
    assert all(0 <= token < V for row in sampled.tokens for token in row)
    assert np.isfinite(sampled.returns).all() and sampled.entropy > math.log(V) - 0.5
    again = generate(model, num_sequences=3, seed=0)
    assert again.tokens == sampled.tokens  # seeded
    prompted = generate(model, prompt="the tok4999", num_sequences=2, length=5, deterministic=True)
    assert all(row[:2] == [3, V - 1] and len(row) == 7 for row in prompted.tokens)
    assert all(len(text.split()) == 5 for text in prompted.texts)


@pytest.mark.parametrize("policy_kwargs", [{}, {"enable_critic_lstm": False}], ids=["lstm_critic", "bag_critic"])
def test_verified_recurrent_ppo_learns_and_generates(policy_kwargs):
    th.set_num_threads(1)
    env = make_textgen_vec_env(N_ENVS, seed=0, **ENV)
    model = VerifiedRecurrentPPO("SLMLstmPolicy", env, policy_kwargs=policy_kwargs, **TRAINING)
    assert model.policy.action_net.out_features == V and model.policy.embedding.num_embeddings == V + 2
    model.learn(2 * N_ENVS * L)
    check_training(model, updates=2)
    check_generation(model)


def test_verified_ppo_transformer_learns_and_generates():
    th.set_num_threads(1)
    env = make_textgen_vec_env(N_ENVS, seed=0, **ENV)
    model = VerifiedPPO(SLMTransformerPolicy, env, **TRAINING)
    assert model.policy.action_net.out_features == V
    model.learn(2 * N_ENVS * L)
    check_training(model, updates=2)
    check_generation(model)
