"""Token-sequence observations: their contract and the helpers every consumer shares.

A token-sequence observation holds the sequence so far, left-aligned, padded with the id ``V``
(the vocabulary size, one more than the largest token): ``Box(0, V, (L,), int)`` as TextGen-v0's,
or ``MultiDiscrete([V + 1] * L)``. The sequence ends at its first padding id; the action is the
next token, ``Discrete(V)``. The policies, the verification checks and the generation code read
sequences through these functions only.
"""

from __future__ import annotations

import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3.common.base_class import BaseAlgorithm


def token_space_sizes(observation_space: spaces.Space, action_space: spaces.Space | None = None) -> tuple[int, int]:
    """Vocabulary size ``V`` and maximum sequence length ``L`` of a token-sequence observation space.

    :param observation_space: ``Box(low=0, high=V, shape=(L,), dtype=<integer>)`` or ``MultiDiscrete([V + 1] * L)``.
    :param action_space: if given, it must be ``Discrete(V)``.
    :return: ``(V, L)``.
    :raises ValueError: naming the problem when a space does not follow this contract.
    """
    if isinstance(observation_space, spaces.Box):
        vocab_size, max_length = _box_sizes(observation_space)
    elif isinstance(observation_space, spaces.MultiDiscrete):
        vocab_size, max_length = _multi_discrete_sizes(observation_space)
    else:
        raise ValueError(
            "observation space must be Box(low=0, high=V, shape=(L,), dtype=int) or MultiDiscrete([V + 1] * L), "
            f"got {observation_space}"
        )
    if action_space is not None:
        if not isinstance(action_space, spaces.Discrete):
            raise ValueError(
                f"action space must be Discrete(V) with V={vocab_size} (the next token), got {action_space}"
            )
        if int(action_space.n) != vocab_size or int(action_space.start) != 0:
            raise ValueError(
                f"action space must be Discrete({vocab_size}) starting at 0 to match the observation space's "
                f"vocabulary size V={vocab_size}, got {action_space}"
            )
    return vocab_size, max_length


def _box_sizes(space: spaces.Box) -> tuple[int, int]:
    shape = space.shape
    if len(shape) != 1 or shape[0] < 1:
        raise ValueError(f"observation space must be a 1-D Box of token ids with shape (L,), L >= 1; got shape {shape}")
    if not np.issubdtype(space.dtype, np.integer):
        raise ValueError(f"observation space Box must have an integer dtype (token ids), got dtype {space.dtype}")
    if not np.all(space.low == 0):
        raise ValueError(f"observation space Box must have low=0 everywhere, got low={space.low}")
    vocab_size = int(space.high.flat[0])
    if not np.all(space.high == vocab_size) or vocab_size < 1:
        raise ValueError(
            f"observation space Box must have the same high=V >= 1 (the padding id) at every position, got "
            f"high={space.high}"
        )
    return vocab_size, int(shape[0])


def _multi_discrete_sizes(space: spaces.MultiDiscrete) -> tuple[int, int]:
    nvec = np.asarray(space.nvec)
    if nvec.ndim != 1 or nvec.size < 1:
        raise ValueError(f"observation space MultiDiscrete must be 1-D, got nvec of shape {nvec.shape}")
    if not np.all(nvec == nvec[0]) or int(nvec[0]) < 2:
        raise ValueError(f"observation space MultiDiscrete must be [V + 1] * L with V >= 1, got nvec={nvec}")
    start = getattr(space, "start", None)
    if start is not None and np.any(np.asarray(start) != 0):
        raise ValueError(f"observation space MultiDiscrete must start at 0, got start={start}")
    return int(nvec[0]) - 1, int(nvec.size)


def require_token_sequences(argument: str, model: BaseAlgorithm) -> int:
    """The number of tokens ``n``, or a ValueError naming ``argument`` unless ``model`` observes
    token sequences as TextGen-v0's (``Discrete(n)`` actions, a 1-D integer ``Box`` from 0 to ``n``)
    and sees the ids themselves (no ``VecNormalize(norm_obs=True)``)."""
    obs, actions = model.observation_space, model.action_space
    if not (
        isinstance(actions, spaces.Discrete)
        and isinstance(obs, spaces.Box)
        and len(obs.shape) == 1
        and np.issubdtype(obs.dtype, np.integer)
        and np.all(obs.low == 0)
        and np.all(obs.high == actions.n)
    ):
        raise ValueError(
            f"{argument}: needs Discrete(n) actions and token-sequence observations padded with the id n "
            f"(a 1-D integer Box from 0 to n, as TextGen-v0's), got {actions} and {obs}"
        )
    normalizer = model.get_vec_normalize_env()
    if normalizer is not None and normalizer.norm_obs:
        raise ValueError(f"{argument}: needs the token ids themselves; VecNormalize(norm_obs=True) rescales them")
    return int(actions.n)


def features_to_token_ids(features: th.Tensor, vocab_size: int, max_length: int) -> th.Tensor:
    """Token ids (``long``, shape ``(batch, L)``, values in ``0..V``) from preprocessed observations.

    Accepts token ids as floats (SB3's ``preprocess_obs`` on a Box: rounded, not truncated, then
    clipped to ``0..V``) or the one-hot blocks SB3 makes from a ``MultiDiscrete([V + 1] * L)``
    observation (decoded with an argmax over each block).

    :param features: tensor of shape ``(batch, L)`` or ``(batch, L * (V + 1))``.
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


def real_tokens(tokens: th.Tensor, pad_id: int) -> th.Tensor:
    """``(batch, L)`` booleans: True on each sequence's tokens, the ids ``< pad_id`` before its first padding."""
    return (tokens < pad_id).long().cumprod(dim=1).bool()


def sequence_lengths(tokens: th.Tensor, pad_id: int) -> th.Tensor:
    """The number of tokens of each sequence (up to its first padding id)."""
    return real_tokens(tokens, pad_id).sum(dim=1)


def last_tokens(tokens: th.Tensor, lengths: th.Tensor, empty: int) -> th.Tensor:
    """Each sequence's last token, or ``empty`` for a sequence of length 0."""
    last = tokens.gather(1, (lengths - 1).clamp(min=0)[:, None]).squeeze(1)
    return th.where(lengths > 0, last, th.full_like(last, empty))


def padded_after_end(tokens: th.Tensor, pad_id: int) -> tuple[th.Tensor, th.Tensor]:
    """``tokens`` with every id from each sequence's first padding on set to ``pad_id``, and the lengths."""
    real = real_tokens(tokens, pad_id)
    return th.where(real, tokens, th.full_like(tokens, pad_id)), real.sum(dim=1)
