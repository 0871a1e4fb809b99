"""A small causal transformer language model as a (non-recurrent) SB3 actor-critic policy.

:class:`SLMTransformerPolicy` plugs into SB3's ``PPO`` and :class:`verl_sb3.VerifiedPPO`
(``VerifiedPPO(SLMTransformerPolicy, env)``) for token-sequence observations
(:mod:`verl_sb3.tokens`). Unlike :class:`verl_sb3.policies.SLMLstmPolicy` it carries no state
between steps: every step reads the whole observed sequence.
"""

from __future__ import annotations

from typing import Any

import torch as th
from gymnasium import spaces
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from stable_baselines3.common.type_aliases import Schedule
from torch import nn

from verl_sb3._validation import require_int, require_number
from verl_sb3.policies.layers import BagOfTokensCritic, TiedOutput, TokenIdsExtractor
from verl_sb3.tokens import features_to_token_ids, padded_after_end, token_space_sizes

__all__ = ["CausalTransformerLM", "SLMTransformerPolicy", "TransformerActorCritic"]

#: The critics of :class:`SLMTransformerPolicy` (see its docstring).
CRITICS = ("bag_of_tokens", "shared", "transformer")


class CausalTransformerLM(nn.Module):
    """A causal transformer over ``[BOS, s_0, ..., s_{n-1}]``, read at its last position.

    Token embedding (``V + 2`` rows: tokens ``0..V-1``, padding ``V`` (a zero, untrained row),
    BOS ``V + 1``) plus a learned positional embedding (``L + 1`` positions), then a pre-LN
    ``nn.TransformerEncoder`` with a causal mask and a final LayerNorm. The output is the hidden
    state at position ``n`` (the last token; BOS for an empty sequence), so it depends only on the
    ``n`` real tokens: the sequence ends at the first padding id, and with the causal mask no
    position up to ``n`` attends to a later one (padding, or anything after it).

    The batch is cut to the longest sequence in it (``n_max + 1`` positions): when the environments
    run in step, as TextGen-v0's do, a step of data collection costs the length so far, not ``L``.

    :param vocab_size: ``V``; id ``V`` is padding.
    :param max_length: ``L``.
    :param d_model: width of the embeddings and of the residual stream.
    :param n_layers: number of encoder layers.
    :param n_heads: attention heads per layer; must divide ``d_model``.
    :param ff_dim: hidden width of the feed-forward blocks.
    :param dropout: dropout of the encoder layers.
    """

    def __init__(
        self,
        vocab_size: int,
        max_length: int,
        d_model: int = 64,
        n_layers: int = 2,
        n_heads: int = 4,
        ff_dim: int = 128,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.max_length = max_length
        self.pad_id = vocab_size
        self.bos_id = vocab_size + 1
        self.embedding = nn.Embedding(vocab_size + 2, d_model, padding_idx=self.pad_id)
        self.position = nn.Embedding(max_length + 1, d_model)
        layer = nn.TransformerEncoderLayer(
            d_model, n_heads, ff_dim, dropout, activation="gelu", batch_first=True, norm_first=True
        )
        # enable_nested_tensor only applies to key padding masks, which are not used (see the class doc)
        self.encoder = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        self.final_norm = nn.LayerNorm(d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """PyTorch's default initialisation: embeddings N(0, 1) (padding row 0), the encoder's own init."""
        for embedding in (self.embedding, self.position):
            nn.init.normal_(embedding.weight)
        with th.no_grad():
            self.embedding.weight[self.pad_id].zero_()
        for layer in self.encoder.layers:
            layer.self_attn._reset_parameters()
            for module in (layer.linear1, layer.linear2, layer.norm1, layer.norm2):
                module.reset_parameters()
        self.final_norm.reset_parameters()

    def token_ids(self, features: th.Tensor) -> tuple[th.Tensor, th.Tensor]:
        """Token ids (everything from the first padding on set to padding) and lengths, from features."""
        return padded_after_end(features_to_token_ids(features, self.vocab_size, self.max_length), self.pad_id)

    def forward(self, features: th.Tensor) -> th.Tensor:
        """Hidden state at the last real position: ``(batch, d_model)``. Only the batch's maximal
        sequences are encoded (:meth:`shared_prefixes`).

        :param features: token ids (``(batch, L)``, any dtype) or SB3-preprocessed observations.
        """
        tokens, lengths = self.token_ids(features)
        if tokens.shape[0] == 0:
            return self.final_norm(self.embedding.weight.new_zeros(0, self.embedding.embedding_dim))
        rows, positions = self.shared_prefixes(tokens, lengths)
        hidden = self.encode(tokens[rows])
        return self.final_norm(hidden[positions])

    def encode(self, tokens: th.Tensor) -> th.Tensor:
        """Hidden states of ``[BOS, tokens]`` at every position up to the longest sequence: ``(n, width, d_model)``."""
        n_rows = tokens.shape[0]
        lengths = (tokens != self.pad_id).sum(dim=1)
        width = int(lengths.max()) + 1 if n_rows else 1  # BOS + the longest sequence
        bos = th.full((n_rows, 1), self.bos_id, dtype=tokens.dtype, device=tokens.device)
        inputs = th.cat([bos, tokens[:, : width - 1]], dim=1)
        hidden = self.embedding(inputs) + self.position(th.arange(width, device=tokens.device))
        mask = nn.Transformer.generate_square_subsequent_mask(width, device=tokens.device, dtype=hidden.dtype)
        return self.encoder(hidden, mask=mask, is_causal=True)

    @staticmethod
    def shared_prefixes(tokens: th.Tensor, lengths: th.Tensor) -> tuple[th.Tensor, tuple[th.Tensor, th.Tensor]]:
        """The rows to encode and, for every sequence, where its output lies in their encoding.

        A causal model's output at position ``n`` of a sequence is its output for the sequence's first
        ``n`` tokens, so a batch needs encoding only for its *maximal* sequences (those that are no
        other's prefix): a PPO minibatch holds several steps of the same episodes, all prefixes of
        the longest one. Exact (the outputs are the same functions of the same tokens), in tensor
        operations: the distinct sequences sorted lexicographically (padding first) put every
        sequence right before its extensions, so a sequence is maximal unless it is a prefix of the
        next one, and is otherwise a prefix of the first maximal sequence after it.

        :param tokens: ``(batch, L)`` token ids, padding after each sequence's ``lengths`` tokens.
        :param lengths: ``(batch,)`` sequence lengths.
        :return: indices of the rows to encode, and ``(row among them, position)`` for every sequence.
        """
        keys = th.where(th.arange(tokens.shape[1], device=tokens.device) < lengths.unsqueeze(1), tokens, -1)
        distinct, inverse = th.unique(keys, dim=0, return_inverse=True)  # lexicographic, -1 (padding) first
        n_distinct = distinct.shape[0]
        prefix_of_next = ((distinct[:-1] == distinct[1:]) | (distinct[:-1] == -1)).all(dim=1)
        maximal = th.cat([~prefix_of_next, prefix_of_next.new_ones(1)])
        index = th.arange(n_distinct, device=tokens.device)
        # the first maximal sequence at or after each distinct sequence: a reversed running minimum
        following = th.where(maximal, index, n_distinct).flip(0).cummin(0).values.flip(0)
        slot = maximal.long().cumsum(0) - 1  # position of each maximal sequence among them
        # a representative batch row of every maximal sequence
        first_row = th.full((n_distinct,), tokens.shape[0], dtype=th.long, device=tokens.device)
        first_row.scatter_reduce_(0, inverse, th.arange(tokens.shape[0], device=tokens.device), "amin")
        return first_row[maximal], (slot[following[inverse]], lengths)


class TransformerActorCritic(nn.Module):
    """The ``mlp_extractor`` of :class:`SLMTransformerPolicy`: actor and critic latents from token ids.

    :param actor: the actor's language model.
    :param critic: ``"bag_of_tokens"``, ``"shared"`` or ``"transformer"`` (see :class:`SLMTransformerPolicy`).
    :param critic_hidden_dim: width of the bag-of-tokens critic's hidden layer and latent.
    :param critic_lm: the critic's own language model (``critic="transformer"`` only).
    """

    def __init__(
        self,
        actor: CausalTransformerLM,
        critic: str = "bag_of_tokens",
        critic_hidden_dim: int = 128,
        critic_lm: CausalTransformerLM | None = None,
    ) -> None:
        super().__init__()
        self.actor = actor
        self.critic_kind = critic
        d_model = actor.embedding.embedding_dim
        self.latent_dim_pi = d_model
        self.bag_critic: BagOfTokensCritic | None = None
        self.critic_lm: CausalTransformerLM | None = None
        if critic == "bag_of_tokens":
            self.bag_critic = BagOfTokensCritic(
                actor.vocab_size, actor.max_length, critic_hidden_dim, critic_hidden_dim
            )
            self.latent_dim_vf = critic_hidden_dim
        elif critic == "transformer":
            if critic_lm is None:
                raise ValueError("critic='transformer' needs critic_lm")
            self.critic_lm = critic_lm
            self.latent_dim_vf = d_model
        else:
            self.latent_dim_vf = d_model

    def forward(self, features: th.Tensor) -> tuple[th.Tensor, th.Tensor]:
        latent_pi = self.forward_actor(features)
        latent_vf = latent_pi if self.critic_kind == "shared" else self.forward_critic(features)
        return latent_pi, latent_vf

    def forward_actor(self, features: th.Tensor) -> th.Tensor:
        return self.actor(features)

    def forward_critic(self, features: th.Tensor) -> th.Tensor:
        if self.bag_critic is not None:
            return self.bag_critic(features)
        if self.critic_lm is not None:
            return self.critic_lm(features)
        return self.actor(features)


class SLMTransformerPolicy(ActorCriticPolicy):
    """A small causal transformer language model as an actor-critic policy for ``PPO`` / ``VerifiedPPO``.

    Network (:class:`CausalTransformerLM`): token embedding plus learned positional embedding of
    ``[BOS, s_0, ..., s_{n-1}]`` -> ``n_layers`` pre-LN encoder layers (``d_model``, ``n_heads``,
    ``ff_dim``, GELU, causal mask) -> final LayerNorm, read at the last real position (BOS when the
    sequence is empty) -> ``action_net``: logits over the ``V`` tokens. With ``tie_embeddings``
    (default) ``action_net`` is a :class:`verl_sb3.policies.TiedOutput` on the input embedding. The
    policy is not recurrent: each step reads the whole observation, so a prompt is always read
    whole, and the logits depend only on the real tokens (never on padding or on what follows it).

    Observations (see :func:`verl_sb3.tokens.token_space_sizes`): ``Box(0, V, (L,), int)`` holding
    the token sequence so far, left-aligned, padded with ``V``; ``MultiDiscrete([V + 1] * L)`` is also
    accepted. SB3 hands them over as floats (or one-hot blocks): they are decoded back to ids with
    :func:`verl_sb3.tokens.features_to_token_ids`. Action space: ``Discrete(V)``.

    **Critic** (``critic``):

    - ``"bag_of_tokens"`` (default): a :class:`verl_sb3.policies.BagOfTokensCritic` (which tokens
      occur, how often, the length, then a tanh MLP of width ``critic_hidden_dim``) and a linear
      value head. The value loss never touches the language model;
    - ``"shared"``: the value head reads the actor's latent, and the value loss trains the
      language model too (SB3's usual shared network);
    - ``"transformer"``: a second :class:`CausalTransformerLM` of the same shape.

    **Initialisation.** PyTorch's defaults: embeddings N(0, 1) (as the LSTM policy's; with GPT-2's
    N(0, 0.02) the tied logits start tiny), the encoder's own initialisation (SB3's orthogonal
    initialisation is not applied to it). With ``ortho_init`` (default) the heads and the
    bag-of-tokens MLP are initialised as SB3 does: ``action_net`` with gain 0.01, so the initial
    policy is nearly uniform over tokens.

    **Cost.** A batch is encoded only up to its longest sequence and only its maximal sequences
    (:meth:`CausalTransformerLM.shared_prefixes`), which is exact.

    The arguments up to ``optimizer_kwargs`` are SB3's ``ActorCriticPolicy``'s (``net_arch`` must
    be None or empty, ``use_sde`` False). The others:

    :param d_model: Width of the embeddings and of the transformer (default 64).
    :param n_layers: Number of encoder layers (default 2).
    :param n_heads: Attention heads per layer (default 4); must divide ``d_model``.
    :param ff_dim: Hidden width of the feed-forward blocks (default 128).
    :param dropout: Dropout of the encoder layers, in [0, 1) (default 0: the logits collected during
        a rollout are then those PPO trains on, to float rounding).
    :param tie_embeddings: Compute the logits with the input token embedding (default True) instead of
        an independent linear layer.
    :param critic: ``"bag_of_tokens"`` (default), ``"shared"`` or ``"transformer"``, see above.
    :param critic_hidden_dim: Width of the bag-of-tokens critic (default 128).
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
        d_model: int = 64,
        n_layers: int = 2,
        n_heads: int = 4,
        ff_dim: int = 128,
        dropout: float = 0.0,
        tie_embeddings: bool = True,
        critic: str = "bag_of_tokens",
        critic_hidden_dim: int = 128,
    ):
        vocab_size, max_length = token_space_sizes(observation_space, action_space)
        if use_sde:
            raise ValueError("use_sde=True is not supported: SLMTransformerPolicy has a discrete (token) action space")
        if net_arch:
            raise ValueError(
                f"net_arch: not used by SLMTransformerPolicy (the actor is the transformer, the critic's width is "
                f"critic_hidden_dim); pass None, got {net_arch!r}"
            )
        self.vocab_size, self.max_length = vocab_size, max_length
        self.d_model = require_int("d_model", d_model, 1)
        self.n_layers = require_int("n_layers", n_layers, 1)
        self.n_heads = require_int("n_heads", n_heads, 1)
        self.ff_dim = require_int("ff_dim", ff_dim, 1)
        self.critic_hidden_dim = require_int("critic_hidden_dim", critic_hidden_dim, 1)
        if d_model % n_heads != 0:
            raise ValueError(f"d_model must be divisible by n_heads, got d_model={d_model}, n_heads={n_heads}")
        self.dropout = require_number("dropout", dropout, 0.0, 1.0, open_high=True)
        if critic not in CRITICS:
            raise ValueError(f"critic must be one of {', '.join(map(repr, CRITICS))}, got {critic!r}")
        self.critic = critic
        self.tie_embeddings = bool(tie_embeddings)

        super().__init__(
            observation_space,
            action_space,
            lr_schedule,
            [],
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
        )

    def _make_lm(self) -> CausalTransformerLM:
        return CausalTransformerLM(
            self.vocab_size, self.max_length, self.d_model, self.n_layers, self.n_heads, self.ff_dim, self.dropout
        )

    def _build_mlp_extractor(self) -> None:
        self.mlp_extractor = TransformerActorCritic(
            self._make_lm(),
            self.critic,
            self.critic_hidden_dim,
            self._make_lm() if self.critic == "transformer" else None,
        ).to(self.device)

    def _build(self, lr_schedule: Schedule) -> None:
        """SB3's build (heads, orthogonal init, optimizer), then the transformer's own init and the tied output."""
        super()._build(lr_schedule)
        # SB3's orthogonal init (gain sqrt(2)) went through the whole mlp_extractor: give the language
        # models their own initialisation back.
        for lm in (self.mlp_extractor.actor, self.mlp_extractor.critic_lm):
            if lm is not None:
                lm.reset_parameters()
        if self.tie_embeddings:
            self.action_net = TiedOutput(
                self.d_model, self.mlp_extractor.actor.embedding, self.vocab_size, self.ortho_init
            )
        self.optimizer = self.optimizer_class(self.parameters(), lr=lr_schedule(1), **self.optimizer_kwargs)

    @property
    def embedding(self) -> nn.Embedding:
        """The actor's input token embedding (``V + 2`` rows; the output's when tied)."""
        return self.mlp_extractor.actor.embedding

    def _get_constructor_parameters(self) -> dict[str, Any]:
        data = super()._get_constructor_parameters()
        data.update(
            share_features_extractor=self.share_features_extractor,
            d_model=self.d_model,
            n_layers=self.n_layers,
            n_heads=self.n_heads,
            ff_dim=self.ff_dim,
            dropout=self.dropout,
            tie_embeddings=self.tie_embeddings,
            critic=self.critic,
            critic_hidden_dim=self.critic_hidden_dim,
        )
        return data
