"""Layers the small language models share: the token-id features extractor, the tied output and
the bag-of-tokens critic."""

from __future__ import annotations

import torch as th
from gymnasium import spaces
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from torch import nn

from verl_sb3.tokens import features_to_token_ids, padded_after_end, token_space_sizes

#: :class:`BagOfTokensCritic` computes its first layer sparsely when ``V > SPARSE_BAG_RATIO * L``
#: (about where the sparse forward and backward pass become the cheaper one).
SPARSE_BAG_RATIO = 8


class TokenIdsExtractor(BaseFeaturesExtractor):
    """Features extractor that returns the token ids of the observation (as a float tensor).

    It holds no parameters: the embedding lives in the policy. Works on a Box of token ids and on
    the one-hot encoding SB3 makes from a ``MultiDiscrete([V + 1] * L)`` space.

    :param observation_space: the token-sequence observation space (see :func:`verl_sb3.tokens.token_space_sizes`).
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


class BagOfTokensCritic(nn.Module):
    """A feed-forward critic over the bag of tokens of the observed sequence.

    Features: which tokens occur, how often each occurs divided by ``L``, and the sequence length
    over ``L``, through an MLP with one tanh hidden layer. The number of distinct tokens, on which
    the value of a TextGen-v0 state depends, is linear in these features; the actor stays a
    language model, only the value estimate reads the sequence as a bag.

    The features are ``2 V + 1`` numbers of which at most ``2 L + 1`` are non-zero: for a large
    vocabulary (``V > SPARSE_BAG_RATIO * L``) the first layer sums the weight columns of the
    sequence's tokens (``embedding_bag``) instead of multiplying a dense ``(batch, 2 V + 1)``
    matrix. Both give the same function (to float rounding) with the same parameters.

    :param vocab_size: ``V``; id ``V`` is padding.
    :param max_length: ``L``.
    :param hidden_dim: width of the hidden layer.
    :param output_dim: output size (the latent size of the policy).
    """

    def __init__(self, vocab_size: int, max_length: int, hidden_dim: int, output_dim: int) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.max_length = max_length
        self.net = nn.Sequential(
            nn.Linear(2 * vocab_size + 1, hidden_dim), nn.Tanh(), nn.Linear(hidden_dim, output_dim)
        )

    def bag_of_tokens(self, features: th.Tensor) -> th.Tensor:
        """Token counts and the length, each over ``L``: shape ``(batch, V + 1)``."""
        tokens, lengths = padded_after_end(
            features_to_token_ids(features, self.vocab_size, self.max_length), self.vocab_size
        )
        counts = th.zeros(tokens.shape[0], self.vocab_size + 1, device=tokens.device)
        counts.scatter_add_(1, tokens, th.ones_like(tokens, dtype=counts.dtype))
        counts[:, self.vocab_size] = lengths
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
        tokens, _ = padded_after_end(features_to_token_ids(features, vocab_size, self.max_length), vocab_size)
        valid = tokens != vocab_size
        ordered = tokens.sort(dim=1).values  # padding (V) last
        distinct = th.ones_like(valid)
        distinct[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
        real = ordered != vocab_size
        count_weight = valid.to(layer.weight.dtype) / self.max_length
        columns = th.cat([th.where(real, ordered, 0), th.where(valid, tokens, 0) + vocab_size], dim=1)
        weights = th.cat([(distinct & real).to(count_weight.dtype), count_weight], dim=1)
        # embedding_bag wants the rows contiguous: the copy costs far less than the dense product
        hidden = nn.functional.embedding_bag(
            columns, layer.weight.T.contiguous(), per_sample_weights=weights, mode="sum"
        )
        length = count_weight.sum(dim=1, keepdim=True)
        return hidden + length * layer.weight[:, 2 * vocab_size] + layer.bias
