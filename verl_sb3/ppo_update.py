"""PPO's update as one loop for SB3's ``PPO`` and sb3-contrib's ``RecurrentPPO``, with a place for more loss terms.

:class:`PPOUpdateMixin` replaces the parents' ``train()`` by the same computation (the same
operations in the same order: a run with it is, bit for bit, a run with the parent), written
once for both kinds of policy (:mod:`verl_sb3.rollout`). Two things differ: the update's
figures are returned before they are logged, so that a verified update logs them only once it
is accepted; and :meth:`PPOUpdateMixin._extra_losses` adds named terms to the loss (the
reference-KL loss of :class:`verl_sb3.reference.ReferenceKLMixin`).

With :class:`verl_sb3.estimation.AdvantageEstimationMixin` the same loop also takes separate
lower and upper clip ranges (``clip_range_high``), weighs samples as veRL's ``loss_agg_mode``
does (:meth:`PPOUpdateMixin._loss_mean`), and, without a critic, evaluates only the actor.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3.common.utils import explained_variance, update_learning_rate
from torch.nn import functional as F

from verl_sb3.rollout import policy_kind
from verl_sb3.warmup import actor_parameters, frozen

#: The per-minibatch figures SB3's ``train()`` averages over the update.
SB3_FIGURES = ("entropy_loss", "policy_gradient_loss", "value_loss", "clip_fraction")
#: Figures the logger must not write to some outputs (as SB3's ``train()`` records them).
EXCLUDED_OUTPUTS = {"train/n_updates": "tensorboard"}


def masked_mean(values: th.Tensor, mask: th.Tensor | None) -> th.Tensor:
    """The mean over the real samples (all when ``mask`` is None)."""
    return th.mean(values) if mask is None else th.mean(values[mask])


def normalized_advantages(advantages: th.Tensor, mask: th.Tensor | None) -> th.Tensor:
    """Advantages with mean 0 and standard deviation 1 over the real samples (a single sample unchanged)."""
    if mask is None:
        if len(advantages) <= 1:  # SB3: normalisation makes no sense for a minibatch of one
            return advantages
        return (advantages - advantages.mean()) / (advantages.std() + 1e-8)
    if int(mask.sum()) <= 1:
        return advantages
    return (advantages - advantages[mask].mean()) / (advantages[mask].std() + 1e-8)


class PPOUpdateMixin:
    """PPO's ``train()`` for ``PPO`` and ``RecurrentPPO`` (put it before them in the bases)."""

    #: Train only the value function in the coming update (the actor frozen for its duration):
    #: the critic warm-up's switch, off again at the start of every ``learn()``.
    critic_only: bool = False
    #: ``"gae"`` trains the critic; the critic-free estimators of :mod:`verl_sb3.advantages` do not.
    advantage_estimator: str = "gae"
    #: The upper clip range (a schedule, as ``clip_range``); None: ``clip_range`` on both sides.
    clip_range_high: Any = None

    def _setup_learn(self, *args: Any, **kwargs: Any) -> Any:
        self.critic_only = False
        return super()._setup_learn(*args, **kwargs)

    def train(self) -> None:
        """One PPO update on the rollout buffer; its figures go to the logger under ``train/``."""
        self._record_update_figures(self._ppo_update())

    def _record_update_figures(self, figures: dict[str, Any]) -> None:
        for key, value in figures.items():
            self.logger.record(key, value, exclude=EXCLUDED_OUTPUTS.get(key))

    def _learning_rate(self) -> float:
        """The learning rate of the coming update (SB3's schedule of the progress remaining)."""
        return self.lr_schedule(self._current_progress_remaining)

    def _update_learning_rate(self, optimizers: Any) -> None:
        """Set :meth:`_learning_rate` on the optimizers (logged with the update's figures)."""
        for optimizer in optimizers if isinstance(optimizers, list) else [optimizers]:
            update_learning_rate(optimizer, self._learning_rate())

    def _extra_losses(self, log_prob: th.Tensor, mask: th.Tensor | None) -> dict[str, th.Tensor]:
        """Named terms added to a minibatch's loss, from the policy just evaluated on it (none here);
        per-sample terms are aggregated with :meth:`_loss_mean`."""
        return {}

    def _loss_mean(self, values: th.Tensor, mask: th.Tensor | None) -> th.Tensor:
        """A per-sample term's share in the loss of the minibatch just drawn: SB3's mean over its
        real samples, or, when the buffer weighs samples (``loss_agg_mode``, critic-free estimators),
        ``n / m * sum(weight * value)`` over its ``m`` real samples of the rollout's ``n`` (an
        unbiased estimate of the rollout's aggregated loss)."""
        buffer = self.rollout_buffer
        weights = getattr(buffer, "sample_weights", None)
        if weights is None:
            return masked_mean(values, mask)
        rows = buffer.minibatch_weights
        if mask is not None:
            rows = rows[mask]
        kept = rows > 0  # the samples left out weigh nothing, whatever their values (even NaN)
        values = values if mask is None else values[mask]
        return (values[kept] * rows[kept]).sum() * (weights.size / max(len(rows), 1))

    def _loss_rows(self, mask: th.Tensor | None) -> th.Tensor | None:
        """The minibatch's rows in the loss: its real samples, without those the buffer leaves out (weight 0)."""
        if getattr(self.rollout_buffer, "sample_weights", None) is None:
            return mask
        kept = self.rollout_buffer.minibatch_weights > 0
        return kept if mask is None else kept & mask

    @property
    def trains_critic(self) -> bool:
        """Whether the update has a value loss (GAE's critic)."""
        return self.advantage_estimator == "gae"

    def _ppo_update(self) -> dict[str, Any]:
        """n_epochs passes of clipped-surrogate minibatch steps; the figures SB3 logs, and the extra terms'."""
        self.policy.set_training_mode(True)
        self._update_learning_rate(self.policy.optimizer)
        progress = self._current_progress_remaining
        clip_range = self.clip_range(progress)
        clip_range_vf = None if self.clip_range_vf is None else self.clip_range_vf(progress)
        clip_high = None if self.clip_range_high is None else self.clip_range_high(progress)
        clips = (clip_range, clip_range if clip_high is None else clip_high)
        kind = policy_kind(self.policy)
        history: dict[str, list[float]] = {}
        with frozen(actor_parameters(self.policy) if self.critic_only else []):
            loss, approx_kl_divs = self._epochs(kind, clips, clip_range_vf, history)
        figures = self._update_summary(history, approx_kl_divs, loss, clip_range, clip_range_vf)
        if clip_high is not None:
            figures["train/clip_range_high"] = clip_high
        return figures

    def _epochs(
        self,
        kind: Any,
        clips: tuple[float, float],
        clip_range_vf: float | None,
        history: dict[str, list[float]],
    ) -> tuple[th.Tensor, list]:
        """The optimisation: the last minibatch's loss and the last epoch's approximate KLs."""
        continue_training = True
        for epoch in range(self.n_epochs):
            approx_kl_divs = []
            for rollout_data in self.rollout_buffer.get(self.batch_size):
                loss, approx_kl_div = self._minibatch_loss(kind, rollout_data, clips, clip_range_vf, history)
                approx_kl_divs.append(approx_kl_div)
                if self.target_kl is not None and approx_kl_div > 1.5 * self.target_kl:
                    continue_training = False
                    if self.verbose >= 1:
                        print(f"Early stopping at step {epoch} due to reaching max kl: {approx_kl_div:.2f}")
                    break
                self.policy.optimizer.zero_grad()
                loss.backward()
                th.nn.utils.clip_grad_norm_(self.policy.parameters(), self.max_grad_norm)
                self.policy.optimizer.step()
            self._n_updates += 1
            if not continue_training:
                break
        return loss, approx_kl_divs

    def _minibatch_loss(
        self,
        kind: Any,
        rollout_data: Any,
        clips: tuple[float, float],
        clip_range_vf: float | None,
        history: dict[str, list[float]],
    ) -> tuple[th.Tensor, np.ndarray]:
        """PPO's loss on one minibatch (its figures appended to ``history``) and the k3 estimate of
        KL(old || new) for early stopping. ``clips``: the lower and upper clip ranges."""
        actions = rollout_data.actions
        if isinstance(self.action_space, spaces.Discrete):
            actions = rollout_data.actions.long().flatten()
        mask = kind.minibatch_mask(rollout_data)
        if self.trains_critic:
            values, log_prob, entropy = kind.evaluate_minibatch(self.policy, rollout_data, actions)
        else:
            log_prob, entropy = kind.evaluate_actor_minibatch(self.policy, rollout_data, actions)
        advantages = rollout_data.advantages
        if self.normalize_advantage:
            advantages = normalized_advantages(advantages, self._loss_rows(mask))

        policy_loss, clip_fraction = self._policy_loss(log_prob, rollout_data.old_log_prob, advantages, clips, mask)
        entropy_loss = -self._loss_mean(-log_prob if entropy is None else entropy, mask)
        loss = policy_loss + self.ent_coef * entropy_loss
        figures = dict(policy_gradient_loss=policy_loss, clip_fraction=clip_fraction)
        if self.trains_critic:
            figures["value_loss"] = self._value_loss(values.flatten(), rollout_data, clip_range_vf, mask)
            loss = loss + self.vf_coef * figures["value_loss"]
        extra_losses = self._extra_losses(log_prob, mask)
        for term in extra_losses.values():
            loss = loss + term
        for name, value in {**figures, "entropy_loss": entropy_loss, **extra_losses}.items():
            history.setdefault(name, []).append(value.item())
        with th.no_grad():
            log_ratio = log_prob - rollout_data.old_log_prob
            approx_kl_div = masked_mean((th.exp(log_ratio) - 1) - log_ratio, mask).cpu().numpy()
        return loss, approx_kl_div

    def _policy_loss(
        self,
        log_prob: th.Tensor,
        old_log_prob: th.Tensor,
        advantages: th.Tensor,
        clips: tuple[float, float],
        mask: th.Tensor | None,
    ) -> tuple[th.Tensor, th.Tensor]:
        """The clipped surrogate loss, the ratio clipped to ``[1 - low, 1 + high]`` (DAPO's clip-higher
        when ``high > low``), and the share of samples whose ratio lies outside that range."""
        low, high = clips
        ratio = th.exp(log_prob - old_log_prob)
        policy_loss_1 = advantages * ratio
        policy_loss_2 = advantages * th.clamp(ratio, 1 - low, 1 + high)
        policy_loss = -self._loss_mean(th.min(policy_loss_1, policy_loss_2), mask)
        outside = th.abs(ratio - 1) > low if high == low else (ratio < 1 - low) | (ratio > 1 + high)
        return policy_loss, masked_mean(outside.float(), mask)

    def _value_loss(
        self, values: th.Tensor, rollout_data: Any, clip_range_vf: float | None, mask: th.Tensor | None
    ) -> th.Tensor:
        """The critic's squared error to the returns, its change clipped by ``clip_range_vf``."""
        values_pred = values
        if clip_range_vf is not None:  # clip the change of the value (depends on the reward scale)
            values_pred = rollout_data.old_values + th.clamp(
                values - rollout_data.old_values, -clip_range_vf, clip_range_vf
            )
        if getattr(self.rollout_buffer, "sample_weights", None) is not None:
            return self._loss_mean((rollout_data.returns - values_pred) ** 2, mask)
        if mask is None:
            return F.mse_loss(rollout_data.returns, values_pred)
        return th.mean(((rollout_data.returns - values_pred) ** 2)[mask])

    def _update_summary(
        self,
        history: dict[str, list[float]],
        approx_kl_divs: list,
        loss: th.Tensor,
        clip_range: float,
        clip_range_vf: float | None,
    ) -> dict[str, Any]:
        """The update's ``train/`` figures: SB3's (the approximate KL of the last epoch), then the extra terms'."""
        buffer = self.rollout_buffer
        figures = {
            "train/learning_rate": self._learning_rate(),
            **{f"train/{name}": np.mean(history[name]) for name in SB3_FIGURES if name in history},
            "train/approx_kl": np.mean(approx_kl_divs),
            "train/loss": loss.item(),
        }
        if self.trains_critic:
            figures["train/explained_variance"] = explained_variance(buffer.values.flatten(), buffer.returns.flatten())
        extra = {f"train/{name}": float(np.mean(values)) for name, values in history.items() if name not in SB3_FIGURES}
        figures.update(extra)
        if hasattr(self.policy, "log_std"):
            figures["train/std"] = th.exp(self.policy.log_std).mean().item()
        figures["train/n_updates"] = self._n_updates
        figures["train/clip_range"] = clip_range
        if clip_range_vf is not None:
            figures["train/clip_range_vf"] = clip_range_vf
        return figures
