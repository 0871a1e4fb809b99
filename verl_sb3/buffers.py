"""Rollout buffers that remember their last minibatch's samples.

Figures computed once on the whole rollout (the reference policy's log-probabilities, for the
KL loss) are laid out as each minibatch by :meth:`SampleIndices.minibatch_rows`; SB3's buffers
otherwise never say which samples a minibatch holds.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch as th
from sb3_contrib.common.recurrent.buffers import RecurrentDictRolloutBuffer, RecurrentRolloutBuffer
from stable_baselines3.common.buffers import DictRolloutBuffer, RolloutBuffer


class SampleIndices:
    """A rollout buffer mixin: ``sample_indices`` holds the rows (environment-major, as ``get()``
    flattens the rollout) of the minibatch last returned."""

    sample_indices: np.ndarray | None = None

    def _get_samples(self, batch_inds: np.ndarray, *args: Any, **kwargs: Any) -> Any:
        samples = super()._get_samples(batch_inds, *args, **kwargs)
        self.sample_indices = batch_inds
        return samples

    def minibatch_rows(self, values: np.ndarray) -> th.Tensor:
        """``values`` (one row per sample of the rollout, environment-major) for the last minibatch."""
        return self.to_torch(values[self.sample_indices])


class RecurrentSampleIndices(SampleIndices):
    """For recurrent buffers, whose minibatches are padded sequences: rows laid out and padded alike."""

    def minibatch_rows(self, values: np.ndarray) -> th.Tensor:
        rows = values[self.sample_indices]
        if rows.ndim == 1:
            return self.pad_and_flatten(rows)
        return self.pad(rows).reshape(-1, *rows.shape[1:])  # set by the last _get_samples


class IndexedRolloutBuffer(SampleIndices, RolloutBuffer):
    pass


class IndexedDictRolloutBuffer(SampleIndices, DictRolloutBuffer):
    pass


class IndexedRecurrentRolloutBuffer(RecurrentSampleIndices, RecurrentRolloutBuffer):
    pass


class IndexedRecurrentDictRolloutBuffer(RecurrentSampleIndices, RecurrentDictRolloutBuffer):
    pass


#: SB3's and sb3-contrib's buffer classes and their indexed twins.
INDEXED = {
    RolloutBuffer: IndexedRolloutBuffer,
    DictRolloutBuffer: IndexedDictRolloutBuffer,
    RecurrentRolloutBuffer: IndexedRecurrentRolloutBuffer,
    RecurrentDictRolloutBuffer: IndexedRecurrentDictRolloutBuffer,
}


def indexed_twin(buffer: Any) -> Any:
    """A buffer of the same settings as ``buffer`` (SB3's or sb3-contrib's, empty) that remembers its
    samples; ``buffer`` itself when it already does or when it is another class."""
    twin = INDEXED.get(type(buffer))
    if twin is None:
        return buffer
    arguments = dict(
        buffer_size=buffer.buffer_size,
        observation_space=buffer.observation_space,
        action_space=buffer.action_space,
        device=buffer.device,
        gae_lambda=buffer.gae_lambda,
        gamma=buffer.gamma,
        n_envs=buffer.n_envs,
    )
    if isinstance(buffer, RecurrentRolloutBuffer | RecurrentDictRolloutBuffer):
        arguments["hidden_state_shape"] = buffer.hidden_state_shape
    return twin(**arguments)
