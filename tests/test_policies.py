"""Tests of verl_sb3.policies.SLMLstmPolicy (a small LSTM language model as a RecurrentPPO policy)."""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import gymnasium as gym  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch as th  # noqa: E402
from gymnasium import spaces  # noqa: E402
from sb3_contrib import RecurrentPPO  # noqa: E402
from sb3_contrib.common.recurrent.type_aliases import RNNStates  # noqa: E402
from stable_baselines3.common.preprocessing import preprocess_obs  # noqa: E402
from stable_baselines3.common.torch_layers import FlattenExtractor  # noqa: E402
from stable_baselines3.common.vec_env import DummyVecEnv  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn.utils.rnn import PackedSequence  # noqa: E402

from verl_sb3.policies import BagOfTokensCritic, SLMLstmPolicy, TiedOutput, TokenIdsExtractor  # noqa: E402
from verl_sb3.tokens import features_to_token_ids, token_space_sizes  # noqa: E402

V, L = 7, 6  # vocabulary size (padding id = V), max sequence length
ATOL = 1e-5


# --------------------------------------------------------------------------- helpers


class TinyTextEnv(gym.Env):
    """Token-sequence env with the TextGen-v0 observation contract.

    Reward 1.0 for a token not in the sequence yet; the episode ends when the sequence has L tokens.
    The prompt is ``reset(options={"prompt": [...]})``, else one of ``prompts`` (cycled in order).
    """

    metadata = {"render_modes": []}

    def __init__(self, prompts=None, multi_discrete: bool = False, truncate: bool = False):
        if multi_discrete:
            self.observation_space = spaces.MultiDiscrete([V + 1] * L)
        else:
            self.observation_space = spaces.Box(low=0, high=V, shape=(L,), dtype=np.int64)
        self.action_space = spaces.Discrete(V)
        self.prompts = [list(p) for p in (prompts or [[]])]
        self.truncate = truncate
        self._episode = 0
        self.sequence: list[int] = []

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        if options and "prompt" in options:
            prompt = list(options["prompt"])
        else:
            prompt = self.prompts[self._episode % len(self.prompts)]
            self._episode += 1
        assert len(prompt) < L
        self.sequence = [int(t) for t in prompt]
        return self._obs(), {}

    def _obs(self):
        return padded(self.sequence)

    def step(self, action):
        token = int(action)
        reward = float(token not in self.sequence)
        self.sequence.append(token)
        full = len(self.sequence) >= L
        return self._obs(), reward, full and not self.truncate, full and self.truncate, {}


def padded(tokens) -> np.ndarray:
    obs = np.full(L, V, dtype=np.int64)
    obs[: len(tokens)] = tokens
    return obs


def tokens_of(obs) -> list[int]:
    out = []
    for t in np.asarray(obs).reshape(-1).tolist():
        if round(t) == V:
            break
        out.append(round(t))
    return out


def box_space():
    return spaces.Box(low=0, high=V, shape=(L,), dtype=np.int64)


def make_policy(seed: int = 0, observation_space=None, sharpen: bool = True, **kwargs) -> SLMLstmPolicy:
    th.manual_seed(seed)
    policy = SLMLstmPolicy(observation_space or box_space(), spaces.Discrete(V), lambda _: 3e-4, **kwargs)
    if sharpen:
        sharpen_heads(policy, seed)
    return policy.eval()


def sharpen_heads(policy: SLMLstmPolicy, seed: int = 0) -> None:
    """Give the (near-uniform at init) action head large weights, so contexts give clearly different logits."""
    gen = th.Generator().manual_seed(seed + 1000)
    with th.no_grad():
        head = policy.action_net.proj if isinstance(policy.action_net, TiedOutput) else policy.action_net
        head.weight.copy_(th.randn(head.weight.shape, generator=gen))
        policy.value_net.weight.copy_(th.randn(policy.value_net.weight.shape, generator=gen))


def zero_states(policy: SLMLstmPolicy, n: int) -> RNNStates:
    shape = (policy.lstm_actor.num_layers, n, policy.lstm_actor.hidden_size)
    return RNNStates((th.zeros(shape), th.zeros(shape)), (th.zeros(shape), th.zeros(shape)))


@th.no_grad()
def run_from_scratch(embedding: nn.Embedding, lstm: nn.LSTM, ids: list[int]) -> th.Tensor:
    """LSTM output at the last of ``ids``, from a zero state: the definition the policy must match."""
    out, _ = lstm(embedding(th.tensor(ids, dtype=th.long).unsqueeze(1)))
    return out[-1, 0]


@th.no_grad()
def reference_log_probs(policy: SLMLstmPolicy, tokens: list[int]) -> th.Tensor:
    latent = run_from_scratch(policy.embedding, policy.lstm_actor, [policy.bos_id, *tokens])
    logits = policy.action_net(policy.mlp_extractor.forward_actor(latent.unsqueeze(0)))[0]
    return th.log_softmax(logits, dim=-1)


@th.no_grad()
def reference_value(policy: SLMLstmPolicy, tokens: list[int]) -> float:
    if policy.lstm_critic is not None:
        latent = run_from_scratch(policy.critic_embedding, policy.lstm_critic, [policy.bos_id, *tokens])
    elif policy.shared_lstm:
        latent = run_from_scratch(policy.embedding, policy.lstm_actor, [policy.bos_id, *tokens])
    else:
        latent = policy.critic(th.tensor(padded(tokens), dtype=th.float32).unsqueeze(0))[0]
    return float(policy.value_net(policy.mlp_extractor.forward_critic(latent.unsqueeze(0)))[0, 0])


@th.no_grad()
def last_token_only_log_probs(policy: SLMLstmPolicy, tokens: list[int]) -> th.Tensor:
    """What a policy that ignores all but the last prompt token would output (must differ)."""
    ids = [policy.bos_id, *tokens[-1:]]
    latent = run_from_scratch(policy.embedding, policy.lstm_actor, ids)
    return th.log_softmax(policy.action_net(latent.unsqueeze(0))[0], dim=-1)


CRITIC_MODES = {
    "separate_lstm": {},
    "shared_lstm": dict(shared_lstm=True, enable_critic_lstm=False),
    "no_critic_lstm": dict(enable_critic_lstm=False),
}

# Episodes (prompts) of each of 3 environments: prompt lengths 0..5 (L=6 leaves room for one action).
PROMPT_SCHEDULE = [
    [[], [1, 2, 3], [4], [0, 1, 2, 3, 4]],
    [[5, 6], [], [0, 0, 0, 0], [3]],
    [[2], [3, 3, 3, 3, 3], [], [6, 5]],
]


@th.no_grad()
def collect(policy: SLMLstmPolicy, n_steps: int, schedule=PROMPT_SCHEDULE, check: bool = True, seed: int = 0):
    """Step len(schedule) envs in lockstep with ``policy.forward`` and carried states, as RecurrentPPO does.

    With ``check``, assert at every step that forward / get_distribution / predict_values / predict match
    the from-scratch reference, and that the value of the next observation with the carried critic
    state (how RecurrentPPO bootstraps truncated episodes) matches too.
    Returns the trajectory: per step the observations, episode starts, actions, and the states before the step.
    """
    th.manual_seed(seed)
    n_envs = len(schedule)
    envs = [TinyTextEnv(prompts=p) for p in schedule]
    obs = np.stack([env.reset()[0] for env in envs])
    starts = np.ones(n_envs, dtype=bool)
    states = zero_states(policy, n_envs)
    np_state = None
    traj = dict(obs=[], starts=[], actions=[], states=[])
    n_prompted_starts = 0
    for _ in range(n_steps):
        obs_t = th.as_tensor(obs)
        starts_t = th.as_tensor(starts, dtype=th.float32)
        actions, values, log_probs, new_states = policy(obs_t, states, starts_t)
        traj["obs"].append(obs.copy())
        traj["starts"].append(starts.copy())
        traj["actions"].append(actions.numpy().copy())
        traj["states"].append(states)
        if check:
            dist, pi_states = policy.get_distribution(obs_t, states.pi, starts_t)
            vf_values = policy.predict_values(obs_t, states.vf, starts_t)
            det_actions, np_state = policy.predict(obs, np_state, starts, deterministic=True)
            for i in range(n_envs):
                seq = tokens_of(obs[i])
                n_prompted_starts += int(starts[i] and len(seq) > 0)
                ref = reference_log_probs(policy, seq)
                assert log_probs[i].item() == pytest.approx(ref[actions[i]].item(), abs=ATOL)
                assert th.allclose(dist.distribution.logits[i], ref, atol=ATOL)
                assert values[i, 0].item() == pytest.approx(reference_value(policy, seq), abs=ATOL)
                assert vf_values[i, 0].item() == pytest.approx(reference_value(policy, seq), abs=ATOL)
                assert det_actions[i] == int(th.argmax(ref))
            for mine, theirs in zip(pi_states, new_states.pi):
                assert th.allclose(mine, theirs, atol=ATOL)
            for mine, theirs in zip(np_state, new_states.pi):
                assert np.allclose(mine, theirs.numpy(), atol=ATOL)
        next_obs = obs.copy()
        for i, env in enumerate(envs):
            step_obs, _, terminated, truncated, _ = env.step(int(actions[i]))
            if check:
                # bootstrap value of the terminal / next observation from the carried critic state
                v = policy.predict_values(
                    th.as_tensor(step_obs).unsqueeze(0),
                    (new_states.vf[0][:, i : i + 1].contiguous(), new_states.vf[1][:, i : i + 1].contiguous()),
                    th.zeros(1),
                )
                assert v.item() == pytest.approx(reference_value(policy, tokens_of(step_obs)), abs=ATOL)
            if terminated or truncated:
                step_obs, _ = env.reset()
            starts[i] = terminated or truncated
            next_obs[i] = step_obs
        obs = next_obs
        states = new_states
    if check:
        assert n_prompted_starts >= 5, "the trajectory must contain episode starts with non-empty prompts"
    return {k: np.stack(v) if k != "states" else v for k, v in traj.items()}


def buffer_like_batch(traj, cuts_per_env):
    """Build an evaluate_actions batch laid out like sb3-contrib's RecurrentRolloutBuffer samples.

    Each env's trajectory is cut into sequences at ``cuts_per_env[i]`` (start indices, independent of
    episode boundaries, so episode starts also fall in the middle of sequences); sequences are padded
    with zeros (observations, actions, episode starts) to the same length, flattened sequence-major,
    and the LSTM states are those before the first step of each sequence, shape (layers, n_seq, H).
    Returns the batch and, for every valid position, (flat index, observation, action).
    """
    n_steps = traj["obs"].shape[0]
    seqs = []
    for env, cuts in enumerate(cuts_per_env):
        bounds = [*cuts, n_steps]
        for start, end in itertools.pairwise(bounds):
            seqs.append((env, start, end))
    max_len = max(end - start for _, start, end in seqs)
    n_seq = len(seqs)
    obs = np.zeros((n_seq, max_len, L), dtype=np.int64)
    actions = np.zeros((n_seq, max_len), dtype=np.int64)
    starts = np.zeros((n_seq, max_len), dtype=np.float32)
    states = {k: [] for k in ("h_pi", "c_pi", "h_vf", "c_vf")}
    valid = []
    for s, (env, start, end) in enumerate(seqs):
        obs[s, : end - start] = traj["obs"][start:end, env]
        actions[s, : end - start] = traj["actions"][start:end, env]
        starts[s, : end - start] = traj["starts"][start:end, env]
        st = traj["states"][start]
        states["h_pi"].append(st.pi[0][:, env])
        states["c_pi"].append(st.pi[1][:, env])
        states["h_vf"].append(st.vf[0][:, env])
        states["c_vf"].append(st.vf[1][:, env])
        for t in range(end - start):
            valid.append((s * max_len + t, obs[s, t], actions[s, t]))
    lstm_states = RNNStates(
        (th.stack(states["h_pi"], dim=1), th.stack(states["c_pi"], dim=1)),
        (th.stack(states["h_vf"], dim=1), th.stack(states["c_vf"], dim=1)),
    )
    batch = dict(
        obs=th.as_tensor(obs.reshape(n_seq * max_len, L)).float(),
        actions=th.as_tensor(actions.reshape(-1)),
        lstm_states=lstm_states,
        episode_starts=th.as_tensor(starts.reshape(-1)),
    )
    return batch, valid


def check_against_reference(policy, values, log_prob, entropy, valid):
    for index, obs, action in valid:
        seq = tokens_of(obs)
        ref = reference_log_probs(policy, seq)
        assert log_prob[index].item() == pytest.approx(ref[action].item(), abs=ATOL)
        ref_entropy = -(ref.exp() * ref).sum().item()
        assert entropy[index].item() == pytest.approx(ref_entropy, abs=ATOL)
        assert values[index, 0].item() == pytest.approx(reference_value(policy, seq), abs=ATOL)


class LstmCallRecorder:
    """Records the input type of every call of an LSTM module."""

    def __init__(self, lstm: nn.LSTM):
        self.inputs: list = []
        self.handle = lstm.register_forward_hook(lambda module, args, output: self.inputs.append(args[0]))

    def remove(self):
        self.handle.remove()


# --------------------------------------------------------------------------- prompt conditioning


@pytest.mark.parametrize("critic_mode", sorted(CRITIC_MODES))
def test_collection_outputs_equal_lstm_over_bos_and_whole_sequence(critic_mode):
    policy = make_policy(**CRITIC_MODES[critic_mode])
    collect(policy, n_steps=20)  # asserts inside, at every step and for every env


def test_reference_distinguishes_whole_prompt_from_last_token():
    # guards the exactness tests against being vacuous: the whole prompt changes the output
    policy = make_policy()
    full = reference_log_probs(policy, [1, 2, 3])
    assert not th.allclose(full, last_token_only_log_probs(policy, [1, 2, 3]), atol=1e-3)
    assert not th.allclose(reference_log_probs(policy, [4, 2, 3]), full, atol=1e-3)
    # and the policy itself, at an episode start, sees the difference between two prompts with the same last token
    obs = th.as_tensor(np.stack([padded([1, 2, 3]), padded([4, 2, 3])]))
    dist, _ = policy.get_distribution(obs, zero_states(policy, 2).pi, th.ones(2))
    assert not th.allclose(dist.distribution.logits[0], dist.distribution.logits[1], atol=1e-3)


@th.no_grad()
def evaluate_recording_lstm_calls(policy: SLMLstmPolicy, batch: dict):
    """``evaluate_actions`` on a buffer-like batch, and the inputs of every actor LSTM call it made."""
    recorder = LstmCallRecorder(policy.lstm_actor)
    try:
        values, log_prob, entropy = policy.evaluate_actions(
            batch["obs"], batch["actions"], batch["lstm_states"], batch["episode_starts"]
        )
    finally:
        recorder.remove()
    return values, log_prob, entropy, recorder.inputs


@pytest.mark.parametrize("critic_mode", sorted(CRITIC_MODES))
def test_evaluate_actions_matches_reference_with_mid_sequence_episode_starts(critic_mode):
    policy = make_policy(**CRITIC_MODES[critic_mode])
    traj = collect(policy, n_steps=24, check=False)
    # sequences of unequal lengths that cut through episodes: episode starts in the middle of sequences
    cuts = [[0, 5, 13], [0, 8, 9, 20], [0, 3, 11, 19]]
    batch, valid = buffer_like_batch(traj, cuts)
    episode_starts = batch["episode_starts"].reshape(len(batch["lstm_states"].pi[0][0]), -1)
    assert episode_starts[:, 1:].sum() > 0, "the batch must have episode starts in the middle of sequences"
    values, log_prob, entropy, lstm_inputs = evaluate_recording_lstm_calls(policy, batch)
    check_against_reference(policy, values, log_prob, entropy, valid)
    # no Python loop over time: a single LSTM call on a packed batch of segments
    assert len(lstm_inputs) == 1 and isinstance(lstm_inputs[0], PackedSequence)


def test_evaluate_actions_fast_path_is_one_lstm_call_and_exact():
    # no prompts, and sequences cut at every episode start (as RecurrentRolloutBuffer does) plus mid-episode
    schedule = [[[]], [[]]]
    policy = make_policy()
    traj = collect(policy, n_steps=18, schedule=schedule, check=False)
    cuts = [[0, 3, 6, 12, 14], [0, 6, 12, 15]]  # episodes of L=6 steps start at 0, 6, 12
    batch, valid = buffer_like_batch(traj, cuts)
    n_seq = batch["lstm_states"].pi[0].shape[1]
    starts = batch["episode_starts"].reshape(n_seq, -1)
    assert starts[:, 0].sum() > 0 and starts[:, 1:].sum() == 0
    assert (starts[:, 0] == 0).sum() > 0, "some sequences must continue from a carried state"
    values, log_prob, entropy, lstm_inputs = evaluate_recording_lstm_calls(policy, batch)
    check_against_reference(policy, values, log_prob, entropy, valid)
    assert len(lstm_inputs) == 1
    assert isinstance(lstm_inputs[0], th.Tensor) and lstm_inputs[0].shape[:2] == (starts.shape[1], n_seq)


@th.no_grad()
def final_states_from_scratch(embedding, lstm, bos_id, tokens):
    _, (h_n, c_n) = lstm(embedding(th.tensor([bos_id, *tokens], dtype=th.long).unsqueeze(1)))
    return h_n[:, 0], c_n[:, 0]


@pytest.mark.parametrize("schedule_name", ["prompts", "no_prompts"])
def test_process_sequence_returns_exact_final_states_of_multi_step_sequences(schedule_name):
    schedule = PROMPT_SCHEDULE if schedule_name == "prompts" else [[[]], [[]], [[]]]
    policy = make_policy()
    # equal-length sequences (no padding); with prompts, episode starts fall inside sequences (general
    # path); without, sequences of L=6 steps are aligned with the episodes (fast path)
    n_steps, seq_len = 24, (8 if schedule_name == "prompts" else L)
    traj = collect(policy, n_steps=n_steps, schedule=schedule, check=False)
    cuts = [list(range(0, n_steps, seq_len))] * len(schedule)
    batch, _ = buffer_like_batch(traj, cuts)
    starts = batch["episode_starts"].reshape(-1, seq_len)
    assert (starts[:, 1:].sum() > 0) == (schedule_name == "prompts")
    sequences = [(env, start) for env in range(len(schedule)) for start in cuts[env]]
    for lstm, embedding, states in (
        (policy.lstm_actor, policy.embedding, batch["lstm_states"].pi),
        (policy.lstm_critic, policy.critic_embedding, batch["lstm_states"].vf),
    ):
        with th.no_grad():
            _, (h_n, c_n) = policy._process_sequence(batch["obs"], states, batch["episode_starts"], lstm)
        assert h_n.shape == c_n.shape == (lstm.num_layers, len(sequences), lstm.hidden_size)
        for s, (env, start) in enumerate(sequences):
            last = start + seq_len - 1
            ref_h, ref_c = final_states_from_scratch(embedding, lstm, policy.bos_id, tokens_of(traj["obs"][last, env]))
            assert th.allclose(h_n[:, s], ref_h, atol=ATOL) and th.allclose(c_n[:, s], ref_c, atol=ATOL)
            if last + 1 < n_steps:  # and equals the state carried during collection
                carried = traj["states"][last + 1].pi if lstm is policy.lstm_actor else traj["states"][last + 1].vf
                assert th.allclose(h_n[:, s], carried[0][:, env], atol=ATOL)
                assert th.allclose(c_n[:, s], carried[1][:, env], atol=ATOL)


def test_evaluate_actions_on_real_recurrent_rollout_buffer_matches_collection_and_reference():
    prompts = [[[], [1, 2], [3, 4, 5, 6]], [[0], [], [2, 2, 2]]]
    env = DummyVecEnv([lambda p=p: TinyTextEnv(prompts=p) for p in prompts])
    model = RecurrentPPO(SLMLstmPolicy, env, n_steps=24, batch_size=16, seed=3, device="cpu")
    sharpen_heads(model.policy, seed=3)
    _, callback = model._setup_learn(total_timesteps=48, callback=None)
    assert model.collect_rollouts(model.env, callback, model.rollout_buffer, n_rollout_steps=24)
    policy = model.policy.eval()
    n_checked = 0
    for samples in model.rollout_buffer.get(16):
        actions = samples.actions.long().flatten()
        with th.no_grad():
            values, log_prob, entropy = policy.evaluate_actions(
                samples.observations, actions, samples.lstm_states, samples.episode_starts
            )
        mask = samples.mask > 0.5
        # the training pass reproduces the log-probs and values computed during collection
        assert th.allclose(log_prob[mask], samples.old_log_prob[mask], atol=ATOL)
        assert th.allclose(values.flatten()[mask], samples.old_values[mask], atol=ATOL)
        valid = [(i, samples.observations[i].numpy(), int(actions[i])) for i in np.flatnonzero(mask.numpy())]
        check_against_reference(policy, values, log_prob, entropy, valid)
        n_checked += len(valid)
    assert n_checked == 48


def test_predict_without_state_conditions_on_whole_prompt():
    policy = make_policy()
    prompts = [[1, 2, 3], [4, 2, 3], [], [5]]
    obs = np.stack([padded(p) for p in prompts])
    actions, state = policy.predict(obs, deterministic=True)
    for i, prompt in enumerate(prompts):
        assert actions[i] == int(th.argmax(reference_log_probs(policy, prompt)))
    # a single (non-vectorised) observation works too
    action, _ = policy.predict(padded([1, 2, 3]), deterministic=True)
    assert int(action) == int(th.argmax(reference_log_probs(policy, [1, 2, 3])))
    # state after the prompt: continuing with one more token equals the from-scratch reference
    nxt = np.stack([padded([*p, 6]) for p in prompts])
    dist, _ = policy.get_distribution(
        th.as_tensor(nxt), (th.as_tensor(state[0]), th.as_tensor(state[1])), th.zeros(len(prompts))
    )
    for i, prompt in enumerate(prompts):
        assert th.allclose(dist.distribution.logits[i], reference_log_probs(policy, [*prompt, 6]), atol=ATOL)


# --------------------------------------------------------------------------- observation decoding


def test_float_token_ids_are_rounded_not_truncated():
    features = th.tensor([[2.9999, 3.0001, 0.49, 5.51, 7.0, -0.2], [0.9999999, 6.0, 6.9999, 7.0, 7.0, 7.0]])
    ids = features_to_token_ids(features, V, L)
    assert ids.dtype == th.long
    assert ids.tolist() == [[3, 3, 0, 6, 7, 0], [1, 6, 7, 7, 7, 7]]
    extractor = TokenIdsExtractor(box_space())
    assert extractor.features_dim == L
    assert extractor(features).tolist() == [[3.0, 3.0, 0.0, 6.0, 7.0, 0.0], [1.0, 6.0, 7.0, 7.0, 7.0, 7.0]]


def test_policy_is_robust_to_float_noise_in_box_observations():
    policy = make_policy()
    obs = np.stack([padded([1, 2, 3]), padded([])])
    exact = policy.get_distribution(th.as_tensor(obs).float(), zero_states(policy, 2).pi, th.ones(2))[0]
    noisy_obs = th.as_tensor(obs).float() + th.tensor([-0.3, 0.2, -0.01, 0.4, -0.4, 0.1])
    noisy = policy.get_distribution(noisy_obs, zero_states(policy, 2).pi, th.ones(2))[0]
    assert th.allclose(exact.distribution.logits, noisy.distribution.logits)
    assert th.allclose(exact.distribution.logits[0], reference_log_probs(policy, [1, 2, 3]), atol=ATOL)


def test_multidiscrete_one_hot_is_decoded():
    space = spaces.MultiDiscrete([V + 1] * L)
    obs = th.as_tensor(np.stack([padded([1, 2, 3]), padded([]), padded([6, 0, 5, 4, 3, 2])]))
    one_hot = preprocess_obs(obs, space)
    assert one_hot.shape == (3, L * (V + 1))
    extractor = TokenIdsExtractor(space)
    assert extractor.features_dim == L
    assert th.equal(extractor(one_hot).long(), obs)
    assert th.equal(features_to_token_ids(one_hot, V, L), obs)


@pytest.mark.parametrize("extractor_class", [TokenIdsExtractor, FlattenExtractor])
def test_multidiscrete_policy_equals_box_policy(extractor_class):
    box_policy = make_policy()
    md_policy = make_policy(
        seed=1, observation_space=spaces.MultiDiscrete([V + 1] * L), features_extractor_class=extractor_class
    )
    md_policy.load_state_dict(box_policy.state_dict())
    obs = th.as_tensor(np.stack([padded([1, 2, 3]), padded([]), padded([6, 0, 5, 4, 3])]))
    starts = th.tensor([1.0, 1.0, 0.0])
    states = zero_states(box_policy, 3)
    with th.no_grad():
        box_out = box_policy(obs, states, starts)
        md_out = md_policy(obs, states, starts)
        box_dist, _ = box_policy.get_distribution(obs, states.pi, starts)
        md_dist, _ = md_policy.get_distribution(obs, states.pi, starts)
    assert th.allclose(box_dist.distribution.logits, md_dist.distribution.logits, atol=ATOL)
    assert th.allclose(box_out[1], md_out[1], atol=ATOL)
    assert th.allclose(md_dist.distribution.logits[0], reference_log_probs(box_policy, [1, 2, 3]), atol=ATOL)


def test_multidiscrete_env_trains():
    env = DummyVecEnv([lambda: TinyTextEnv(prompts=[[], [1, 2]], multi_discrete=True)])
    model = RecurrentPPO(
        SLMLstmPolicy,
        env,
        n_steps=32,
        batch_size=32,
        n_epochs=1,
        seed=0,
        device="cpu",
        policy_kwargs=dict(lstm_hidden_size=32, embedding_dim=16),
    )
    model.learn(64)
    assert model.num_timesteps >= 64


# --------------------------------------------------------------------------- sizes and spaces


def lstm_layer_count(lstm: nn.LSTM) -> int:
    return len([name for name, _ in lstm.named_parameters() if name.startswith("weight_hh_l")])


def test_default_sizes():
    policy = make_policy(sharpen=False)
    for lstm in (policy.lstm_actor, policy.lstm_critic):
        assert lstm.num_layers == 2 and lstm_layer_count(lstm) == 2
        assert lstm.hidden_size == 128 and lstm.weight_hh_l1.shape == (4 * 128, 128)
        assert lstm.input_size == 64 and lstm.weight_ih_l0.shape == (4 * 128, 64)
    for embedding in (policy.embedding, policy.critic_embedding):
        assert embedding.weight.shape == (V + 2, 64)
        assert embedding.padding_idx == V
    assert (policy.pad_id, policy.bos_id) == (V, V + 1)
    assert policy.action_net.in_features == 128 and policy.action_net.out_features == V
    assert policy.value_net.in_features == 128 and policy.value_net.out_features == 1
    assert policy.lstm_hidden_state_shape == (2, 1, 128)
    # all parameters are optimised, including the embeddings and the replaced LSTMs
    optimised = {id(p) for group in policy.optimizer.param_groups for p in group["params"]}
    assert optimised == {id(p) for p in policy.parameters()}
    assert id(policy.embedding.weight) in optimised and id(policy.lstm_actor.weight_ih_l0) in optimised


def test_initial_policy_is_near_uniform():
    policy = make_policy(sharpen=False)
    obs = th.as_tensor(np.stack([padded([1, 2, 3]), padded([]), padded([6, 6, 6, 6, 6])]))
    dist, _ = policy.get_distribution(obs, zero_states(policy, 3).pi, th.ones(3))
    probs = dist.distribution.probs
    assert th.allclose(probs, th.full_like(probs, 1 / V), atol=0.01)


def test_custom_sizes_are_honoured_and_work_with_recurrent_ppo():
    env = DummyVecEnv([lambda: TinyTextEnv() for _ in range(3)])
    model = RecurrentPPO(
        SLMLstmPolicy,
        env,
        n_steps=8,
        batch_size=12,
        n_epochs=1,
        seed=0,
        device="cpu",
        policy_kwargs=dict(embedding_dim=16, lstm_hidden_size=24, n_lstm_layers=3),
    )
    policy = model.policy
    for lstm in (policy.lstm_actor, policy.lstm_critic):
        assert (lstm.input_size, lstm.hidden_size, lstm.num_layers) == (16, 24, 3)
        assert lstm_layer_count(lstm) == 3
    assert policy.embedding.embedding_dim == 16
    assert policy.action_net.in_features == 24
    assert model.rollout_buffer.hidden_states_pi.shape == (8, 3, 3, 24)
    model.learn(24)
    assert model._last_lstm_states.pi[0].shape == (3, 3, 24)


@pytest.mark.parametrize(
    "observation_space, action_space, message",
    [
        (spaces.Box(0, V, (2, L), np.int64), spaces.Discrete(V), "1-D Box"),
        (spaces.Box(0, V, (L,), np.float32), spaces.Discrete(V), "integer dtype"),
        (spaces.Box(1, V, (L,), np.int64), spaces.Discrete(V), "low=0"),
        (spaces.Box(0, np.array([V] * (L - 1) + [V + 1]), (L,), np.int64), spaces.Discrete(V), "same high"),
        (spaces.Discrete(V), spaces.Discrete(V), "observation space must be Box"),
        (spaces.MultiDiscrete([V + 1] * (L - 1) + [V]), spaces.Discrete(V), r"MultiDiscrete must be \[V \+ 1\] \* L"),
        (spaces.Box(0, V, (L,), np.int64), spaces.Discrete(V + 1), r"action space must be Discrete\(7\)"),
        (spaces.Box(0, V, (L,), np.int64), spaces.Box(0, 1, (V,)), r"action space must be Discrete\(V\)"),
        (spaces.MultiDiscrete([V + 1] * L), spaces.Discrete(V - 1), r"action space must be Discrete\(7\)"),
    ],
)
def test_bad_spaces_raise_value_error(observation_space, action_space, message):
    with pytest.raises(ValueError, match=message):
        SLMLstmPolicy(observation_space, action_space, lambda _: 3e-4)
    with pytest.raises(ValueError, match=message):
        token_space_sizes(observation_space, action_space)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(lstm_kwargs=dict(batch_first=True)), "batch_first"),
        (dict(lstm_kwargs=dict(bidirectional=True)), "bidirectional"),
        (dict(embedding_dim=0), "embedding_dim"),
        (dict(n_lstm_layers=0), "n_lstm_layers"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SLMLstmPolicy(box_space(), spaces.Discrete(V), lambda _: 3e-4, **kwargs)


def test_bag_of_tokens_critic_ignores_padding_and_order():
    critic = BagOfTokensCritic(V, L, hidden_dim=8, output_dim=4)
    a = critic(th.tensor(padded([1, 2, 3])[None], dtype=th.float32))
    b = critic(th.tensor(padded([3, 1, 2])[None], dtype=th.float32))
    c = critic(th.tensor(padded([1, 2, 4])[None], dtype=th.float32))
    assert th.allclose(a, b, atol=1e-6) and not th.allclose(a, c, atol=1e-4)


def test_bag_of_tokens_counts_tokens_and_length():
    critic = BagOfTokensCritic(V, L, hidden_dim=8, output_dim=4)
    bag = critic.bag_of_tokens(th.tensor(padded([1, 1, 3])[None], dtype=th.float32))[0] * L
    expected = th.zeros(V + 1)
    expected[1], expected[3], expected[V] = 2, 1, 3
    assert th.equal(bag, expected)


# --------------------------------------------------------------------------- RecurrentPPO training, save / load


@pytest.mark.parametrize(
    "policy_kwargs",
    [
        dict(),
        dict(shared_lstm=True, enable_critic_lstm=False),
        dict(enable_critic_lstm=False, share_features_extractor=False),
        dict(net_arch=dict(pi=[32], vf=[32]), activation_fn=nn.ReLU, ortho_init=False, lstm_kwargs=dict(dropout=0.1)),
    ],
    ids=["defaults", "shared_lstm", "no_critic_lstm", "mlp_and_dropout"],
)
def test_recurrent_ppo_learns_and_save_load_round_trip(policy_kwargs, tmp_path):
    env = DummyVecEnv([lambda: TinyTextEnv(prompts=[[], [1, 2], [3]]) for _ in range(2)])
    model = RecurrentPPO(
        SLMLstmPolicy, env, n_steps=32, batch_size=32, n_epochs=2, seed=0, device="cpu", policy_kwargs=policy_kwargs
    )
    before = {k: v.clone() for k, v in model.policy.state_dict().items()}
    model.learn(256)
    assert model.num_timesteps >= 256
    after = model.policy.state_dict()
    assert all(th.isfinite(v.float()).all() for v in after.values())
    for name in ("embedding.weight", "lstm_actor.weight_ih_l0", "action_net.proj.weight", "value_net.weight"):
        assert not th.equal(before[name], after[name]), f"{name} was not trained"

    path = tmp_path / "model.zip"
    model.save(path)
    loaded = RecurrentPPO.load(path, device="cpu")
    assert isinstance(loaded.policy, SLMLstmPolicy)
    for key, value in model.policy.state_dict().items():
        assert th.equal(value, loaded.policy.state_dict()[key]), key
    # same predictions over whole episodes, with carried states
    obs = np.stack([padded([]), padded([1, 2]), padded([4, 4, 4])])
    state_a = state_b = None
    starts = np.ones(3, dtype=bool)
    for _ in range(3):
        act_a, state_a = model.predict(obs, state_a, starts, deterministic=True)
        act_b, state_b = loaded.predict(obs, state_b, starts, deterministic=True)
        np.testing.assert_array_equal(act_a, act_b)
        np.testing.assert_allclose(state_a[0], state_b[0], atol=1e-6)
        obs = np.stack([padded([*tokens_of(o)[: L - 1], int(a)]) for o, a in zip(obs, act_a)])
        starts = np.zeros(3, dtype=bool)


def test_policy_save_load_keeps_custom_sizes(tmp_path):
    policy = make_policy(
        embedding_dim=12, lstm_hidden_size=20, n_lstm_layers=3, shared_lstm=True, enable_critic_lstm=False
    )
    path = tmp_path / "policy.pt"
    policy.save(str(path))
    loaded = SLMLstmPolicy.load(str(path), device="cpu").eval()
    assert (loaded.embedding_dim, loaded.lstm_hidden_size, loaded.n_lstm_layers) == (12, 20, 3)
    assert loaded.shared_lstm and loaded.lstm_critic is None
    obs = th.as_tensor(np.stack([padded([1, 2, 3]), padded([])]))
    a, _ = policy.get_distribution(obs, zero_states(policy, 2).pi, th.ones(2))
    b, _ = loaded.get_distribution(obs, zero_states(loaded, 2).pi, th.ones(2))
    assert th.allclose(a.distribution.logits, b.distribution.logits)


def test_truncated_episodes_bootstrap_with_consistent_values():
    # RecurrentPPO bootstraps truncated episodes with predict_values(terminal_obs, carried critic state):
    # record those calls and check them against the from-scratch reference.
    env = DummyVecEnv([lambda: TinyTextEnv(prompts=[[1, 2], []], truncate=True) for _ in range(2)])
    model = RecurrentPPO(SLMLstmPolicy, env, n_steps=16, batch_size=16, seed=0, device="cpu")
    policy = model.policy
    calls = []
    original = policy.predict_values

    def recording_predict_values(obs, lstm_states, episode_starts):
        values = original(obs, lstm_states, episode_starts)
        calls.append((obs.clone(), values.clone()))
        return values

    policy.predict_values = recording_predict_values
    _, callback = model._setup_learn(total_timesteps=32, callback=None)
    model.collect_rollouts(model.env, callback, model.rollout_buffer, n_rollout_steps=16)
    terminal = [(o, v) for o, v in calls if len(tokens_of(o[0].numpy())) == L]
    assert len(terminal) >= 4
    for obs, values in calls:
        for row, value in zip(obs, values):
            assert value.item() == pytest.approx(reference_value(policy, tokens_of(row.numpy())), abs=ATOL)


# --------------------------------------------------------------------------- the real environment


def test_recurrent_ppo_on_textgen_env():
    sb3_vec_env = pytest.importorskip("textenv_gym.sb3_vec_env")
    env = sb3_vec_env.make_textgen_vec_env(num_envs=4, seed=0)
    model = RecurrentPPO(SLMLstmPolicy, env, n_steps=64, batch_size=64, n_epochs=1, seed=0, device="cpu")
    vocab_size, max_length = token_space_sizes(env.observation_space, env.action_space)
    assert model.policy.vocab_size == vocab_size and model.policy.max_length == max_length
    model.learn(512)
    assert model.num_timesteps >= 512
    assert len(model.ep_info_buffer) > 0
    assert all(np.isfinite(p.detach().numpy()).all() for p in model.policy.parameters())


def test_tied_output_shares_the_input_embedding():
    policy = make_policy(sharpen=True)
    assert isinstance(policy.action_net, TiedOutput) and policy.action_net.embedding is policy.embedding
    latent = th.randn(3, 128)
    expected = policy.action_net.proj(latent) @ policy.embedding.weight[:V].T + policy.action_net.bias
    assert th.allclose(policy.action_net(latent), expected)
    with th.no_grad():
        policy.embedding.weight[2] += 1.0  # changing a token's input embedding changes its logit
    assert not th.allclose(policy.action_net(latent)[:, 2], expected[:, 2])
    assert th.allclose(policy.action_net(latent)[:, 3], expected[:, 3])


def test_untied_output_is_a_linear_layer():
    policy = SLMLstmPolicy(box_space(), spaces.Discrete(V), lambda _: 3e-4, tie_embeddings=False)
    assert isinstance(policy.action_net, nn.Linear) and policy.action_net.out_features == V
