"""The rollout as verification, the reference KL and the judges read it, for both kinds of policy.

Recurrent (sb3-contrib) and feed-forward (SB3) policies differ in how a batch of the rollout is
evaluated: :func:`policy_kind` tells which, once, and :class:`FeedForward` / :class:`Recurrent`
do it. :class:`RolloutBatch` is the whole rollout in one batch, environment-major (row
``env * n_steps + step``), and :class:`LogitsRecorder` keeps the action logits the policy
computed while collecting it, so that the old policy's distribution needs no second forward pass.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch as th
from sb3_contrib.common.recurrent.policies import RecurrentActorCriticPolicy
from stable_baselines3.common.buffers import BaseBuffer
from stable_baselines3.common.distributions import CategoricalDistribution, Distribution
from stable_baselines3.common.policies import BasePolicy
from stable_baselines3.common.utils import obs_as_tensor

LSTMStates = tuple[th.Tensor, th.Tensor]


@contextlib.contextmanager
def distribution_validation(enabled: bool) -> Iterator[None]:
    """Turn torch.distributions' argument checks on or off for the block, then restore the default.

    Verification builds distributions over whole rollouts, whose values it checks itself
    (``finite_parameters``): torch's checks would cost a pass over the logits per distribution
    and raise on the non-finite values that the checks are there to report.
    """
    previous = th.distributions.Distribution._validate_args
    th.distributions.Distribution.set_default_validate_args(enabled)
    try:
        yield
    finally:
        th.distributions.Distribution.set_default_validate_args(previous)


@dataclass
class RolloutBatch:
    """The rollout just collected, one row per (environment, step), environment-major.

    ``lstm_states`` (recurrent policies) are the actor's states at each environment's first
    step, shaped ``(layers, n_envs, hidden)``. With a buffer that weighs samples
    (:class:`verl_sb3.buffers.SampleIndices`), ``sample_weights`` are their weights in the loss and,
    for a critic-free estimator, ``sample_episodes`` / ``sample_groups`` each sample's episode and
    the group it was compared in (-1: left out of the loss).
    """

    observations: th.Tensor | dict[str, th.Tensor]
    actions: th.Tensor
    old_values: th.Tensor
    old_log_prob: th.Tensor
    advantages: th.Tensor
    returns: th.Tensor
    episode_starts: th.Tensor
    lstm_states: LSTMStates | None = None
    estimator: str = "gae"
    sample_weights: th.Tensor | None = None
    sample_episodes: th.Tensor | None = None
    sample_groups: th.Tensor | None = None

    @property
    def token_actions(self) -> th.Tensor:
        """The actions as long integers, flat (Discrete action spaces)."""
        return self.actions.long().flatten()


class FeedForward:
    """How SB3's feed-forward policies (``ActorCriticPolicy``) read a rollout."""

    recurrent = False

    @classmethod
    def rollout_batch(cls, buffer: BaseBuffer, device: th.device) -> RolloutBatch:
        """The whole rollout as one batch; numpy's random state is not touched."""
        flat = buffer.generator_ready  # already flattened (environment-major) by an earlier get()

        def tensor(array: np.ndarray) -> th.Tensor:
            return th.as_tensor(array if flat else buffer.swap_and_flatten(array), device=device)

        observations = buffer.observations
        batch = RolloutBatch(
            observations={k: tensor(v) for k, v in observations.items()}
            if isinstance(observations, dict)
            else tensor(observations),
            actions=tensor(buffer.actions),
            old_values=tensor(buffer.values).flatten(),
            old_log_prob=tensor(buffer.log_probs).flatten(),
            advantages=tensor(buffer.advantages).flatten(),
            returns=tensor(buffer.returns).flatten(),
            episode_starts=tensor(buffer.episode_starts).flatten(),
        )
        weights = getattr(buffer, "sample_weights", None)
        if weights is not None:  # environment-major already
            batch.sample_weights = th.as_tensor(weights, device=device)
            batch.estimator = buffer.advantage_settings.estimator
            estimate, episodes = buffer.estimate, buffer.episodes
            if estimate is not None:
                batch.sample_episodes = th.as_tensor(episodes.episode, device=device)
                batch.sample_groups = th.as_tensor(estimate.group[episodes.episode], device=device)
        return batch

    @staticmethod
    def distribution(
        policy: BasePolicy, batch: RolloutBatch, lstm_states: LSTMStates | None = None
    ) -> tuple[Distribution, LSTMStates | None]:
        """The policy's distribution on the batch (a copy: SB3 policies reuse one object), and no state."""
        return copy.copy(policy.get_distribution(batch.observations)), None

    @classmethod
    def old_distribution(cls, policy: BasePolicy, batch: RolloutBatch, logits: th.Tensor | None) -> Distribution:
        """The policy's distribution on ``batch`` before an update: from the ``(n_envs, n_steps, n_actions)``
        logits a :class:`LogitsRecorder` kept during the collection, else computed (in eval mode)."""
        with distribution_validation(False):
            if logits is not None:
                return copy.copy(policy.action_dist).proba_distribution(
                    action_logits=logits.reshape(-1, logits.shape[-1])
                )
            policy.set_training_mode(False)
            with th.no_grad():
                return cls.distribution(policy, batch)[0]

    @staticmethod
    def evaluate_minibatch(policy: BasePolicy, samples: Any, actions: th.Tensor) -> tuple[th.Tensor, ...]:
        """Values, log-probabilities and entropy of a minibatch of ``buffer.get()``."""
        return policy.evaluate_actions(samples.observations, actions)

    @staticmethod
    def evaluate_actor_minibatch(policy: BasePolicy, samples: Any, actions: th.Tensor) -> tuple[th.Tensor, ...]:
        """Log-probabilities and entropy of a minibatch, from the actor alone (no value computed)."""
        distribution = policy.get_distribution(samples.observations)
        return distribution.log_prob(actions), distribution.entropy()

    @staticmethod
    def minibatch_mask(samples: Any) -> th.Tensor | None:
        """Which rows of the minibatch are real samples: all (None)."""
        return None

    @staticmethod
    def bootstrap_values(model: Any) -> th.Tensor:
        """The critic's values of the observations after the rollout, as the collection computed them."""
        return model.policy.predict_values(obs_as_tensor(model._last_obs, model.device))


class Recurrent(FeedForward):
    """How sb3-contrib's recurrent policies read a rollout: one sequence per environment, starting
    from the actor's LSTM state stored at its first step; minibatches are padded sequences."""

    recurrent = True

    @classmethod
    def rollout_batch(cls, buffer: BaseBuffer, device: th.device) -> RolloutBatch:
        batch = super().rollout_batch(buffer, device)
        if buffer.generator_ready:  # (n_envs * n_steps, layers, hidden), environment-major
            first = slice(None, None, buffer.buffer_size)
            states = (buffer.hidden_states_pi[first].swapaxes(0, 1), buffer.cell_states_pi[first].swapaxes(0, 1))
        else:  # (n_steps, layers, n_envs, hidden)
            states = (buffer.hidden_states_pi[0], buffer.cell_states_pi[0])
        batch.lstm_states = tuple(th.as_tensor(np.ascontiguousarray(x), device=device) for x in states)
        return batch

    @staticmethod
    def distribution(
        policy: BasePolicy, batch: RolloutBatch, lstm_states: LSTMStates | None = None
    ) -> tuple[Distribution, LSTMStates | None]:
        """The distribution from ``lstm_states`` (default: the batch's), and the states after the batch."""
        states = batch.lstm_states if lstm_states is None else lstm_states
        distribution, final_states = policy.get_distribution(batch.observations, states, batch.episode_starts)
        return copy.copy(distribution), final_states

    @staticmethod
    def evaluate_minibatch(policy: BasePolicy, samples: Any, actions: th.Tensor) -> tuple[th.Tensor, ...]:
        return policy.evaluate_actions(samples.observations, actions, samples.lstm_states, samples.episode_starts)

    @staticmethod
    def evaluate_actor_minibatch(policy: BasePolicy, samples: Any, actions: th.Tensor) -> tuple[th.Tensor, ...]:
        distribution, _ = policy.get_distribution(samples.observations, samples.lstm_states.pi, samples.episode_starts)
        return distribution.log_prob(actions), distribution.entropy()

    @staticmethod
    def minibatch_mask(samples: Any) -> th.Tensor | None:
        """Real samples, not the padding of the minibatch's sequences."""
        return samples.mask > 1e-8

    @staticmethod
    def bootstrap_values(model: Any) -> th.Tensor:
        starts = th.tensor(model._last_episode_starts, dtype=th.float32, device=model.device)
        return model.policy.predict_values(
            obs_as_tensor(model._last_obs, model.device), model._last_lstm_states.vf, starts
        )


def policy_kind(policy: BasePolicy) -> type[FeedForward]:
    """:class:`Recurrent` for sb3-contrib's recurrent policies, else :class:`FeedForward`."""
    return Recurrent if isinstance(policy, RecurrentActorCriticPolicy) else FeedForward


class LogitsRecorder:
    """The action logits a policy computes at each step of a rollout collection.

    A forward hook on ``policy.action_net``, whose output SB3 turns into the action distribution
    (``proba_distribution(action_logits=...)``), keeps each step's logits, normalised as torch's
    ``Categorical`` holds them, in an ``(n_envs, n_steps, n_actions)`` tensor: environment-major,
    as :class:`RolloutBatch`. Only calls on ``n_envs`` rows count as steps (a whole-rollout
    evaluation or a single prediction in between is not one); :attr:`logits` is None unless
    exactly ``n_steps`` steps were seen, or when the actions are not Categorical.
    """

    def __init__(self, policy: BasePolicy, n_envs: int, n_steps: int) -> None:
        self.n_envs, self.n_steps, self.steps = n_envs, n_steps, 0
        self._logits: th.Tensor | None = None
        categorical = isinstance(getattr(policy, "action_dist", None), CategoricalDistribution)
        module = getattr(policy, "action_net", None) if categorical else None
        self._hook = module.register_forward_hook(self._record) if isinstance(module, th.nn.Module) else None

    def _record(self, module: th.nn.Module, inputs: Any, output: th.Tensor) -> None:
        if output.dim() != 2 or output.shape[0] != self.n_envs:
            return
        if self._logits is None:
            self._logits = output.new_empty((self.n_envs, self.n_steps, output.shape[1]))
        if self.steps < self.n_steps:
            output = output.detach()
            self._logits[:, self.steps] = output - output.logsumexp(dim=-1, keepdim=True)
        self.steps += 1

    def close(self) -> None:
        """Stop recording (idempotent)."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def __enter__(self) -> LogitsRecorder:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    @property
    def logits(self) -> th.Tensor | None:
        """``(n_envs, n_steps, n_actions)`` logits, or None unless recorded at every step."""
        return self._logits if self.steps == self.n_steps else None
