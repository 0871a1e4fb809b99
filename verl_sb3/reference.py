"""KL control toward a frozen reference policy, as in RLHF trainers (veRL, TRL).

:class:`ReferenceKLMixin` keeps a frozen copy of the initial policy (or of a saved model's) and
penalises the policy's divergence from it, per token, with a coefficient that is fixed or
adapted (:mod:`verl_sb3.kl_control`). The verified classes carry it, off by default
(``ref_kl_coef=None``); in reward mode it also goes on any SB3 on-policy algorithm.
"""

from __future__ import annotations

import copy
import os
import pickle
from typing import Any, ClassVar

import torch as th
from gymnasium import spaces
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.distributions import CategoricalDistribution, kl_divergence
from stable_baselines3.common.policies import BasePolicy
from stable_baselines3.common.save_util import load_from_zip_file

from verl_sb3._validation import optional_number, require_int
from verl_sb3.buffers import SampleIndices, indexed_twin
from verl_sb3.kl_control import KL_ESTIMATORS, AdaptiveKLController, FixedKLController, exact_kl, kl_estimate
from verl_sb3.ppo_update import PPOUpdateMixin
from verl_sb3.rollout import RolloutBatch, distribution_validation, policy_kind
from verl_sb3.verification.state import irregular_tensor

REF_KL_MODES = ("reward", "loss")
DEFAULT_REF_KL_HORIZON = 10_000

Reference = str | os.PathLike | BasePolicy | BaseAlgorithm


class ReferenceKLMixin:
    """Penalises KL(policy || reference) per token, in the reward or as a loss term.

    ``ref_kl_mode="reward"`` (veRL's ``use_kl_in_reward``, TRL's default): once a rollout is
    collected, each step's reward becomes ``reward - beta * kl`` and the advantages are computed
    again from the penalised rewards (so ``on_rollout_end`` callbacks still see the environment's
    rewards and advantages; ``rollout/ep_rew_mean`` reports the environment's reward).
    ``ref_kl_mode="loss"`` (veRL's ``use_kl_loss``): PPO's loss gains ``beta * mean(kl)`` over each
    minibatch, against the reference's figures computed once the rollout is collected; it needs
    the update of :class:`verl_sb3.ppo_update.PPOUpdateMixin` (the verified classes have it).

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
        self.ref_kl_horizon = require_int("ref_kl_horizon", ref_kl_horizon, 1)
        self.ref_kl_coef = optional_number("ref_kl_coef", ref_kl_coef, 0.0)
        self.ref_kl_target = optional_number("ref_kl_target", ref_kl_target, 0.0, open_low=True)
        if self.ref_kl_coef is None and (reference is not None or ref_kl_target is not None):
            raise ValueError("ref_kl_coef: needed (a number >= 0) when a reference or ref_kl_target is given")
        self.ref_kl_estimator = ref_kl_estimator
        self.ref_kl_mode = ref_kl_mode
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
        if self.kl_ctrl is not None and self.ref_kl_mode == "loss":
            if not isinstance(self, PPOUpdateMixin):
                raise ValueError(
                    "ref_kl_mode: 'loss' adds a term to the update of verl_sb3's PPOUpdateMixin (VerifiedPPO, "
                    f"VerifiedRecurrentPPO); {type(self).__name__} has SB3's own update, use 'reward'"
                )
            self.rollout_buffer = indexed_twin(self.rollout_buffer)  # minibatches say which samples they hold

    def _setup_reference(self) -> None:
        """The frozen reference: a copy of the policy, with the given reference's parameters if any."""
        if self.kl_ctrl is None:
            self.ref_policy = None
            return
        if (
            self.ref_kl_mode == "loss"
            and self.ref_kl_estimator == "exact"
            and not isinstance(self.action_space, spaces.Discrete)
        ):
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
        """The parent's collection; then the reference is evaluated on the whole rollout and, in
        reward mode, the rewards are penalised and the advantages computed again from them."""
        self._ref_rollout = None
        collected = super().collect_rollouts(env, callback, rollout_buffer, n_rollout_steps)
        if collected and self.ref_policy is not None:
            kind = policy_kind(self.policy)
            self._ref_rollout = self._penalise(rollout_buffer, kind.rollout_batch(rollout_buffer, self.device))
            if self.ref_kl_mode == "reward":
                with th.no_grad():
                    last_values = kind.bootstrap_values(self)
                rollout_buffer.compute_returns_and_advantage(last_values=last_values, dones=self._last_episode_starts)
        return collected

    def _penalise(self, buffer: Any, batch: RolloutBatch) -> dict[str, Any]:
        """Subtract ``beta * kl`` from the buffer's rewards (reward mode); the rollout's KL figures.

        The reference reads the whole rollout in one call, environment-major (row
        ``env * n_steps + step``); a recurrent reference starts from its own LSTM state at the end
        of the previous rollout, as the policy does from its own.
        """
        n_steps, n_envs = buffer.buffer_size, buffer.n_envs
        kind = policy_kind(self.policy)
        actions = batch.token_actions if isinstance(self.action_space, spaces.Discrete) else batch.actions
        with th.no_grad(), distribution_validation(False):
            states = None
            if kind.recurrent:
                states = self._ref_lstm_states
                if states is None or states[0].shape[1] != n_envs:
                    states = tuple(th.zeros_like(x) for x in self._last_lstm_states.pi)
            ref_distribution, self._ref_lstm_states = kind.distribution(self.ref_policy, batch, states)
            ref_log_prob = ref_distribution.log_prob(actions)
            if self.ref_kl_estimator == "exact":
                distribution, _ = kind.distribution(self.policy, batch)
                if isinstance(distribution, CategoricalDistribution):
                    kl = exact_kl(distribution.distribution.logits, ref_distribution.distribution.logits)
                else:
                    kl = kl_divergence(distribution, ref_distribution)
            else:
                kl = kl_estimate(batch.old_log_prob, ref_log_prob, self.ref_kl_estimator)
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

    # ------------------------------------------------------------------ the update
    def train(self) -> None:
        """Update the coefficient from the rollout's KL, then the parent's update."""
        rollout = self._ref_rollout
        if self.kl_ctrl is not None and rollout is not None:
            self.logger.record("verl/ref_kl", rollout["kl"])
            self.logger.record("verl/kl_coef", rollout["kl_coef"])
            self.kl_ctrl.update(current_kl=rollout["kl"], n_steps=rollout["n_steps"])
        super().train()

    def _extra_losses(self, log_prob: th.Tensor, mask: th.Tensor | None) -> dict[str, th.Tensor]:
        """Loss mode: ``beta * mean KL(policy || reference)`` over the minibatch's real samples
        (aggregated as the policy loss: veRL's ``loss_agg_mode`` applies to its KL loss too)."""
        terms = super()._extra_losses(log_prob, mask)
        rollout = self._ref_rollout
        if self.kl_ctrl is None or self.ref_kl_mode != "loss" or rollout is None:
            return terms
        buffer: SampleIndices = self.rollout_buffer
        if self.ref_kl_estimator == "exact":
            # the distribution of the minibatch just evaluated (SB3 policies keep it in action_dist)
            kl = exact_kl(self.policy.action_dist.distribution.logits, buffer.minibatch_rows(rollout["ref_logits"]))
        else:
            kl = kl_estimate(log_prob, buffer.minibatch_rows(rollout["ref_log_prob"]), self.ref_kl_estimator)
        if kl.shape != log_prob.shape:
            raise RuntimeError(
                f"reference KL loss: {tuple(kl.shape)} values for a minibatch of {tuple(log_prob.shape)}"
            )
        return {**terms, "ref_kl_loss": rollout["kl_coef"] * self._loss_mean(kl, mask)}


def _reference_state_dict(reference: Reference, device: th.device) -> dict[str, th.Tensor]:
    """The policy parameters of a reference given as a saved model's path, a policy or a model."""
    if isinstance(reference, BaseAlgorithm):
        return reference.policy.state_dict()
    if isinstance(reference, th.nn.Module):
        return reference.state_dict()
    if isinstance(reference, (str, os.PathLike)):
        try:
            # only the tensors (read weights_only), not the pickles of the model's data
            _, params, _ = load_from_zip_file(reference, load_data=False, device=device)
        except (OSError, ValueError, RuntimeError, pickle.UnpicklingError) as error:  # torch's own, weights_only's
            raise ValueError(f"reference: cannot load a saved model from {os.fspath(reference)!r}: {error}") from None
        if not params or "policy" not in params:
            raise ValueError(f"reference: {os.fspath(reference)!r} holds no policy parameters")
        irregular = irregular_tensor(params["policy"])
        if irregular:  # torch does not check a sparse tensor's indices when it is copied
            raise ValueError(f"reference: {os.fspath(reference)!r} holds {irregular} in its policy")
        return params["policy"]
    raise ValueError(
        f"reference: expected None, a saved model's path, a policy or a model, got {type(reference).__name__}"
    )
