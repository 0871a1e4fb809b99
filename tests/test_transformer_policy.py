"""Tests of verl_sb3.policies.SLMTransformerPolicy (a small causal transformer LM for PPO / VerifiedPPO)."""

from __future__ import annotations

import numpy as np
import pytest
import torch as th
from gymnasium import spaces
from stable_baselines3 import PPO
from stable_baselines3.common.torch_layers import FlattenExtractor
from torch import nn

from textenv_gym.sb3_vec_env import make_textgen_vec_env
from verl_sb3 import SLMTransformerPolicy, VerifiedPPO
from verl_sb3.policies import BagOfTokensCritic, TiedOutput

V, L = 7, 6  # vocabulary size (padding id = V), max sequence length
ATOL = 1e-5
SMALL = dict(d_model=16, n_layers=2, n_heads=2, ff_dim=32, critic_hidden_dim=16)


def padded(tokens, length: int = L, pad: int = V) -> np.ndarray:
    obs = np.full(length, pad, dtype=np.int64)
    obs[: len(tokens)] = tokens
    return obs


def box_space(vocab_size: int = V, max_length: int = L) -> spaces.Box:
    return spaces.Box(low=0, high=vocab_size, shape=(max_length,), dtype=np.int64)


def make_policy(seed: int = 0, observation_space=None, sharpen: bool = True, **kwargs) -> SLMTransformerPolicy:
    th.manual_seed(seed)
    policy = SLMTransformerPolicy(observation_space or box_space(), spaces.Discrete(V), lambda _: 3e-4, **kwargs)
    if sharpen:  # the initial policy is near-uniform: make contexts give clearly different logits
        gen = th.Generator().manual_seed(seed + 1000)
        with th.no_grad():
            for parameter in policy.parameters():
                parameter.add_(0.5 * th.randn(parameter.shape, generator=gen))
    return policy.eval()


def logits(policy: SLMTransformerPolicy, rows) -> th.Tensor:
    """Normalised logits (log-probabilities) of the policy on observations ``rows``."""
    with th.no_grad():
        return policy.get_distribution(th.as_tensor(np.stack(rows))).distribution.logits


def values(policy: SLMTransformerPolicy, rows) -> th.Tensor:
    with th.no_grad():
        return policy.predict_values(th.as_tensor(np.stack(rows))).flatten()


@th.no_grad()
def reference_logits(policy: SLMTransformerPolicy, tokens: list[int]) -> th.Tensor:
    """The definition: the encoder over exactly ``[BOS, *tokens]`` (no padding, no batch), read at its end
    (normalised, as the policy's distribution holds them)."""
    lm = policy.mlp_extractor.actor
    ids = th.tensor([[lm.bos_id, *tokens]])
    hidden = lm.embedding(ids) + lm.position(th.arange(ids.shape[1]))
    mask = nn.Transformer.generate_square_subsequent_mask(ids.shape[1])
    hidden = lm.encoder(hidden, mask=mask, is_causal=True)
    return th.log_softmax(policy.action_net(lm.final_norm(hidden[:, -1]))[0], dim=-1)


# --------------------------------------------------------------------------- what the logits depend on


def test_logits_and_values_shapes_and_near_uniform_start():
    policy = make_policy(sharpen=False)
    rows = [padded([1, 2, 3]), padded([]), padded([6] * L)]
    out = logits(policy, rows)
    assert out.shape == (3, V) and values(policy, rows).shape == (3,)
    entropy = -(out.exp() * out).sum(dim=1)  # near-uniform: the heads start with gain 0.01
    assert (entropy > 0.99 * np.log(V)).all()
    actions, _ = policy.predict(np.stack(rows))
    assert actions.shape == (3,) and ((actions >= 0) & (actions < V)).all()


def test_logits_equal_the_encoder_over_bos_and_the_real_tokens():
    policy = make_policy()
    sequences = [[], [3], [1, 2], [6, 6, 6], [0, 1, 2, 3, 4, 5]]
    out = logits(policy, [padded(s) for s in sequences])
    for row, tokens in zip(out, sequences):
        assert th.allclose(row, reference_logits(policy, tokens), atol=ATOL)
    assert not th.allclose(out[1], out[2], atol=1e-2)  # different contexts, different logits


def test_padding_and_what_follows_it_cannot_change_logits():
    policy = make_policy()
    clean = [padded([1, 2]), padded([]), padded([4, 4, 4])]
    # after the first padding id the sequence has ended: whatever follows is ignored
    dirty = [np.array([1, 2, V, 3, 0, 6]), np.array([V, 5, 5, V, 1, 2]), np.array([4, 4, 4, V, 0, 0])]
    assert th.equal(logits(policy, clean), logits(policy, dirty))
    assert th.equal(values(policy, clean), values(policy, dirty))


def test_future_positions_cannot_leak_into_earlier_outputs():
    lm = make_policy().mlp_extractor.actor
    gen = th.Generator().manual_seed(0)
    tokens = th.randint(0, V, (4, L), generator=gen)
    with th.no_grad():
        base = lm.encode(tokens)  # position k reads [BOS, s_0..s_{k-1}]
        for j in range(L):
            changed = tokens.clone()
            changed[:, j] = (changed[:, j] + 1) % V
            out = lm.encode(changed)
            assert th.allclose(out[:, : j + 1], base[:, : j + 1], atol=ATOL), f"token {j} leaked backwards"
            assert not th.allclose(out[:, j + 1 :], base[:, j + 1 :], atol=1e-3)


def test_empty_sequence_reads_the_bos_position():
    policy = make_policy()
    out = logits(policy, [padded([])])
    assert th.isfinite(out).all()
    assert th.allclose(out[0], reference_logits(policy, []), atol=ATOL)
    assert th.isfinite(values(policy, [padded([])])).all()


def test_shared_prefixes_are_exact_and_encode_only_maximal_sequences():
    policy = make_policy()
    lm = policy.mlp_extractor.actor
    episodes = [[1, 2, 3, 4, 5, 6], [1, 2, 0], [3, 3]]
    rows = [padded(e[:n]) for e in episodes for n in range(len(e) + 1)] + [padded([1, 2, 3])]  # with duplicates
    order = np.random.default_rng(0).permutation(len(rows))
    rows = [rows[i] for i in order]
    tokens, lengths = lm.token_ids(th.as_tensor(np.stack(rows)))
    encoded, (slot, position) = lm.shared_prefixes(tokens, lengths)
    assert sorted(tuple(tokens[i][: lengths[i]].tolist()) for i in encoded) == sorted(tuple(e) for e in episodes)
    for i in range(len(rows)):  # each sequence is a prefix of the row it is read from
        n = int(lengths[i])
        assert int(position[i]) == n
        assert th.equal(tokens[encoded[slot[i]], :n], tokens[i, :n])
    batched = logits(policy, rows)
    one_by_one = th.cat([logits(policy, [row]) for row in rows])
    assert th.allclose(batched, one_by_one, atol=ATOL)


def test_float_observations_are_rounded_and_multidiscrete_is_decoded():
    policy = make_policy()
    rows = [padded([1, 2, 3]), padded([]), padded([5, 5])]
    expected = logits(policy, rows)
    noisy = th.as_tensor(np.stack(rows), dtype=th.float32) + 0.3 * (th.rand(3, L) - 0.5)
    with th.no_grad():
        assert th.equal(policy.get_distribution(noisy).distribution.logits, expected)
    multi = make_policy(observation_space=spaces.MultiDiscrete([V + 1] * L), features_extractor_class=FlattenExtractor)
    assert th.allclose(logits(multi, rows), expected)


# --------------------------------------------------------------------------- structure


def test_default_sizes_and_all_parameters_are_optimised():
    policy = SLMTransformerPolicy(box_space(), spaces.Discrete(V), lambda _: 3e-4)
    lm = policy.mlp_extractor.actor
    assert (policy.d_model, policy.n_layers, policy.n_heads, policy.ff_dim, policy.dropout) == (64, 2, 4, 128, 0.0)
    assert lm.embedding.weight.shape == (V + 2, 64) and lm.embedding.padding_idx == V
    assert (lm.pad_id, lm.bos_id) == (V, V + 1) and lm.position.weight.shape == (L + 1, 64)
    assert len(lm.encoder.layers) == 2
    layer = lm.encoder.layers[0]
    assert layer.norm_first and layer.self_attn.num_heads == 4 and layer.linear1.out_features == 128
    assert isinstance(policy.mlp_extractor.bag_critic, BagOfTokensCritic) and policy.value_net.in_features == 128
    assert isinstance(policy.action_net, TiedOutput) and policy.action_net.embedding is lm.embedding
    optimised = {id(p) for group in policy.optimizer.param_groups for p in group["params"]}
    assert optimised == {id(p) for p in policy.parameters()}


def test_untied_output_is_a_linear_layer():
    policy = SLMTransformerPolicy(box_space(), spaces.Discrete(V), lambda _: 3e-4, tie_embeddings=False, **SMALL)
    assert isinstance(policy.action_net, nn.Linear) and policy.action_net.out_features == V


@pytest.mark.parametrize("critic", ["bag_of_tokens", "shared", "transformer"])
def test_critics(critic):
    policy = make_policy(critic=critic, **SMALL)
    policy.train()
    obs = th.as_tensor(np.stack([padded([1, 2]), padded([3])]))
    policy.optimizer.zero_grad()
    policy.predict_values(obs).sum().backward()
    actor_grad = policy.mlp_extractor.actor.encoder.layers[0].linear1.weight.grad
    trains_actor = actor_grad is not None and bool(actor_grad.abs().sum() > 0)
    assert trains_actor == (critic == "shared")  # the value loss reaches the language model only when shared
    if critic == "transformer":
        assert (
            policy.mlp_extractor.critic_lm is not None
            and policy.mlp_extractor.critic_lm is not policy.mlp_extractor.actor
        )


def test_bag_of_tokens_value_ignores_order():
    policy = make_policy()
    assert th.allclose(values(policy, [padded([1, 2, 3])]), values(policy, [padded([3, 1, 2])]))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(d_model=30, n_heads=4), "d_model must be divisible by n_heads"),
        (dict(d_model=0), "d_model"),
        (dict(n_layers=0), "n_layers"),
        (dict(n_heads=-1), "n_heads"),
        (dict(ff_dim=0), "ff_dim"),
        (dict(critic_hidden_dim=0), "critic_hidden_dim"),
        (dict(d_model=2.5), "d_model"),
        (dict(dropout=1.0), "dropout"),
        (dict(dropout=-0.1), "dropout"),
        (dict(critic="lstm"), "critic"),
        (dict(net_arch=[64]), "net_arch"),
        (dict(use_sde=True), "use_sde"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SLMTransformerPolicy(box_space(), spaces.Discrete(V), lambda _: 3e-4, **kwargs)


@pytest.mark.parametrize(
    "observation_space, action_space, message",
    [
        (spaces.Box(0, V, (L,), np.float32), spaces.Discrete(V), "integer dtype"),
        (spaces.Box(0, V, (2, L), np.int64), spaces.Discrete(V), "1-D Box"),
        (spaces.Discrete(V), spaces.Discrete(V), "observation space must be Box"),
        (box_space(), spaces.Discrete(V + 1), r"action space must be Discrete\(7\)"),
        (box_space(), spaces.Box(0, 1, (V,)), r"action space must be Discrete\(V\)"),
    ],
)
def test_non_textgen_spaces_raise_value_error(observation_space, action_space, message):
    with pytest.raises(ValueError, match=message):
        SLMTransformerPolicy(observation_space, action_space, lambda _: 3e-4)


# --------------------------------------------------------------------------- with PPO and VerifiedPPO


@pytest.mark.parametrize("algorithm", [PPO, VerifiedPPO])
def test_learns_on_textgen_at_default_size(algorithm):
    env = make_textgen_vec_env(4, seed=0)
    model = algorithm(SLMTransformerPolicy, env, n_steps=20, batch_size=40, n_epochs=2, seed=0, device="cpu")
    before = {k: v.clone() for k, v in model.policy.state_dict().items()}
    model.learn(3 * 80)
    assert model.num_timesteps == 240 and len(model.ep_info_buffer) > 0
    after = model.policy.state_dict()
    assert all(th.isfinite(v.float()).all() for v in after.values())
    for name in (
        "mlp_extractor.actor.embedding.weight",
        "mlp_extractor.actor.encoder.layers.1.linear2.weight",
        "action_net.proj.weight",
        "value_net.weight",
    ):
        assert not th.equal(before[name], after[name]), f"{name} was not trained"
    if algorithm is VerifiedPPO:
        assert len(model.verification_log) == 3
        # the logits collected during the rollout are those PPO trains on (dropout 0): the first
        # epoch starts at ratio 1, and the verified KL of an update is small
        assert all(entry["kl"] < 0.25 for entry in model.verification_log)


@pytest.mark.parametrize("algorithm", [PPO, VerifiedPPO])
def test_learns_at_a_large_vocabulary_and_length(algorithm):
    env = make_textgen_vec_env(2, seed=0, vocab_size=5000, max_length=128)
    model = algorithm(SLMTransformerPolicy, env, n_steps=128, batch_size=128, n_epochs=1, seed=0, device="cpu")
    assert (model.policy.vocab_size, model.policy.max_length) == (5000, 128)
    model.learn(2 * 256)  # how fast: benchmarks/large_vocab.py
    assert model.num_timesteps == 512 and len(model.ep_info_buffer) == 4
    assert all(th.isfinite(p).all() for p in model.policy.parameters())


def test_forward_at_128_envs_of_5000_tokens_and_length_128():
    vocab, length = 5000, 128
    policy = SLMTransformerPolicy(box_space(vocab, length), spaces.Discrete(vocab), lambda _: 3e-4).eval()
    rng = np.random.default_rng(0)
    obs = th.as_tensor(
        np.stack([padded(rng.integers(0, vocab, n), length, vocab) for n in rng.integers(0, length, 128)])
    )
    with th.no_grad():
        actions, value, log_prob = policy(obs)
    assert actions.shape == (128,) and value.shape == (128, 1) and th.isfinite(log_prob).all()


@pytest.mark.parametrize("policy_kwargs", [dict(), dict(critic="transformer", tie_embeddings=False, **SMALL)])
def test_save_load_round_trip_gives_identical_logits(policy_kwargs, tmp_path):
    env = make_textgen_vec_env(2, seed=0, vocab_size=V, max_length=L)
    model = VerifiedPPO(
        SLMTransformerPolicy,
        env,
        n_steps=12,
        batch_size=12,
        n_epochs=1,
        seed=0,
        device="cpu",
        policy_kwargs=policy_kwargs,
    )
    model.learn(24)
    path = tmp_path / "model.zip"
    model.save(path)
    loaded = VerifiedPPO.load(path, device="cpu")
    assert isinstance(loaded.policy, SLMTransformerPolicy)
    assert loaded.policy._get_constructor_parameters().keys() == model.policy._get_constructor_parameters().keys()
    for key, value in model.policy.state_dict().items():
        assert th.equal(value, loaded.policy.state_dict()[key]), key
    rows = [padded([]), padded([1, 2]), padded([4, 4, 4, 0])]
    model.policy.eval()
    loaded.policy.eval()
    assert th.equal(logits(model.policy, rows), logits(loaded.policy, rows))
    assert th.equal(values(model.policy, rows), values(loaded.policy, rows))
