"""A small LSTM language model as an sb3-contrib recurrent actor-critic policy.

:class:`SLMLstmPolicy` plugs into ``sb3_contrib.RecurrentPPO`` (``RecurrentPPO(SLMLstmPolicy, env)``)
for token-generation environments such as ``TextGen-v0``: the observation is the whole token
sequence so far (left-aligned, padded with the id ``V``), the action is the next token.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch as th
from gymnasium import spaces
from sb3_contrib.common.recurrent.policies import RecurrentActorCriticPolicy
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from stable_baselines3.common.type_aliases import Schedule
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

__all__ = [
    "BagOfTokensCritic",
    "SLMLstmPolicy",
    "TokenIdsExtractor",
    "features_to_token_ids",
    "token_space_sizes",
]


def token_space_sizes(observation_space: spaces.Space, action_space: spaces.Space | None = None) -> tuple[int, int]:
    """Vocabulary size ``V`` and maximum sequence length ``L`` of a token-sequence observation space.

    Accepted observation spaces: ``Box(low=0, high=V, shape=(L,), dtype=<integer>)`` (the padding id
    is ``V``) or ``MultiDiscrete([V + 1] * L)``. If ``action_space`` is given it must be ``Discrete(V)``.

    :param observation_space: the observation space to check.
    :param action_space: the action space to check against it (optional).
    :return: ``(V, L)``.
    :raises ValueError: naming the problem when a space does not follow this contract.
    """
    if isinstance(observation_space, spaces.Box):
        shape = observation_space.shape
        if len(shape) != 1 or shape[0] < 1:
            raise ValueError(
                f"observation space must be a 1-D Box of token ids with shape (L,), L >= 1; got shape {shape}"
            )
        if not np.issubdtype(observation_space.dtype, np.integer):
            raise ValueError(
                f"observation space Box must have an integer dtype (token ids), got dtype {observation_space.dtype}"
            )
        if not np.all(observation_space.low == 0):
            raise ValueError(f"observation space Box must have low=0 everywhere, got low={observation_space.low}")
        high = observation_space.high
        vocab_size = int(high.flat[0])
        if not np.all(high == vocab_size) or vocab_size < 1:
            raise ValueError(
                "observation space Box must have the same high=V >= 1 (the padding id) at every position, "
                f"got high={high}"
            )
        max_length = int(shape[0])
    elif isinstance(observation_space, spaces.MultiDiscrete):
        nvec = np.asarray(observation_space.nvec)
        if nvec.ndim != 1 or nvec.size < 1:
            raise ValueError(f"observation space MultiDiscrete must be 1-D, got nvec of shape {nvec.shape}")
        if not np.all(nvec == nvec[0]) or int(nvec[0]) < 2:
            raise ValueError(f"observation space MultiDiscrete must be [V + 1] * L with V >= 1, got nvec={nvec}")
        start = getattr(observation_space, "start", None)
        if start is not None and np.any(np.asarray(start) != 0):
            raise ValueError(f"observation space MultiDiscrete must start at 0, got start={start}")
        vocab_size = int(nvec[0]) - 1
        max_length = int(nvec.size)
    else:
        raise ValueError(
            "observation space must be Box(low=0, high=V, shape=(L,), dtype=int) or MultiDiscrete([V + 1] * L), "
            f"got {observation_space}"
        )
    if action_space is not None:
        if not isinstance(action_space, spaces.Discrete):
            raise ValueError(f"action space must be Discrete(V) with V={vocab_size} (the next token), got {action_space}")
        if int(action_space.n) != vocab_size or int(action_space.start) != 0:
            raise ValueError(
                f"action space must be Discrete({vocab_size}) starting at 0 to match the observation space's "
                f"vocabulary size V={vocab_size}, got {action_space}"
            )
    return vocab_size, max_length


def features_to_token_ids(features: th.Tensor, vocab_size: int, max_length: int) -> th.Tensor:
    """Token ids (``long``, shape ``(batch, L)``, values in ``0..V``) from preprocessed observations.

    Accepts token ids as floats (SB3's ``preprocess_obs`` on a Box: they are rounded, not truncated,
    then clipped to ``0..V``), or the concatenated one-hot blocks that SB3 makes from a
    ``MultiDiscrete([V + 1] * L)`` observation (decoded with an argmax over each block).

    :param features: tensor of shape ``(batch, L)`` or ``(batch, L * (V + 1))``.
    :param vocab_size: ``V``.
    :param max_length: ``L``.
    :return: long tensor of shape ``(batch, L)``.
    """
    features = features.reshape(features.shape[0], -1)
    width = features.shape[1]
    if width == max_length:
        return th.round(features.float()).clamp_(0, vocab_size).long()
    if width == max_length * (vocab_size + 1):
        return features.reshape(features.shape[0], max_length, vocab_size + 1).argmax(dim=-1)
    raise ValueError(
        f"cannot decode token ids from features of width {width}: expected L={max_length} token ids "
        f"or L*(V+1)={max_length * (vocab_size + 1)} one-hot values"
    )


class TokenIdsExtractor(BaseFeaturesExtractor):
    """Features extractor that returns the token ids of the observation (as a float tensor).

    It holds no parameters: the embedding lives in :class:`SLMLstmPolicy`. Works on a Box of token ids
    and on the one-hot encoding SB3 makes from a ``MultiDiscrete([V + 1] * L)`` space.

    :param observation_space: the token-sequence observation space (see :func:`token_space_sizes`).
    """

    def __init__(self, observation_space: spaces.Space) -> None:
        vocab_size, max_length = token_space_sizes(observation_space)
        super().__init__(observation_space, features_dim=max_length)
        self.vocab_size = vocab_size
        self.max_length = max_length

    def forward(self, observations: th.Tensor) -> th.Tensor:
        return features_to_token_ids(observations, self.vocab_size, self.max_length).float()


def set_forget_bias(lstm: nn.LSTM, value: float) -> None:
    """Start every layer's forget gate at ``sigmoid(value)``: the gate's input bias is ``value``,
    its hidden bias 0 (PyTorch orders the gates input, forget, cell, output)."""
    hidden = lstm.hidden_size
    with th.no_grad():
        for layer in range(lstm.num_layers):
            getattr(lstm, f"bias_ih_l{layer}")[hidden : 2 * hidden].fill_(value)
            getattr(lstm, f"bias_hh_l{layer}")[hidden : 2 * hidden].zero_()


class TiedOutput(nn.Module):
    """Logits from tied embeddings: ``logits = proj(h) @ E[:V].T + b`` (Press & Wolf, 2017).

    The output layer shares the token embedding ``E`` of the input, so whatever the model learns
    about one token's embedding (such as "this token was already used") carries over to its
    logit, for every token at once.

    :param latent_dim: size of the policy latent ``h``.
    :param embedding: the input token embedding (rows ``0 .. V-1`` are the tokens).
    :param vocab_size: ``V``.
    :param ortho_init: initialise ``proj`` orthogonally with gain 0.01 (near-uniform first policy).
    """

    def __init__(self, latent_dim: int, embedding: nn.Embedding, vocab_size: int, ortho_init: bool = True) -> None:
        super().__init__()
        self.embedding = embedding
        self.vocab_size = vocab_size
        self.in_features, self.out_features = latent_dim, vocab_size
        self.proj = nn.Linear(latent_dim, embedding.embedding_dim)
        self.bias = nn.Parameter(th.zeros(vocab_size))
        if ortho_init:
            nn.init.orthogonal_(self.proj.weight, gain=0.01)
            nn.init.zeros_(self.proj.bias)

    def forward(self, latent: th.Tensor) -> th.Tensor:
        tokens = self.embedding.weight[: self.vocab_size].T
        if latent.dim() == 2:  # addmm adds the bias inside the product: no second (batch, V) tensor
            return th.addmm(self.bias, self.proj(latent), tokens)
        return self.proj(latent) @ tokens + self.bias


#: :class:`BagOfTokensCritic` computes its first layer sparsely when ``V > SPARSE_BAG_RATIO * L``
#: (measured crossover of forward + backward, batch 320, 1 thread: about ``V = 8 L``).
SPARSE_BAG_RATIO = 8


class BagOfTokensCritic(nn.Module):
    """Feed-forward critic used when the critic has no LSTM (``enable_critic_lstm=False, shared_lstm=False``).

    The bag of tokens of the observed sequence (which tokens occur, how often each occurs
    divided by ``L``, and the sequence length over ``L``) through an MLP with one tanh hidden
    layer. The number of distinct tokens, on which the value of a TextGen-v0 state depends, is
    linear in these features. The actor stays a language model; only the value estimate
    reads the sequence as a bag.

    The features are ``2 V + 1`` numbers of which at most ``2 L + 1`` are non-zero. For a large
    vocabulary (``V > 8 L``, e.g. ``V = 5000``, ``L = 128``) the first layer therefore sums the
    weight columns of the sequence's tokens (``embedding_bag``) instead of multiplying a dense
    ``(batch, 2 V + 1)`` matrix: the same function (to float rounding) and the same parameters,
    at that size (batch 320, 1 thread) about 10x faster forward and 2.7x faster forward + backward.
    Small vocabularies keep the dense product (bit for bit as before).

    :param vocab_size: ``V``; id ``V`` is padding.
    :param max_length: ``L``.
    :param hidden_dim: width of the hidden layer.
    :param output_dim: output size (the LSTM hidden size of the policy).
    """

    def __init__(self, vocab_size: int, max_length: int, hidden_dim: int, output_dim: int) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.max_length = max_length
        self.net = nn.Sequential(nn.Linear(2 * vocab_size + 1, hidden_dim), nn.Tanh(), nn.Linear(hidden_dim, output_dim))

    def bag_of_tokens(self, features: th.Tensor) -> th.Tensor:
        """Token counts and the length, each over ``L``: shape ``(batch, V + 1)``."""
        tokens = features_to_token_ids(features, self.vocab_size, self.max_length)
        valid = (tokens != self.vocab_size).long().cumprod(dim=1)  # the sequence ends at the first padding
        tokens = th.where(valid.bool(), tokens, th.full_like(tokens, self.vocab_size))
        counts = th.zeros(tokens.shape[0], self.vocab_size + 1, device=tokens.device)
        counts.scatter_add_(1, tokens, th.ones_like(tokens, dtype=counts.dtype))
        counts[:, self.vocab_size] = valid.sum(dim=1)
        return counts / self.max_length

    def forward(self, features: th.Tensor) -> th.Tensor:
        if self.vocab_size > SPARSE_BAG_RATIO * self.max_length:
            return self.net[1:](self._sparse_first_layer(features))
        bag = self.bag_of_tokens(features)
        presence = (bag[:, : self.vocab_size] > 0).to(bag.dtype)
        return self.net(th.cat([presence, bag], dim=1))

    def _sparse_first_layer(self, features: th.Tensor) -> th.Tensor:
        """``net[0](cat([presence, bag]))`` without building the ``(batch, 2 V + 1)`` features:
        column ``t`` (presence of token ``t``) once per distinct token, column ``V + t`` (its count)
        ``1 / L`` per occurrence, column ``2 V`` (the length) ``length / L``."""
        vocab_size, layer = self.vocab_size, self.net[0]
        tokens = features_to_token_ids(features, vocab_size, self.max_length)
        valid = (tokens != vocab_size).long().cumprod(dim=1).bool()  # the sequence ends at the first padding
        tokens = th.where(valid, tokens, th.full_like(tokens, vocab_size))
        ordered = tokens.sort(dim=1).values  # padding (V) last
        distinct = th.ones_like(valid)
        distinct[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
        real = ordered != vocab_size
        count_weight = valid.to(layer.weight.dtype) / self.max_length
        columns = th.cat([th.where(real, ordered, 0), th.where(valid, tokens, 0) + vocab_size], dim=1)
        weights = th.cat([(distinct & real).to(count_weight.dtype), count_weight], dim=1)
        # embedding_bag wants the rows contiguous: the copy costs far less than the dense product
        hidden = nn.functional.embedding_bag(columns, layer.weight.T.contiguous(), per_sample_weights=weights, mode="sum")
        length = count_weight.sum(dim=1, keepdim=True)
        return hidden + length * layer.weight[:, 2 * vocab_size] + layer.bias


class SLMLstmPolicy(RecurrentActorCriticPolicy):
    """A small language model as a recurrent actor-critic policy for ``RecurrentPPO``.

    Network: token embedding (``embedding_dim``) -> ``n_lstm_layers``-layer LSTM (``lstm_hidden_size``)
    -> ``action_net``: logits over the ``V`` tokens (the action distribution), and a value head.
    ``net_arch`` defaults to ``[]``, so ``mlp_extractor`` is the identity and ``action_net`` /
    ``value_net`` are linear layers on the LSTM output. With ``ortho_init`` (default), SB3 initialises
    ``action_net`` orthogonally with gain 0.01: the initial policy is nearly uniform over tokens. The
    embeddings use PyTorch's default N(0, 1) init and the LSTMs PyTorch's default init (as sb3-contrib).

    Observations (see :func:`token_space_sizes`): ``Box(0, V, (L,), int)`` holding the token sequence so
    far, left-aligned, padded with ``V``; ``MultiDiscrete([V + 1] * L)`` is also accepted. Action space:
    ``Discrete(V)``. The embedding table has ``V + 2`` rows: tokens ``0..V-1``, padding ``V`` (a zero,
    untrained row) and a learned beginning-of-sequence (BOS) embedding ``V + 1``.

    **Conditioning on the whole prompt.** The LSTM consumes one token per environment step and carries
    its state across steps, as in sb3-contrib, with one exception: at a step whose ``episode_starts``
    flag is 1 the state is reset to zero and the LSTM consumes ``[BOS, s_0, ..., s_{n-1}]``, the BOS
    embedding followed by *all* ``n`` tokens of the observed sequence (the prompt; ``n`` may be 0). At any
    other step it consumes only the last token ``s_{n-1}`` (BOS if the sequence is empty) from the
    carried state. Since the environment appends the chosen token to the sequence, the output at every
    step is exactly that of the LSTM run over ``[BOS, s_0, ..., s_{n-1}]`` from a zero state. This holds
    for data collection (``forward`` / ``predict`` with carried states), for the bootstrap values, and
    for training (``evaluate_actions`` on the padded sequences of ``RecurrentRolloutBuffer``, including
    episode starts in the middle of a sequence). It is implemented in :meth:`_process_sequence`, which
    all of sb3-contrib's callers use:

    - fast path: when no episode starts after the first step of a sequence and no episode start has a
      non-empty prompt, every step feeds one token (BOS at episode starts), so the whole
      ``(time, n_seq)`` batch goes through a single ``lstm(...)`` call, without a Python loop;
    - general path: each sequence is cut at its episode starts into segments (zero initial state at an
      episode start, the given state otherwise), the per-step token chunks are laid out with tensor
      index arithmetic (no loop over time), and all segments go through a single ``lstm(...)`` call on a
      ``PackedSequence``; the output of a step is the LSTM output at the last token of its chunk.

    ``predict()`` called without ``state`` and without ``episode_start`` treats the observation as the
    first of an episode (zero state), so it conditions on the whole prompt.

    **Critic.** By default (``enable_critic_lstm=True``, as sb3-contrib) the critic is a separate language
    model of the same shape: its own embedding (``critic_embedding``) and LSTM (``lstm_critic``), with the
    same prompt conditioning, so the value loss never changes the actor's parameters. With
    ``shared_lstm=True`` the critic reads the actor's LSTM output, detached (sb3-contrib semantics: only
    the actor gradient trains the LSTM). With both off, the critic is a :class:`BagOfTokensCritic`.

    Note that with ``lstm_kwargs=dict(dropout=...)`` the outputs in training mode (dropout active) differ
    from the ones collected in evaluation mode, as for any recurrent policy with dropout.

    :param observation_space: Observation space: ``Box(0, V, (L,), int)`` or ``MultiDiscrete([V + 1] * L)``
    :param action_space: Action space: ``Discrete(V)``
    :param lr_schedule: Learning rate schedule (could be constant)
    :param net_arch: The specification of the policy and value MLPs between the LSTM and the heads.
        ``None`` means ``[]`` (linear heads directly on the LSTM output).
    :param activation_fn: Activation function of the MLPs of ``net_arch``
    :param ortho_init: Whether to use or not orthogonal initialization (of the MLPs and heads)
    :param use_sde: Must be False: gSDE does not apply to discrete actions
    :param log_std_init: Unused (continuous actions only), kept for signature compatibility
    :param full_std: Unused (gSDE only), kept for signature compatibility
    :param use_expln: Unused (gSDE only), kept for signature compatibility
    :param squash_output: Unused (gSDE only), kept for signature compatibility
    :param features_extractor_class: Features extractor to use; it must return the token ids (as
        :class:`TokenIdsExtractor`, the default) or the SB3-preprocessed observation
        (e.g. ``FlattenExtractor``), from which token ids are decoded.
    :param features_extractor_kwargs: Keyword arguments to pass to the features extractor.
    :param share_features_extractor: If True, the features extractor is shared between the policy and
        value networks (it has no parameters by default, so this matters little).
    :param normalize_images: Unused (no image observations), kept for signature compatibility
    :param optimizer_class: The optimizer to use, ``th.optim.Adam`` by default
    :param optimizer_kwargs: Additional keyword arguments, excluding the learning rate, to pass to the optimizer
    :param lstm_hidden_size: Number of hidden units for each LSTM layer (default 128).
    :param n_lstm_layers: Number of LSTM layers (default 2).
    :param shared_lstm: Whether the LSTM is shared between the actor and the critic
        (in that case, only the actor gradient is used). Default False.
    :param enable_critic_lstm: Use a separate embedding and LSTM for the critic (default True).
    :param lstm_kwargs: Additional keyword arguments to pass to the LSTM constructors (e.g. ``dropout``);
        ``batch_first``, ``bidirectional`` and ``proj_size`` are not supported by sb3-contrib's rollout
        buffer and state handling and raise a ValueError.
    :param embedding_dim: Size of the token embeddings, the LSTM input size (default 64: half the
        hidden size, plenty for small vocabularies, cheap).
    :param tie_embeddings: Compute the logits with the input token embedding (:class:`TiedOutput`,
        default True) instead of an independent linear layer.
    :param lstm_forget_bias: Initial bias of the LSTMs' forget gates (default 1.0, as recommended by
        Jozefowicz et al., 2015; PyTorch's default starts near 0, which makes the memory of earlier
        tokens fade within a few steps).
    """

    def __init__(
        self,
        observation_space: spaces.Space,
        action_space: spaces.Space,
        lr_schedule: Schedule,
        net_arch: list[int] | dict[str, list[int]] | None = None,
        activation_fn: type[nn.Module] = nn.Tanh,
        ortho_init: bool = True,
        use_sde: bool = False,
        log_std_init: float = 0.0,
        full_std: bool = True,
        use_expln: bool = False,
        squash_output: bool = False,
        features_extractor_class: type[BaseFeaturesExtractor] = TokenIdsExtractor,
        features_extractor_kwargs: dict[str, Any] | None = None,
        share_features_extractor: bool = True,
        normalize_images: bool = True,
        optimizer_class: type[th.optim.Optimizer] = th.optim.Adam,
        optimizer_kwargs: dict[str, Any] | None = None,
        lstm_hidden_size: int = 128,
        n_lstm_layers: int = 2,
        shared_lstm: bool = False,
        enable_critic_lstm: bool = True,
        lstm_kwargs: dict[str, Any] | None = None,
        embedding_dim: int = 64,
        lstm_forget_bias: float = 1.0,
        tie_embeddings: bool = True,
    ):
        vocab_size, max_length = token_space_sizes(observation_space, action_space)
        if use_sde:
            raise ValueError("use_sde=True is not supported: SLMLstmPolicy has a discrete (token) action space")
        for name, value in (
            ("embedding_dim", embedding_dim),
            ("lstm_hidden_size", lstm_hidden_size),
            ("n_lstm_layers", n_lstm_layers),
        ):
            if int(value) != value or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        lstm_kwargs = dict(lstm_kwargs or {})
        if lstm_kwargs.get("batch_first", False):
            raise ValueError("lstm_kwargs: batch_first=True is not supported (sb3-contrib feeds (time, batch, features))")
        if lstm_kwargs.get("bidirectional", False):
            raise ValueError("lstm_kwargs: bidirectional=True is not supported (a language model must be causal)")
        if lstm_kwargs.get("proj_size", 0):
            raise ValueError("lstm_kwargs: proj_size is not supported (sb3-contrib stores h and c with hidden_size)")

        self.vocab_size = vocab_size
        self.max_length = max_length
        self.pad_id = vocab_size
        self.bos_id = vocab_size + 1
        self.embedding_dim = int(embedding_dim)
        self.lstm_hidden_size = int(lstm_hidden_size)
        self.n_lstm_layers = int(n_lstm_layers)

        super().__init__(
            observation_space,
            action_space,
            lr_schedule,
            [] if net_arch is None else net_arch,
            activation_fn,
            ortho_init,
            use_sde,
            log_std_init,
            full_std,
            use_expln,
            squash_output,
            features_extractor_class,
            features_extractor_kwargs,
            share_features_extractor,
            normalize_images,
            optimizer_class,
            optimizer_kwargs,
            self.lstm_hidden_size,
            self.n_lstm_layers,
            shared_lstm,
            enable_critic_lstm,
            lstm_kwargs,
        )

        # The parent built LSTMs whose input is the features extractor's output (L token ids):
        # replace them with LSTMs reading token embeddings.
        self.embedding = nn.Embedding(vocab_size + 2, self.embedding_dim, padding_idx=self.pad_id)
        self.lstm_actor = nn.LSTM(
            self.embedding_dim, self.lstm_hidden_size, num_layers=self.n_lstm_layers, **self.lstm_kwargs
        )
        self.critic_embedding: nn.Embedding | None = None
        if self.lstm_critic is not None:
            self.critic_embedding = nn.Embedding(vocab_size + 2, self.embedding_dim, padding_idx=self.pad_id)
            self.lstm_critic = nn.LSTM(
                self.embedding_dim, self.lstm_hidden_size, num_layers=self.n_lstm_layers, **self.lstm_kwargs
            )
        if self.critic is not None:
            self.critic = BagOfTokensCritic(vocab_size, max_length, self.lstm_hidden_size, self.lstm_hidden_size)

        # Setup optimizer again, now that all parameters exist
        self.tie_embeddings = bool(tie_embeddings)
        if self.tie_embeddings:
            self.action_net = TiedOutput(self.action_net.in_features, self.embedding, vocab_size, ortho_init)
        self.lstm_forget_bias = float(lstm_forget_bias)
        for lstm in (self.lstm_actor, self.lstm_critic):
            if lstm is not None:
                set_forget_bias(lstm, self.lstm_forget_bias)

        self.optimizer = self.optimizer_class(self.parameters(), lr=lr_schedule(1), **self.optimizer_kwargs)

    def _build_mlp_extractor(self) -> None:
        # SB3's FlattenExtractor reports a numpy integer features_dim for MultiDiscrete spaces, which the
        # parent's (temporary) nn.LSTM(features_dim, ...) rejects: make it a Python int.
        self.features_dim = int(self.features_dim)
        super()._build_mlp_extractor()

    def _get_constructor_parameters(self) -> dict[str, Any]:
        data = super()._get_constructor_parameters()
        data.update(
            dict(
                share_features_extractor=self.share_features_extractor,
                lstm_hidden_size=self.lstm_hidden_size,
                n_lstm_layers=self.n_lstm_layers,
                shared_lstm=self.shared_lstm,
                enable_critic_lstm=self.enable_critic_lstm,
                lstm_kwargs=self.lstm_kwargs,
                embedding_dim=self.embedding_dim,
                lstm_forget_bias=self.lstm_forget_bias,
                tie_embeddings=self.tie_embeddings,
            )
        )
        return data

    def _embedding_for(self, lstm: nn.LSTM) -> nn.Embedding:
        if lstm is self.lstm_actor:
            return self.embedding
        if lstm is self.lstm_critic and self.critic_embedding is not None:
            return self.critic_embedding
        raise ValueError("_process_sequence: lstm must be the policy's lstm_actor or lstm_critic")

    def _process_sequence(  # type: ignore[override]
        self,
        features: th.Tensor,
        lstm_states: tuple[th.Tensor, th.Tensor],
        episode_starts: th.Tensor,
        lstm: nn.LSTM,
    ) -> tuple[th.Tensor, tuple[th.Tensor, th.Tensor]]:
        """
        Run the LSTM over a batch of steps, with prompt conditioning at episode starts (see the class doc).

        :param features: token ids, shape ``(n_seq * seq_len, L)`` (or SB3-preprocessed observations),
            sequence-major: the ``seq_len`` steps of sequence 0, then of sequence 1, ...
        :param lstm_states: hidden and cell states before the first step of each sequence,
            each of shape ``(n_lstm_layers, n_seq, lstm_hidden_size)``
        :param episode_starts: ``(n_seq * seq_len,)``, 1 where a new episode starts (state reset,
            BOS + whole sequence consumed)
        :param lstm: ``self.lstm_actor`` or ``self.lstm_critic``
        :return: LSTM output at each step ``(n_seq * seq_len, lstm_hidden_size)`` and the states after
            the last step of each sequence.
        """
        embedding = self._embedding_for(lstm)
        hidden, cell = lstm_states
        n_seq = hidden.shape[1]
        tokens = features_to_token_ids(features, self.vocab_size, self.max_length)
        batch_size = tokens.shape[0]
        if batch_size % n_seq != 0:
            raise ValueError(f"batch of {batch_size} steps cannot be split into {n_seq} sequences")
        seq_len = batch_size // n_seq
        device = tokens.device

        starts = (episode_starts.reshape(n_seq, seq_len) > 0.5).to(device)
        # number of tokens: the left-aligned prefix without padding
        lengths = (tokens != self.pad_id).long().cumprod(dim=1).sum(dim=1)  # (batch,)
        # last token s_{n-1}, or BOS for an empty sequence (so it is also the single token fed at an
        # episode start without prompt)
        last = tokens.gather(1, (lengths - 1).clamp(min=0).unsqueeze(1)).squeeze(1)
        last = th.where(lengths > 0, last, th.full_like(last, self.bos_id))
        starts_flat = starts.reshape(-1)
        prompted_start = starts_flat & (lengths > 0)
        if not bool(starts[:, 1:].any()) and not bool(prompted_start.any()):
            # Fast path: one token per step, resets only at the first step of sequences.
            keep = (~starts[:, 0]).to(hidden.dtype).view(1, n_seq, 1)
            inputs = embedding(last.view(n_seq, seq_len).transpose(0, 1))  # (seq_len, n_seq, emb)
            output, (h_n, c_n) = lstm(inputs, (hidden * keep, cell * keep))
            return output.transpose(0, 1).reshape(batch_size, -1), (h_n, c_n)

        # General path: cut sequences into segments at episode starts, lay out each step's token chunk
        # ([BOS, s_0..s_{n-1}] at an episode start, [s_{n-1}] otherwise) and run all segments at once.
        chunk = th.where(starts_flat, lengths + 1, th.ones_like(lengths))  # tokens fed at each step
        seg_start = starts.clone()
        seg_start[:, 0] = True
        seg_start_flat = seg_start.reshape(-1)
        seg_id = seg_start_flat.long().cumsum(0) - 1  # (batch,)
        seg_first_step = th.nonzero(seg_start_flat).squeeze(1)  # (n_seg,)
        n_seg = seg_first_step.shape[0]
        chunk_end = chunk.cumsum(0)
        chunk_begin = chunk_end - chunk  # exclusive prefix sum over the whole batch
        offset = chunk_begin - chunk_begin[seg_first_step][seg_id]  # position of the chunk in its segment
        seg_len = th.zeros(n_seg, dtype=th.long, device=device).index_add_(0, seg_id, chunk)

        n_tokens = int(chunk_end[-1])
        token_step = th.repeat_interleave(th.arange(batch_size, device=device), chunk)  # (n_tokens,)
        within = th.arange(n_tokens, device=device) - chunk_begin[token_step]  # index inside the chunk
        prompt_token = tokens[token_step, (within - 1).clamp(min=0, max=self.max_length - 1)]
        token_value = th.where(
            starts_flat[token_step],
            th.where(within == 0, th.full_like(prompt_token, self.bos_id), prompt_token),
            last[token_step],
        )
        grid = th.full((int(seg_len.max()), n_seg), self.pad_id, dtype=th.long, device=device)
        grid[offset[token_step] + within, seg_id[token_step]] = token_value

        seg_seq = seg_first_step // seq_len  # sequence of each segment
        seg_keep = (~starts_flat[seg_first_step]).to(hidden.dtype).view(1, n_seg, 1)
        h_0 = hidden[:, seg_seq] * seg_keep
        c_0 = cell[:, seg_seq] * seg_keep
        packed = pack_padded_sequence(embedding(grid), seg_len.cpu(), enforce_sorted=False)
        packed_output, (h_n, c_n) = lstm(packed, (h_0.contiguous(), c_0.contiguous()))
        output, _ = pad_packed_sequence(packed_output)  # (max_seg_len, n_seg, hidden)
        latent = output[offset + chunk - 1, seg_id]  # (batch, hidden)
        last_seg = seg_id.view(n_seq, seq_len)[:, -1]
        return latent, (h_n[:, last_seg], c_n[:, last_seg])

    def predict(
        self,
        observation: np.ndarray | dict[str, np.ndarray],
        state: tuple[np.ndarray, ...] | None = None,
        episode_start: np.ndarray | None = None,
        deterministic: bool = False,
    ) -> tuple[np.ndarray, tuple[np.ndarray, ...] | None]:
        """
        Get the next token(s) and the next LSTM states, see ``RecurrentActorCriticPolicy.predict``.

        Unlike sb3-contrib, when neither ``state`` nor ``episode_start`` is given the observation is
        treated as the first of an episode (zero state), so the policy conditions on the whole prompt.

        :param observation: token sequence(s), shape ``(L,)`` or ``(n_envs, L)``
        :param state: the last hidden and cell states of the actor LSTM (None: zero states)
        :param episode_start: whether each observation starts an episode
        :param deterministic: whether to return the most likely token instead of sampling
        :return: the tokens and the next LSTM states
        """
        if state is None and episode_start is None and not isinstance(observation, dict):
            observation = np.asarray(observation)
            n_envs = observation.shape[0] if self.is_vectorized_observation(observation) else 1
            episode_start = np.ones(n_envs, dtype=bool)
        return super().predict(observation, state, episode_start, deterministic)
