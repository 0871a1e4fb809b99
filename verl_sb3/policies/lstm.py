"""A small LSTM language model as an sb3-contrib recurrent actor-critic policy."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch as th
from gymnasium import spaces
from sb3_contrib.common.recurrent.policies import RecurrentActorCriticPolicy
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from stable_baselines3.common.type_aliases import Schedule
from torch import nn

from verl_sb3._validation import require_int
from verl_sb3.policies.layers import BagOfTokensCritic, TiedOutput, TokenIdsExtractor, set_forget_bias
from verl_sb3.policies.prompted_lstm import prompted_lstm
from verl_sb3.tokens import features_to_token_ids, token_space_sizes


class SLMLstmPolicy(RecurrentActorCriticPolicy):
    """A small language model as a recurrent actor-critic policy for ``RecurrentPPO``.

    Network: token embedding (``embedding_dim``) -> ``n_lstm_layers``-layer LSTM
    (``lstm_hidden_size``) -> ``action_net``: logits over the ``V`` tokens, and a value head.
    ``net_arch`` defaults to ``[]`` (linear heads on the LSTM output). With ``ortho_init``
    (default) ``action_net`` starts with gain 0.01: the initial policy is nearly uniform.

    Observations: token sequences (:mod:`verl_sb3.tokens`), ``Box(0, V, (L,), int)`` or
    ``MultiDiscrete([V + 1] * L)``; actions ``Discrete(V)``. The embedding table has ``V + 2``
    rows: tokens, padding ``V`` (a zero, untrained row) and a learned beginning-of-sequence ``V + 1``.

    **The whole prompt is read.** At an episode start the LSTM starts from zero and reads BOS
    followed by every token of the observation, later it reads only the newest token from its
    carried state (:func:`verl_sb3.policies.prompted_lstm.prompted_lstm`, which every caller of
    ``_process_sequence`` goes through: collection, bootstrap values, training). ``predict()``
    without ``state`` and ``episode_start`` treats the observation as an episode's first.

    **Critic.** By default (``enable_critic_lstm=True``) a separate language model of the same
    shape (``critic_embedding``, ``lstm_critic``); with ``shared_lstm=True`` it reads the actor's
    LSTM output, detached; with both off, a :class:`verl_sb3.policies.BagOfTokensCritic`.

    The arguments up to ``lstm_kwargs`` are sb3-contrib's ``RecurrentActorCriticPolicy``'s
    (``use_sde`` must be False; ``lstm_kwargs`` may not set ``batch_first``, ``bidirectional`` or
    ``proj_size``, which sb3-contrib's buffers cannot hold). The others:

    :param embedding_dim: size of the token embeddings, the LSTM input size.
    :param lstm_forget_bias: initial bias of the LSTMs' forget gates (1.0, as Jozefowicz et al.
        2015 recommend; PyTorch's default starts near 0, so the memory of earlier tokens fades fast).
    :param tie_embeddings: compute the logits with the input token embedding (:class:`TiedOutput`)
        instead of an independent linear layer.
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
        self.vocab_size, self.max_length = vocab_size, max_length
        self.pad_id, self.bos_id = vocab_size, vocab_size + 1
        self.embedding_dim = require_int("embedding_dim", embedding_dim, 1)
        self.lstm_hidden_size = require_int("lstm_hidden_size", lstm_hidden_size, 1)
        self.n_lstm_layers = require_int("n_lstm_layers", n_lstm_layers, 1)
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
            _checked_lstm_kwargs(lstm_kwargs),
        )
        self.tie_embeddings = bool(tie_embeddings)
        self.lstm_forget_bias = float(lstm_forget_bias)
        self._build_language_model(ortho_init)
        self.optimizer = self.optimizer_class(self.parameters(), lr=lr_schedule(1), **self.optimizer_kwargs)

    def _build_language_model(self, ortho_init: bool) -> None:
        """Replace the parent's LSTMs (which read the features extractor's L token ids) by LSTMs
        reading token embeddings; the critic and the output layer to match."""
        vocab_size, width, hidden = self.vocab_size, self.embedding_dim, self.lstm_hidden_size
        self.embedding = nn.Embedding(vocab_size + 2, width, padding_idx=self.pad_id)
        self.lstm_actor = nn.LSTM(width, hidden, num_layers=self.n_lstm_layers, **self.lstm_kwargs)
        self.critic_embedding: nn.Embedding | None = None
        if self.lstm_critic is not None:
            self.critic_embedding = nn.Embedding(vocab_size + 2, width, padding_idx=self.pad_id)
            self.lstm_critic = nn.LSTM(width, hidden, num_layers=self.n_lstm_layers, **self.lstm_kwargs)
        if self.critic is not None:
            self.critic = BagOfTokensCritic(vocab_size, self.max_length, hidden, hidden)
        if self.tie_embeddings:
            self.action_net = TiedOutput(self.action_net.in_features, self.embedding, vocab_size, ortho_init)
        for lstm in (self.lstm_actor, self.lstm_critic):
            if lstm is not None:
                set_forget_bias(lstm, self.lstm_forget_bias)

    def _build_mlp_extractor(self) -> None:
        # SB3's FlattenExtractor reports a numpy integer features_dim for MultiDiscrete spaces, which the
        # parent's (temporary) nn.LSTM(features_dim, ...) rejects: make it a Python int.
        self.features_dim = int(self.features_dim)
        super()._build_mlp_extractor()

    def _get_constructor_parameters(self) -> dict[str, Any]:
        data = super()._get_constructor_parameters()
        data.update(
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
        return data

    def _process_sequence(  # type: ignore[override]
        self,
        features: th.Tensor,
        lstm_states: tuple[th.Tensor, th.Tensor],
        episode_starts: th.Tensor,
        lstm: nn.LSTM,
    ) -> tuple[th.Tensor, tuple[th.Tensor, th.Tensor]]:
        """The LSTM over a batch of steps with the whole prompt read at episode starts (:func:`prompted_lstm`)."""
        if lstm is self.lstm_actor:
            embedding = self.embedding
        elif lstm is self.lstm_critic and self.critic_embedding is not None:
            embedding = self.critic_embedding
        else:
            raise ValueError("_process_sequence: lstm must be the policy's lstm_actor or lstm_critic")
        tokens = features_to_token_ids(features, self.vocab_size, self.max_length)
        return prompted_lstm(lstm, embedding, tokens, lstm_states, episode_starts, self.bos_id)

    def predict(
        self,
        observation: np.ndarray | dict[str, np.ndarray],
        state: tuple[np.ndarray, ...] | None = None,
        episode_start: np.ndarray | None = None,
        deterministic: bool = False,
    ) -> tuple[np.ndarray, tuple[np.ndarray, ...] | None]:
        """The next token(s) and LSTM states, as ``RecurrentActorCriticPolicy.predict``; without
        ``state`` and ``episode_start`` the observation starts an episode (zero state, whole prompt read)."""
        if state is None and episode_start is None and not isinstance(observation, dict):
            observation = np.asarray(observation)
            n_envs = observation.shape[0] if self.is_vectorized_observation(observation) else 1
            episode_start = np.ones(n_envs, dtype=bool)
        return super().predict(observation, state, episode_start, deterministic)


def _checked_lstm_kwargs(lstm_kwargs: dict[str, Any] | None) -> dict[str, Any]:
    lstm_kwargs = dict(lstm_kwargs or {})
    if lstm_kwargs.get("batch_first", False):
        raise ValueError("lstm_kwargs: batch_first=True is not supported (sb3-contrib feeds (time, batch, features))")
    if lstm_kwargs.get("bidirectional", False):
        raise ValueError("lstm_kwargs: bidirectional=True is not supported (a language model must be causal)")
    if lstm_kwargs.get("proj_size", 0):
        raise ValueError("lstm_kwargs: proj_size is not supported (sb3-contrib stores h and c with hidden_size)")
    return lstm_kwargs
