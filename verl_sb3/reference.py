"""KL control toward a frozen reference policy, as in RLHF trainers (veRL, TRL).

:class:`ReferenceKLMixin` keeps a frozen copy of the initial policy (or of a saved model's) and
penalises the policy's divergence from it, per token, with a coefficient that is fixed or
adapted (:mod:`verl_sb3.kl_control`). It goes on any SB3 on-policy algorithm; the verified
classes carry it, off by default (``ref_kl_coef=None``).
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch as th
from gymnasium import spaces
from sb3_contrib.common.recurrent.buffers import RecurrentRolloutBuffer
from sb3_contrib.common.recurrent.policies import RecurrentActorCriticPolicy
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.buffers import BaseBuffer
from stable_baselines3.common.distributions import CategoricalDistribution, kl_divergence
from stable_baselines3.common.policies import BasePolicy
from stable_baselines3.common.save_util import load_from_zip_file

from verl_sb3._util import distribution_validation, patched_attribute, require_number
from verl_sb3.kl_control import KL_ESTIMATORS, AdaptiveKLController, FixedKLController, exact_kl, kl_estimate

REF_KL_MODES = ("reward", "loss")
DEFAULT_REF_KL_HORIZON = 10_000

Reference = str | os.PathLike | BasePolicy | BaseAlgorithm


@dataclass
class _ReferenceMinibatch:
    """The reference's figures for the samples of one PPO minibatch, in the minibatch's order."""

    log_prob: th.Tensor
    logits: th.Tensor | None
    mask: th.Tensor


class ReferenceKLMixin:
    """Penalises KL(policy || reference) per token, in the reward or as a loss term.

    ``ref_kl_mode="reward"`` (veRL's ``use_kl_in_reward``, TRL's default): each step's reward
    becomes ``reward - beta * kl`` before the advantages are computed; ``rollout/ep_rew_mean``
    still reports the environment's reward. ``ref_kl_mode="loss"`` (veRL's ``use_kl_loss``): PPO's
    loss gains ``beta * mean(kl)`` over each minibatch, against the reference's figures computed
    once the rollout is collected; its gradient is added to the loss's by a hook on the optimizer's
    ``zero_grad``, so the parent's ``train()`` runs unchanged.

    ``beta`` comes from ``kl_ctrl``: a :class:`FixedKLController`, or with ``ref_kl_target`` an
    :class:`AdaptiveKLController`, updated in ``train()`` with the rollout's mean KL and its number
    of steps (so a rolled-back update restores it). ``kl_ctrl`` and the reference are saved with
    the model. The logger gets ``verl/ref_kl`` (the rollout's mean estimated KL) and
    ``verl/kl_coef`` (the ``beta`` applied to it); loss mode adds ``train/ref_kl_loss``.

    :param ref_kl_coef: the starting ``beta`` (>= 0); None (default) turns reference KL off.
    :param ref_kl_estimator: ``"k1"`` (default), ``"k2"``, ``"k3"`` or ``"exact"`` (see :mod:`verl_sb3.kl_control`).
    :param ref_kl_mode: ``"reward"`` (default) or ``"loss"``.
    :param ref_kl_target: with a target KL (> 0) the coefficient adapts (Ziegler et al. 2019); None keeps it fixed.
    :param ref_kl_horizon: the adaptive controller's horizon, in environment steps (>= 1).
    :param reference: the reference policy's parameters: None for the initial policy, or a saved
        model's zip path, a policy, or a model, whose policy has this policy's architecture.
    """

    _rollback_attributes: ClassVar[tuple[str, ...]] = ("kl_ctrl",)

    def __init__(
        self,
        policy: Any,
        env: Any,
        *args: Any,
        ref_kl_coef: float | None = None,
        ref_kl_estimator: str = "k1",
        ref_kl_mode: str = "reward",
        ref_kl_target: float | None = None,
        ref_kl_horizon: int = DEFAULT_REF_KL_HORIZON,
        reference: Reference | None = None,
        **kwargs: Any,
    ) -> None:
        if ref_kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"ref_kl_estimator: expected one of {KL_ESTIMATORS}, got {ref_kl_estimator!r}")
        if ref_kl_mode not in REF_KL_MODES:
            raise ValueError(f"ref_kl_mode: expected one of {REF_KL_MODES}, got {ref_kl_mode!r}")
        if isinstance(ref_kl_horizon, bool) or not isinstance(ref_kl_horizon, (int, np.integer)) or ref_kl_horizon < 1:
            raise ValueError(f"ref_kl_horizon: expected an integer >= 1, got {ref_kl_horizon!r}")
        self.ref_kl_coef = None if ref_kl_coef is None else require_number("ref_kl_coef", ref_kl_coef, 0.0)
        self.ref_kl_target = None if ref_kl_target is None else require_number("ref_kl_target", ref_kl_target, 0.0, open_low=True)
        if self.ref_kl_coef is None and (reference is not None or ref_kl_target is not None):
            raise ValueError("ref_kl_coef: needed (a number >= 0) when a reference or ref_kl_target is given")
        self.ref_kl_estimator = ref_kl_estimator
        self.ref_kl_mode = ref_kl_mode
        self.ref_kl_horizon = int(ref_kl_horizon)
        self.kl_ctrl: FixedKLController | AdaptiveKLController | None = None
        if self.ref_kl_coef is not None:
            self.kl_ctrl = (
                FixedKLController(self.ref_kl_coef)
                if self.ref_kl_target is None
                else AdaptiveKLController(self.ref_kl_coef, self.ref_kl_target, self.ref_kl_horizon)
            )
        self.ref_policy: BasePolicy | None = None
        self._reference_init = reference  # read once, by _setup_model
        self._ref_lstm_states: tuple[th.Tensor, th.Tensor] | None = None
        self._ref_rollout: dict[str, Any] | None = None
        super().__init__(policy, env, *args, **kwargs)
        self._reference_init = None

    # ------------------------------------------------------------------ the reference
    def _setup_model(self) -> None:
        super()._setup_model()
        self._setup_reference()

    def _setup_reference(self) -> None:
        """The frozen reference: a copy of the policy, with the given reference's parameters if any."""
        if self.kl_ctrl is None:
            self.ref_policy = None
            return
        if self.ref_kl_mode == "loss" and self.ref_kl_estimator == "exact" and not isinstance(self.action_space, spaces.Discrete):
            raise ValueError("ref_kl_estimator: 'exact' in loss mode needs a Discrete action space; use k1, k2 or k3")
        reference = copy.deepcopy(self.policy)
        reference.optimizer = None
        if self._reference_init is not None:
            try:
                reference.load_state_dict(_reference_state_dict(self._reference_init, self.device))
            except RuntimeError as error:
                raise ValueError(f"reference: its parameters do not fit this policy's architecture: {error}") from None
        reference.set_training_mode(False)
        reference.requires_grad_(False)
        self.ref_policy = reference

    def _get_torch_save_params(self) -> tuple[list[str], list[str]]:
        state_dicts, tensors = super()._get_torch_save_params()
        return ([*state_dicts, "ref_policy"] if self.ref_policy is not None else state_dicts), tensors

    def _excluded_save_params(self) -> list[str]:
        return [*super()._excluded_save_params(), "ref_policy", "_reference_init", "_ref_rollout"]

    # ------------------------------------------------------------------ collection: the penalty
    def collect_rollouts(self, env: Any, callback: Any, rollout_buffer: Any, n_rollout_steps: int) -> bool:
        """The parent's collection; once it is complete, the reference is evaluated on the whole
        rollout and, in reward mode, the rewards are penalised before the advantages are computed."""
        if self.ref_policy is None:
            return super().collect_rollouts(env, callback, rollout_buffer, n_rollout_steps)
        compute_advantages = rollout_buffer.compute_returns_and_advantage

        def penalised_advantages(last_values: th.Tensor, dones: np.ndarray) -> None:
            self._ref_rollout = self._penalise(rollout_buffer)
            compute_advantages(last_values=last_values, dones=dones)

        self._ref_rollout = None
        with patched_attribute(rollout_buffer, "compute_returns_and_advantage", penalised_advantages):
            return super().collect_rollouts(env, callback, rollout_buffer, n_rollout_steps)

    def _penalise(self, buffer: BaseBuffer) -> dict[str, Any]:
        """Subtract ``beta * kl`` from the buffer's rewards (reward mode); the rollout's KL figures.

        The reference reads the whole rollout in one call, environment-major (row
        ``env * n_steps + step``); a recurrent reference starts from its own LSTM state at the end
        of the previous rollout, as the policy does from its own.
        """
        n_steps, n_envs = buffer.buffer_size, buffer.n_envs

        def env_major(array: np.ndarray) -> th.Tensor:
            return th.as_tensor(BaseBuffer.swap_and_flatten(array), device=self.device)

        observations = buffer.observations
        observations = {k: env_major(v) for k, v in observations.items()} if isinstance(observations, dict) else env_major(observations)
        actions = env_major(buffer.actions)
        if isinstance(self.action_space, spaces.Discrete):
            actions = actions.long().flatten()
        log_prob = env_major(buffer.log_probs).flatten()
        with th.no_grad(), distribution_validation(False):
            if isinstance(self.ref_policy, RecurrentActorCriticPolicy):
                starts = env_major(buffer.episode_starts).flatten()
                states = self._ref_lstm_states
                if states is None or states[0].shape[1] != n_envs:
                    states = tuple(th.zeros_like(x) for x in self._last_lstm_states.pi)
                ref_distribution, self._ref_lstm_states = self.ref_policy.get_distribution(observations, states, starts)
            else:
                ref_distribution = self.ref_policy.get_distribution(observations)
            ref_log_prob = ref_distribution.log_prob(actions)
            if self.ref_kl_estimator == "exact":
                distribution = self._rollout_distribution(buffer, observations)
                if isinstance(distribution, CategoricalDistribution):
                    kl = exact_kl(distribution.distribution.logits, ref_distribution.distribution.logits)
                else:
                    kl = kl_divergence(distribution, ref_distribution)
            else:
                kl = kl_estimate(log_prob, ref_log_prob, self.ref_kl_estimator)
        kl_per_step = kl.reshape(n_envs, n_steps).T.cpu().numpy()  # the buffer's (n_steps, n_envs)
        beta = self.kl_ctrl.value
        if self.ref_kl_mode == "reward":
            buffer.rewards -= (beta * kl_per_step).astype(buffer.rewards.dtype)
        rollout = {"kl": float(kl_per_step.mean()), "kl_coef": beta, "n_steps": int(kl_per_step.size)}
        if self.ref_kl_mode == "loss":  # environment-major, as the buffer serves minibatches
            rollout["ref_log_prob"] = ref_log_prob.cpu().numpy()
            if self.ref_kl_estimator == "exact":
                rollout["ref_logits"] = ref_distribution.distribution.logits.cpu().numpy()
        return rollout

    def _rollout_distribution(self, buffer: BaseBuffer, observations: Any) -> Any:
        """The policy's distribution on the rollout just collected (environment-major)."""
        if isinstance(self.policy, RecurrentActorCriticPolicy):  # from its LSTM state at the first step
            starts = th.as_tensor(BaseBuffer.swap_and_flatten(buffer.episode_starts), device=self.device).flatten()
            states = tuple(th.as_tensor(np.ascontiguousarray(x[0]), device=self.device) for x in (buffer.hidden_states_pi, buffer.cell_states_pi))
            return self.policy.get_distribution(observations, states, starts)[0]
        return self.policy.get_distribution(observations)

    # ------------------------------------------------------------------ the update
    def train(self) -> None:
        """Update the coefficient from the rollout's KL, then the parent's update (with the KL
        loss term in loss mode)."""
        rollout = self._ref_rollout
        if self.kl_ctrl is None or rollout is None:
            return super().train()
        self.logger.record("verl/ref_kl", rollout["kl"])
        self.logger.record("verl/kl_coef", rollout["kl_coef"])
        self.kl_ctrl.update(current_kl=rollout["kl"], n_steps=rollout["n_steps"])
        if self.ref_kl_mode == "reward":
            return super().train()
        return self._train_with_kl_loss(rollout)

    def _train_with_kl_loss(self, rollout: dict[str, Any]) -> None:
        buffer, policy, optimizer = self.rollout_buffer, self.policy, self.policy.optimizer
        get_samples, evaluate, zero_grad = buffer._get_samples, policy.evaluate_actions, optimizer.zero_grad
        beta, pending, kl_values = rollout["kl_coef"], [], []
        minibatch: list[_ReferenceMinibatch] = []

        def sampling(batch_inds: np.ndarray, *args: Any, **kwargs: Any) -> Any:
            samples = get_samples(batch_inds, *args, **kwargs)
            minibatch[:] = [self._reference_minibatch(buffer, batch_inds, rollout)]
            return samples

        def evaluating(*args: Any, **kwargs: Any) -> Any:
            values, log_prob, entropy = evaluate(*args, **kwargs)
            reference = minibatch[0]
            if self.ref_kl_estimator == "exact":
                kl = exact_kl(policy.action_dist.distribution.logits, reference.logits)
            else:
                kl = kl_estimate(log_prob, reference.log_prob, self.ref_kl_estimator)
            if kl.shape != reference.mask.shape:
                raise RuntimeError(f"reference KL loss: {tuple(kl.shape)} values for a minibatch of {tuple(reference.mask.shape)}")
            mean_kl = kl[reference.mask].mean()
            pending[:] = [beta * mean_kl]
            kl_values.append(mean_kl.item())
            return values, log_prob, entropy

        def zero_grad_then_kl_gradient(*args: Any, **kwargs: Any) -> None:
            zero_grad(*args, **kwargs)  # PPO calls it between its loss and loss.backward()
            if pending:
                pending.pop().backward(retain_graph=True)

        with patched_attribute(buffer, "_get_samples", sampling), patched_attribute(
            policy, "evaluate_actions", evaluating
        ), patched_attribute(optimizer, "zero_grad", zero_grad_then_kl_gradient):
            super().train()
        if kl_values:
            self.logger.record("train/ref_kl_loss", beta * float(np.mean(kl_values)))

    def _reference_minibatch(self, buffer: BaseBuffer, batch_inds: np.ndarray, rollout: dict[str, Any]) -> _ReferenceMinibatch:
        """The reference's figures for ``batch_inds``, laid out as the buffer's samples (recurrent
        buffers pad sequences: the same padding is applied)."""
        ref_log_prob, ref_logits = rollout["ref_log_prob"][batch_inds], rollout.get("ref_logits")
        ref_logits = None if ref_logits is None else ref_logits[batch_inds]
        if isinstance(buffer, RecurrentRolloutBuffer):  # _get_samples just set buffer.pad for this minibatch
            mask = buffer.pad_and_flatten(np.ones(len(batch_inds), dtype=np.float32)) > 0.5
            log_prob = buffer.pad_and_flatten(ref_log_prob)
            logits = None if ref_logits is None else buffer.pad(ref_logits).reshape(len(mask), -1)
        else:
            log_prob = th.as_tensor(ref_log_prob, device=self.device)
            logits = None if ref_logits is None else th.as_tensor(ref_logits, device=self.device)
            mask = th.ones(len(batch_inds), dtype=th.bool, device=self.device)
        return _ReferenceMinibatch(log_prob, logits, mask)


def _reference_state_dict(reference: Reference, device: th.device) -> dict[str, th.Tensor]:
    """The policy parameters of a reference given as a saved model's path, a policy or a model."""
    if isinstance(reference, BaseAlgorithm):
        return reference.policy.state_dict()
    if isinstance(reference, th.nn.Module):
        return reference.state_dict()
    if isinstance(reference, (str, os.PathLike)):
        try:
            _, params, _ = load_from_zip_file(reference, device=device, print_system_info=False)
        except (OSError, ValueError) as error:
            raise ValueError(f"reference: cannot load a saved model from {os.fspath(reference)!r}: {error}") from None
        if not params or "policy" not in params:
            raise ValueError(f"reference: {os.fspath(reference)!r} holds no policy parameters")
        return params["policy"]
    raise ValueError(f"reference: expected None, a saved model's path, a policy or a model, got {type(reference).__name__}")
