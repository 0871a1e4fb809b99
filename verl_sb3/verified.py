"""Verified PPO: every ``train()`` is checked, backtracked or rolled back.

:class:`VerificationMixin` holds the mechanism (snapshot, verification, backtracking, rollback,
report); :class:`VerifiedPPO` and :class:`VerifiedRecurrentPPO` put it on SB3's ``PPO`` and
sb3-contrib's ``RecurrentPPO``. What is checked lives in :mod:`verl_sb3.checks`.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch as th
from gymnasium import spaces
from sb3_contrib import RecurrentPPO
from stable_baselines3 import PPO
from stable_baselines3.common.distributions import CategoricalDistribution, Distribution

from verl_sb3 import checks as C
from verl_sb3._util import distribution_validation, patched_attribute, require_number
from verl_sb3.checks import CheckResult, UpdateContext
from verl_sb3.policies import SLMLstmPolicy
from verl_sb3.reference import ReferenceKLMixin
from verl_sb3.transformer_policy import SLMTransformerPolicy

#: Defaults, measured on the default training run (see README, "Verification").
DEFAULT_KL_THRESHOLD = 0.25
DEFAULT_MIN_ENTROPY = 0.01
DEFAULT_MAX_FORBIDDEN_PROB = 0.05
DEFAULT_RETURNS_TOLERANCE = 1e-4
DEFAULT_ADVANTAGE_TOLERANCE = 0.05
DEFAULT_SURROGATE_TOLERANCE = 0.02
#: Bound on |return|: 500 times the default run's largest return (20), far below a corrupt reward.
DEFAULT_MAX_ABS_RETURN = 1e4
DEFAULT_MAX_BACKTRACKS = 5
DEFAULT_BACKTRACK_RATIO = 0.5
DEFAULT_ENTROPY_COEF_RATE = 0.01
#: Learning-rate scale after an undone update: multiplied by the shrink, regrown by the recovery
#: per accepted update, never below the floor (see ``max_reuse_rise``).
DEFAULT_LR_SHRINK = 0.5
DEFAULT_LR_RECOVERY = 1.02
DEFAULT_MIN_LR_SCALE = 1 / 32

_LOG_PREFIX = "train/"


@dataclass
class RolloutBatch:
    """The rollout just collected, one row per (environment, step), environment-major.

    ``lstm_states`` (recurrent policies) are the actor's states at each environment's first
    step, shaped ``(layers, n_envs, hidden)``.
    """

    observations: th.Tensor | dict[str, th.Tensor]
    actions: th.Tensor
    old_values: th.Tensor
    old_log_prob: th.Tensor
    advantages: th.Tensor
    returns: th.Tensor
    episode_starts: th.Tensor
    lstm_states: tuple[th.Tensor, th.Tensor] | None = None


@dataclass
class _Snapshot:
    """Everything an update changes, as it was before the update (saved with the model only while
    an update awaits its judgement on the next rollout)."""

    policy: dict[str, th.Tensor]
    optimizer: dict[str, Any]
    n_updates: int
    extra: dict[str, Any]
    logged: tuple[dict, dict, dict]


def _clone_state(value: Any) -> Any:
    """A copy of an optimizer state dict: tensors cloned, containers rebuilt, the rest shared."""
    if isinstance(value, th.Tensor):
        return value.clone()
    if isinstance(value, dict):
        return {key: _clone_state(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_clone_state(item) for item in value)
    return value


def _check_name(check: Callable) -> str:
    return getattr(check, "name", None) or getattr(check, "__name__", None) or type(check).__name__


@dataclass
class _PendingJudgement:
    """An accepted update awaiting the next rollout: the state before it (to undo it), its number
    in the log, and the reuse mass of the rollout it trained on (mean and standard error)."""

    snapshot: _Snapshot
    update: int
    reuse_before: tuple[float, float]


class VerificationMixin:
    """Verifies each PPO update on the rollout it was trained on; see :class:`VerifiedPPO`."""

    #: Attributes that a rollback restores besides the policy, the optimizer and ``_n_updates``
    #: (for controllers that ``train()`` updates). A subclass lists its own; those of its parent
    #: classes are restored too.
    _rollback_attributes: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        policy: Any,
        env: Any,
        *args: Any,
        kl_threshold: float = DEFAULT_KL_THRESHOLD,
        min_entropy: float | None = DEFAULT_MIN_ENTROPY,
        forbidden_tokens: Sequence[int] | None = None,
        max_forbidden_prob: float = DEFAULT_MAX_FORBIDDEN_PROB,
        max_repeat_prob: float | None = None,
        returns_tolerance: float = DEFAULT_RETURNS_TOLERANCE,
        advantage_tolerance: float = DEFAULT_ADVANTAGE_TOLERANCE,
        surrogate_tolerance: float = DEFAULT_SURROGATE_TOLERANCE,
        max_abs_return: float | None = DEFAULT_MAX_ABS_RETURN,
        max_backtracks: int = DEFAULT_MAX_BACKTRACKS,
        backtrack_ratio: float = DEFAULT_BACKTRACK_RATIO,
        checks: Sequence[Callable[[UpdateContext], CheckResult]] = (),
        max_log_entries: int | None = None,
        target_entropy: float | None = None,
        entropy_coef_rate: float = DEFAULT_ENTROPY_COEF_RATE,
        max_reuse_rise: float | None = None,
        lr_shrink: float = DEFAULT_LR_SHRINK,
        lr_recovery: float = DEFAULT_LR_RECOVERY,
        min_lr_scale: float = DEFAULT_MIN_LR_SCALE,
        **kwargs: Any,
    ) -> None:
        self.kl_threshold = require_number("kl_threshold", kl_threshold, 0.0, open_low=True)
        self.min_entropy = None if min_entropy is None else require_number("min_entropy", min_entropy, 0.0)
        self.max_forbidden_prob = require_number("max_forbidden_prob", max_forbidden_prob, 0.0, 1.0)
        self.max_repeat_prob = None if max_repeat_prob is None else require_number("max_repeat_prob", max_repeat_prob, 0.0, 1.0)
        self.returns_tolerance = require_number("returns_tolerance", returns_tolerance, 0.0)
        self.advantage_tolerance = require_number("advantage_tolerance", advantage_tolerance, 0.0)
        self.surrogate_tolerance = require_number("surrogate_tolerance", surrogate_tolerance, 0.0)
        self.max_abs_return = None if max_abs_return is None else require_number("max_abs_return", max_abs_return, 0.0, open_low=True)
        if isinstance(max_backtracks, bool) or not isinstance(max_backtracks, (int, np.integer)) or max_backtracks < 0:
            raise ValueError(f"max_backtracks: expected an integer >= 0, got {max_backtracks!r}")
        self.max_backtracks = int(max_backtracks)
        self.backtrack_ratio = require_number("backtrack_ratio", backtrack_ratio, 0.0, 1.0, open_low=True, open_high=True)
        bad_checks = [check for check in checks if not callable(check)]
        if bad_checks:
            raise ValueError(f"checks: expected callables taking an UpdateContext, got {bad_checks!r}")
        self.checks = list(checks)
        if max_log_entries is not None and (not isinstance(max_log_entries, (int, np.integer)) or max_log_entries < 1):
            raise ValueError(f"max_log_entries: expected None or an integer >= 1, got {max_log_entries!r}")
        self.max_log_entries = max_log_entries
        self.target_entropy = None if target_entropy is None else require_number("target_entropy", target_entropy, 0.0)
        if self.target_entropy is not None and self.min_entropy is None:
            raise ValueError("target_entropy: needs the entropy check; pass min_entropy (e.g. 0.0) instead of None")
        self.entropy_coef_rate = require_number("entropy_coef_rate", entropy_coef_rate, 0.0, open_low=True)
        self.max_reuse_rise = None if max_reuse_rise is None else require_number("max_reuse_rise", max_reuse_rise, 0.0)
        self.lr_shrink = require_number("lr_shrink", lr_shrink, 0.0, 1.0, open_low=True)
        self.min_lr_scale = require_number("min_lr_scale", min_lr_scale, 0.0, 1.0, open_low=True)
        self.lr_recovery = require_number("lr_recovery", lr_recovery, 1.0)
        #: Factor on the learning-rate schedule: lowered when an update is undone, see ``max_reuse_rise``.
        self.lr_scale = 1.0
        self._n_undone = 0
        # The reuse mass of the last rollout, and the last accepted update awaiting its judgement on
        # the next rollout (saved with the model, for exact resumption).
        self._rollout_reuse: tuple[float, float] | None = None
        self._pending_judgement: _PendingJudgement | None = None
        self.verification_log: list[dict[str, Any]] = []
        self._n_verified = 0
        self._n_accepted_first_try = 0
        self._n_rolled_back = 0
        # The policy and optimizer state after the last verified update (or at the start): what
        # parameters found non-finite between updates are restored to. Never saved.
        self._last_good: tuple[dict[str, th.Tensor], dict[str, Any], str] | None = None
        self._recovery: str | None = None  # such a restoration, reported in the next log entry
        super().__init__(policy, env, *args, **kwargs)
        self.forbidden_tokens = self._resolve_forbidden_tokens(forbidden_tokens)
        if self.max_repeat_prob is not None:
            self._require_token_sequences("max_repeat_prob")
        if self.max_reuse_rise is not None:
            self._require_token_sequences("max_reuse_rise")
            if self.n_envs < 2:
                raise ValueError(f"max_reuse_rise: needs at least 2 environments (the standard error is taken across "
                                 f"them), got {self.n_envs}")

    # ------------------------------------------------------------------ settings
    def _resolve_forbidden_tokens(self, forbidden_tokens: Sequence[int] | None) -> tuple[int, ...]:
        """The given tokens, or, when None, the environment's ``config.forbidden_tokens`` (TextGen-v0)."""
        if forbidden_tokens is None:
            try:
                forbidden_tokens = self.env.get_attr("config")[0].forbidden_tokens if self.env is not None else ()
            except (AttributeError, IndexError):
                forbidden_tokens = ()
        tokens = tuple(int(token) for token in forbidden_tokens)
        if tokens:
            if not isinstance(self.action_space, spaces.Discrete):
                raise ValueError("forbidden_tokens: only supported for a Discrete action space")
            bad = [t for t in tokens if not 0 <= t < self.action_space.n]
            if bad:
                raise ValueError(f"forbidden_tokens: ids must lie in [0, {self.action_space.n - 1}], got {bad}")
        return tokens

    def _require_token_sequences(self, argument: str) -> None:
        """Raise a ValueError naming ``argument`` unless the observations are TextGen-v0's kind:
        Discrete actions (tokens) and, as observations, sequences of token ids padded with the id
        ``n`` (a 1-D integer Box from 0 to the number of actions), not normalised."""
        obs, actions = self.observation_space, self.action_space
        if not (isinstance(actions, spaces.Discrete) and isinstance(obs, spaces.Box) and len(obs.shape) == 1
                and np.issubdtype(obs.dtype, np.integer) and np.all(obs.low == 0) and np.all(obs.high == actions.n)):
            raise ValueError(f"{argument}: needs Discrete(n) actions and token-sequence observations padded with the id n "
                             f"(a 1-D integer Box from 0 to n, as TextGen-v0's), got {actions} and {obs}")
        normalizer = self.get_vec_normalize_env()
        if normalizer is not None and normalizer.norm_obs:
            raise ValueError(f"{argument}: needs the token ids themselves; VecNormalize(norm_obs=True) rescales them")

    def _previous_tokens(self, observations: th.Tensor) -> th.Tensor:
        """Per row of token-sequence observations (ids left-aligned, then padding ids >= the number
        of actions), its last token, or -1 when the sequence is empty."""
        tokens = observations.long()
        lengths = (tokens < self.action_space.n).long().cumprod(dim=1).sum(dim=1)
        last = tokens.gather(1, (lengths - 1).clamp(min=0)[:, None]).squeeze(1)
        return th.where(lengths > 0, last, -1)

    @property
    def verification_rate(self) -> float:
        """Share of verified updates accepted at the full step (NaN before the first update)."""
        return self._n_accepted_first_try / self._n_verified if self._n_verified else float("nan")

    # ------------------------------------------------------------------ what is checked
    def verify(self, ctx: UpdateContext) -> dict[str, CheckResult]:
        """The results of every check on ``ctx``, by name; the update is accepted when all pass.

        Override it to add checks (``results = super().verify(ctx); results["mine"] = ...``).
        """
        results = {
            "kl": C.kl_check(ctx, self.kl_threshold),
            **self._rollout_checks(ctx),
            "surrogate": C.surrogate_check(ctx, self.surrogate_tolerance),
            "finite_parameters": C.finite_parameters_check(ctx),
        }
        if self.min_entropy is not None:
            results["entropy"] = C.entropy_check(ctx, self.min_entropy)
        if self.forbidden_tokens:
            results["forbidden_mass"] = C.forbidden_mass_check(ctx, self.max_forbidden_prob)
        if self.max_repeat_prob is not None:
            results["repeat_mass"] = C.repeat_mass_check(ctx, self.max_repeat_prob)
        for check in self.checks:
            result = check(ctx)
            if not isinstance(result, CheckResult):
                raise TypeError(f"checks: {_check_name(check)!r} returned {type(result).__name__}, expected a CheckResult")
            results[_check_name(check)] = result
        return results

    def _rollout_checks(self, ctx: UpdateContext) -> dict[str, CheckResult]:
        """The checks of the rollout's advantages, returns and values (independent of the update)."""
        results = {
            "advantage_finite": C.advantage_finite_check(ctx),
            "returns_match": C.returns_match_check(ctx, self.returns_tolerance),
            "advantage_normalization": C.advantage_normalization_check(ctx, self.advantage_tolerance),
        }
        if self.max_abs_return is not None:
            results["return_bound"] = C.return_bound_check(ctx, self.max_abs_return)
        return results

    # ------------------------------------------------------------------ the update
    def collect_rollouts(self, *args: Any, **kwargs: Any) -> bool:
        """The parent's collection (see :meth:`_collect_recording_logits`); with ``max_reuse_rise``,
        the last accepted update is then judged on this rollout, which it collected, and undone
        (the rollout collected again) when it made the policy reuse tokens more."""
        collected = self._collect_recording_logits(*args, **kwargs)
        if not collected or self.max_reuse_rise is None:
            return collected
        reuse = self._measure_rollout_reuse()
        pending, self._pending_judgement = self._pending_judgement, None
        if pending is not None and reuse is not None and self._reuse_rose(pending.reuse_before, reuse):
            self._undo(pending, reuse)
            collected = self._collect_recording_logits(*args, **kwargs)
            reuse = self._measure_rollout_reuse() if collected else None
        self._rollout_reuse = reuse
        return collected

    def _collect_recording_logits(self, *args: Any, **kwargs: Any) -> bool:
        """The parent's collection, recording the action logits the policy computed at each step.

        They are the old policy's distribution on the rollout, which verification then needs
        without a second forward pass (Discrete actions; other spaces recompute it).

        Parameters found non-finite before the collection are restored to the last verified
        state first (see :meth:`_recover_non_finite_parameters`); parameters that become
        non-finite during it raise a RuntimeError that says so.
        """
        self._recover_non_finite_parameters("before collecting a rollout")
        policy, forward, n_steps = self.policy, self.policy.forward, self.n_steps
        # (n_envs, n_steps, n_actions), environment-major as the verified batch: filled step by step,
        # so that the old distribution needs no stacking or transposing copy of the rollout's logits.
        captured: dict[str, Any] = {"logits": None, "steps": 0}

        def recording_forward(*f_args: Any, **f_kwargs: Any) -> Any:
            output = forward(*f_args, **f_kwargs)
            if isinstance(policy.action_dist, CategoricalDistribution):
                logits, step = policy.action_dist.distribution.logits, captured["steps"]
                if captured["logits"] is None:
                    captured["logits"] = logits.new_empty((logits.shape[0], n_steps, logits.shape[1]))
                if step < n_steps and logits.shape[0] == captured["logits"].shape[0]:
                    captured["logits"][:, step] = logits
                captured["steps"] = step + 1
            return output

        try:
            with patched_attribute(policy, "forward", recording_forward):
                return super().collect_rollouts(*args, **kwargs)
        except (ValueError, RuntimeError) as error:
            bad = self._count_non_finite_parameters()
            if bad:
                raise RuntimeError(
                    f"finite_parameters: {bad} policy parameters ({', '.join(self._non_finite_parameter_names())}) became "
                    f"non-finite while collecting a rollout, at timestep {self.num_timesteps}: the rollout cannot be used"
                ) from error
            raise
        finally:
            self._rollout_logits = captured

    # ------------------------------------------------------------------ judged on the next rollout
    def _measure_rollout_reuse(self) -> tuple[float, float] | None:
        """The reuse mass (:func:`verl_sb3.checks.reuse_mass`) of the policy on the rollout just
        collected, its own states: the mean and its standard error across environments; None when
        the logits were not recorded at every step. Override it to judge another quantity of the
        rollout (a rise by more than ``max_reuse_rise`` standard errors undoes the update)."""
        logits = self._recorded_logits()
        if logits is None:
            return None
        n_envs, n_steps = logits.shape[:2]
        observations = th.as_tensor(self.rollout_buffer.observations, device=logits.device)  # (steps, envs, length)
        tokens = observations.transpose(0, 1).reshape(n_envs * n_steps, -1)
        with th.no_grad():
            per_env = C.reuse_mass(logits.reshape(n_envs * n_steps, -1), tokens, self.action_space.n).reshape(n_envs, n_steps).mean(1)
        return per_env.mean().item(), per_env.std().item() / math.sqrt(n_envs)

    def _reuse_rose(self, before: tuple[float, float], after: tuple[float, float]) -> bool:
        """Whether the reuse mass rose by more than ``max_reuse_rise`` standard errors of the difference."""
        return after[0] - before[0] > self.max_reuse_rise * math.hypot(before[1], after[1])

    def _undo(self, pending: _PendingJudgement, reuse: tuple[float, float]) -> None:
        """Restore the state before the judged update, lower the learning-rate scale, report it."""
        self._restore(pending.snapshot, logged=False)
        self._last_good = self._copy_state(f"after undoing update {pending.update}")
        self.lr_scale = max(self.min_lr_scale, self.lr_scale * self.lr_shrink)
        self._n_undone += 1
        (before, before_se), (after, after_se) = pending.reuse_before, reuse
        reason = (f"undone on the next rollout: reuse mass {before:.4g} -> {after:.4g} (standard errors {before_se:.2g}, "
                  f"{after_se:.2g}; more than {self.max_reuse_rise:g} of the difference); rollout collected again, "
                  f"learning-rate scale {self.lr_scale:g}")
        log = self.verification_log
        if log and log[-1]["update"] == pending.update:  # the last entry until the next update
            log[-1].update(undone=True, reuse_after=after, undo_reason=reason)
        self.logger.record("verl/undone", 1.0)
        self.logger.record("verl/n_undone", self._n_undone)
        self.logger.record("verl/lr_scale", self.lr_scale)
        if self.verbose >= 1:
            print(f"verl: update {pending.update}: {reason}")

    @property
    def n_undone(self) -> int:
        """How many accepted updates were undone on the next rollout (``max_reuse_rise``)."""
        return self._n_undone

    def _update_learning_rate(self, optimizers: Any) -> None:
        """SB3's schedule, times ``lr_scale`` (logged as ``train/learning_rate``)."""
        super()._update_learning_rate(optimizers)
        if self.lr_scale == 1.0:
            return
        for optimizer in optimizers if isinstance(optimizers, list) else [optimizers]:
            for group in optimizer.param_groups:
                group["lr"] *= self.lr_scale
        self.logger.record("train/learning_rate", self.lr_schedule(self._current_progress_remaining) * self.lr_scale)

    def _excluded_save_params(self) -> list[str]:
        return [*super()._excluded_save_params(), "_rollout_logits", "_last_good"]

    def train(self) -> None:
        """PPO's update, then verification; a failing update is backtracked, else rolled back.

        An update that makes the parameters non-finite fails verification even when PPO's own
        loop raised on them (torch refuses NaN logits): it is rolled back and training goes on.
        Parameters already non-finite before the update (changed since the last one) are first
        restored to the last verified state.
        """
        self._recover_non_finite_parameters("before the update")
        batch = self._rollout_batch()
        snapshot = self._take_snapshot()
        old_distribution = self._old_distribution(batch)
        try:
            super().train()
        except (ValueError, RuntimeError):
            if self._count_non_finite_parameters() == 0:
                self._restore(snapshot)
                raise
        try:
            self._settle_update(batch, old_distribution, snapshot)
        except BaseException:
            self._restore(snapshot)
            raise

    def _recorded_logits(self) -> th.Tensor | None:
        """The action logits recorded during the last collection, (n_envs, n_steps, n_actions), or
        None unless they were recorded at every step of the rollout buffer."""
        captured = getattr(self, "_rollout_logits", None) or {"logits": None, "steps": 0}
        logits, buffer = captured["logits"], self.rollout_buffer
        if logits is None or captured["steps"] != buffer.buffer_size or logits.shape[:2] != (buffer.n_envs, buffer.buffer_size):
            return None
        return logits

    def _old_distribution(self, batch: RolloutBatch) -> Distribution:
        """The policy's distribution on ``batch`` before the update: recorded during collection, else computed."""
        logits, self._rollout_logits = self._recorded_logits(), None  # freed once the distribution holds them
        n_steps, n_envs = self.rollout_buffer.buffer_size, self.rollout_buffer.n_envs
        with distribution_validation(False):
            if logits is not None:
                return copy.copy(self.policy.action_dist).proba_distribution(action_logits=logits.reshape(n_envs * n_steps, -1))
            self.policy.set_training_mode(False)
            with th.no_grad():
                return self._policy_on_batch(batch)[0]

    def _settle_update(self, batch: Any, old_distribution: Distribution, snapshot: _Snapshot) -> None:
        full_step = results = self._verify_current(batch, old_distribution)
        backtracks, step_size = 0, 1.0
        if not self._passed(results) and self.max_backtracks:
            updated = {name: tensor.clone() for name, tensor in self.policy.state_dict().items()}
        while not self._passed(results) and backtracks < self.max_backtracks:
            backtracks += 1
            step_size = self.backtrack_ratio**backtracks
            self._interpolate(snapshot.policy, updated, step_size)
            results = self._verify_current(batch, old_distribution)
        accepted = self._passed(results)
        if not accepted:
            self._restore(snapshot)
        self._report(full_step, results, accepted, backtracks, step_size)
        self._last_good = self._copy_state(f"after update {self._n_verified - 1}")
        if accepted:
            self._adapt_entropy_coefficient(results["entropy"].value if "entropy" in results else math.nan)
            self._await_judgement(snapshot)

    def _await_judgement(self, snapshot: _Snapshot) -> None:
        """With ``max_reuse_rise``: keep what undoing the accepted update needs until the next
        rollout judges it (an update that left the policy unchanged is not judged), and regrow the
        learning-rate scale."""
        if self.max_reuse_rise is None:
            return
        self.lr_scale = min(1.0, self.lr_scale * self.lr_recovery)
        entry = self.verification_log[-1]
        if self._rollout_reuse is not None and entry["kl_applied"] > 0:
            self._pending_judgement = _PendingJudgement(snapshot, entry["update"], self._rollout_reuse)

    def _adapt_entropy_coefficient(self, entropy: float) -> None:
        """With ``target_entropy``: ``ent_coef = max(0, ent_coef + entropy_coef_rate * (target - entropy))``.

        ``ent_coef`` acts as the Lagrange multiplier of the constraint "entropy >= target": dual
        ascent raises it while the policy's entropy is below the target and lowers it, down to
        0, above.
        """
        if self.target_entropy is None or not math.isfinite(entropy):
            return
        self.ent_coef = max(0.0, float(self.ent_coef) + self.entropy_coef_rate * (self.target_entropy - entropy))
        self.logger.record("verl/ent_coef", self.ent_coef)

    def _parameters(self) -> list[th.Tensor]:
        return [p.detach() for p in self.policy.parameters()]

    def _count_non_finite_parameters(self) -> int:
        return C.count_non_finite(self._parameters())

    def _non_finite_parameter_names(self) -> list[str]:
        return [name for name, p in self.policy.named_parameters() if not bool(th.isfinite(p).all())]

    def _copy_state(self, label: str) -> tuple[dict[str, th.Tensor], dict[str, Any], str]:
        """A copy of the policy's and the optimizer's state, labelled (about 0.2 ms for the default SLM)."""
        policy = {name: tensor.clone() for name, tensor in self.policy.state_dict().items()}
        return policy, _clone_state(self.policy.optimizer.state_dict()), label

    def _recover_non_finite_parameters(self, where: str) -> None:
        """Restore the last verified state when the parameters are found non-finite ``where``.

        Something outside the update (a callback, a user's code, a memory fault) broke them since
        the last verified update: rolling back the next update would only return to the broken
        state. The policy and the optimizer state go back to their copy taken after the last
        verified update (or at the start of training); a RuntimeWarning is issued, the logger
        records ``verl/recovered`` and the next log entry's ``recovered`` says what was done.
        With no such copy (broken before the first check), a RuntimeError is raised.
        """
        bad = self._count_non_finite_parameters()
        if not bad:
            if self._last_good is None:
                self._last_good = self._copy_state("at the start of training")
            return
        message = (f"finite_parameters: {bad} non-finite parameters ({', '.join(self._non_finite_parameter_names())}) "
                   f"found {where}, at timestep {self.num_timesteps}")
        if self._last_good is None:
            raise RuntimeError(f"{message}; no verified state to restore")
        policy, optimizer, label = self._last_good
        self.policy.load_state_dict(policy)
        # A copy: the optimizer may keep the given tensors and update them in place.
        self.policy.optimizer.load_state_dict(_clone_state(optimizer))
        message = f"{message}; restored the last verified state ({label})"
        self._recovery = message if self._recovery is None else f"{self._recovery}; {message}"
        self.logger.record("verl/recovered", 1.0)
        warnings.warn(message, RuntimeWarning, stacklevel=3)

    def _verify_current(self, batch: Any, old_distribution: Distribution) -> dict[str, CheckResult]:
        """:meth:`verify` on the current parameters; with non-finite ones, only what can be said."""
        bad = self._count_non_finite_parameters()
        if bad:
            message = f"{bad} non-finite parameters"
            return {
                "kl": CheckResult(False, math.nan, self.kl_threshold, f"not computed: {message}"),
                **self._rollout_checks(self._update_context(batch, old_distribution, evaluate_new=False)),
                "finite_parameters": CheckResult(False, float(bad), 0.0, message),
            }
        return self.verify(self._update_context(batch, old_distribution))

    @staticmethod
    def _passed(results: dict[str, CheckResult]) -> bool:
        return all(result.passed for result in results.values())

    def _rollout_batch(self) -> RolloutBatch:
        """The whole rollout as one batch, environment-major (row ``env * n_steps + step``), as
        the buffer holds it before ``train()`` reorders it; numpy's random state is not touched."""
        buffer = self.rollout_buffer
        flat = buffer.generator_ready  # already flattened (environment-major) by an earlier get()

        def tensor(array: np.ndarray) -> th.Tensor:
            return th.as_tensor(array if flat else buffer.swap_and_flatten(array), device=self.device)

        observations = buffer.observations
        return RolloutBatch(
            observations={k: tensor(v) for k, v in observations.items()} if isinstance(observations, dict) else tensor(observations),
            actions=tensor(buffer.actions),
            old_values=tensor(buffer.values).flatten(),
            old_log_prob=tensor(buffer.log_probs).flatten(),
            advantages=tensor(buffer.advantages).flatten(),
            returns=tensor(buffer.returns).flatten(),
            episode_starts=tensor(buffer.episode_starts).flatten(),
        )

    def _policy_on_batch(self, batch: Any) -> tuple[Distribution, th.Tensor, th.Tensor]:
        """The policy's distribution on the batch, the log-probability of its actions, and the real-sample mask.

        SB3 policies reuse one ``Distribution`` object: implementations return a copy of it.
        """
        raise NotImplementedError

    @staticmethod
    def _real_samples(batch: RolloutBatch) -> th.Tensor:
        """Every sample of the rollout batch is real (it has no padding)."""
        return th.ones(len(batch.advantages), dtype=th.bool, device=batch.advantages.device)

    def _batch_actions(self, batch: Any) -> th.Tensor:
        if isinstance(self.action_space, spaces.Discrete):
            return batch.actions.long().flatten()
        return batch.actions

    def _update_context(self, batch: Any, old_distribution: Distribution, evaluate_new: bool = True) -> UpdateContext:
        """The update's context; with ``evaluate_new=False`` the new policy stands for the old one."""
        with th.no_grad(), distribution_validation(False):
            actions = self._batch_actions(batch)
            if evaluate_new:
                new_distribution, new_log_prob, mask = self._policy_on_batch(batch)
            else:
                new_distribution, new_log_prob = old_distribution, batch.old_log_prob
                mask = self._real_samples(batch)
            all_real = bool(mask.all())

            def real(values: th.Tensor) -> th.Tensor:
                return values if all_real else values[mask]

            return UpdateContext(
                old_distribution=old_distribution,
                new_distribution=new_distribution,
                mask=mask,
                actions=real(actions),
                advantages=real(batch.advantages),
                returns=real(batch.returns),
                values=real(batch.old_values),
                old_log_prob=real(batch.old_log_prob),  # as PPO's ratio uses it
                new_log_prob=real(new_log_prob),
                normalize_advantage=self.normalize_advantage,
                parameters=self._parameters(),
                forbidden_tokens=self.forbidden_tokens,
                previous_tokens=(real(self._previous_tokens(batch.observations))
                                 if self.max_repeat_prob is not None and evaluate_new else None),
            )

    # ------------------------------------------------------------------ snapshot and rollback
    def _take_snapshot(self) -> _Snapshot:
        logger = self.logger
        logged = tuple(
            {k: v for k, v in table.items() if k.startswith(_LOG_PREFIX)}
            for table in (logger.name_to_value, logger.name_to_count, logger.name_to_excluded)
        )
        policy, optimizer, _ = self._copy_state("before the update")
        return _Snapshot(
            policy=policy,
            optimizer=optimizer,
            n_updates=self._n_updates,
            extra={name: copy.deepcopy(getattr(self, name)) for name in self._rollback_attribute_names()},
            logged=logged,
        )

    def _rollback_attribute_names(self) -> tuple[str, ...]:
        """The ``_rollback_attributes`` of every class of the model, parents first, without repeats."""
        names = (name for klass in reversed(type(self).__mro__) for name in vars(klass).get("_rollback_attributes", ()))
        return tuple(dict.fromkeys(names))

    def _restore(self, snapshot: _Snapshot, logged: bool = True) -> None:
        """Put back, bit for bit, everything the update changed, and (``logged``) what it logged."""
        self.policy.load_state_dict(snapshot.policy)
        self.policy.optimizer.load_state_dict(snapshot.optimizer)
        self._n_updates = snapshot.n_updates
        for name, value in snapshot.extra.items():
            setattr(self, name, value)
        if not logged:
            return
        logger = self.logger
        for table, saved in zip((logger.name_to_value, logger.name_to_count, logger.name_to_excluded), snapshot.logged):
            for key in [k for k in table if k.startswith(_LOG_PREFIX)]:
                del table[key]
            table.update(saved)

    def _interpolate(self, old: dict[str, th.Tensor], new: dict[str, th.Tensor], step_size: float) -> None:
        """Set the policy's floating-point tensors to ``old + step_size * (new - old)``."""
        with th.no_grad():
            for name, tensor in self.policy.state_dict().items():
                if tensor.is_floating_point():
                    tensor.copy_(old[name] + step_size * (new[name] - old[name]))

    # ------------------------------------------------------------------ report
    def _report(
        self,
        full_step: dict[str, CheckResult],
        final: dict[str, CheckResult],
        accepted: bool,
        backtracks: int,
        step_size: float,
    ) -> None:
        failed = [f"{name}: {result.message} (threshold {result.threshold})" for name, result in full_step.items() if not result.passed]
        if not failed:
            reason = None
        elif accepted:
            reason = f"full step failed [{'; '.join(failed)}]; accepted at step size {step_size:g} after {backtracks} backtracks"
        else:
            reason = f"rolled back after {backtracks} backtracks: {'; '.join(failed)}"
        entry = {
            "update": self._n_verified,
            "timesteps": int(self.num_timesteps),
            "accepted": accepted,
            "rolled_back": not accepted,
            "backtracks": backtracks,
            "step_size": step_size if accepted else 0.0,
            "kl": full_step["kl"].value,
            "kl_max": full_step["kl"].details.get("max", math.nan),
            "kl_applied": final["kl"].value if accepted else 0.0,
            "entropy": full_step["entropy"].value if "entropy" in full_step else float("nan"),
            "checks": {name: result.as_dict() for name, result in full_step.items()},
            "reason": reason,
            "recovered": self._recovery,
            "lr_scale": self.lr_scale,
            "undone": False,
        }
        self._recovery = None
        self._n_verified += 1
        self._n_accepted_first_try += int(accepted and backtracks == 0)
        self._n_rolled_back += int(not accepted)
        self.verification_log.append(entry)
        if self.max_log_entries is not None and len(self.verification_log) > self.max_log_entries:
            del self.verification_log[: len(self.verification_log) - self.max_log_entries]

        record = self.logger.record
        record("verl/accepted", float(accepted))
        record("verl/rolled_back", float(not accepted))
        record("verl/backtracks", backtracks)
        record("verl/step_size", entry["step_size"])
        record("verl/kl", entry["kl"])
        record("verl/kl_applied", entry["kl_applied"])
        record("verl/verification_rate", self.verification_rate)
        record("verl/n_rolled_back", self._n_rolled_back)
        record("verl/kl_max", entry["kl_max"])
        if self.max_reuse_rise is not None:
            record("verl/n_undone", self._n_undone)
            record("verl/lr_scale", self.lr_scale)
        for name, result in full_step.items():
            record(f"verl/check_{name}", result.value)
        if self.verbose >= 1 and reason:
            print(f"verl: update {entry['update']}: {reason}")


class VerifiedPPO(VerificationMixin, ReferenceKLMixin, PPO):
    """SB3's PPO whose every update is verified, backtracked when it fails, rolled back if still failing.

    All of ``PPO``'s arguments and behaviour are kept; the verification arguments are keyword-only.

    After each ``train()``, on every state of the rollout just used, the update must pass:

    - ``kl``: exact mean KL(old || new) over the full action distribution <= ``kl_threshold``;
    - ``return_bound`` (returns finite, |return| <= ``max_abs_return``), ``advantage_finite``,
      ``returns_match`` (returns = advantages + values, to ``returns_tolerance``),
      ``advantage_normalization`` (normalised advantages: mean 0 and std 1, to ``advantage_tolerance``),
      ``surrogate`` (mean(ratio * A) - mean(A) >= -``surrogate_tolerance``);
    - ``finite_parameters``, ``entropy`` (mean entropy >= ``min_entropy``); with
      ``forbidden_tokens``, ``forbidden_mass`` (<= ``max_forbidden_prob``, or not higher than before);
      with ``max_repeat_prob``, ``repeat_mass``: the mean probability of repeating each state's
      previous token (<= ``max_repeat_prob``, or not higher than before);
    - every user check in ``checks`` and whatever an override of :meth:`verify` adds.

    Accepts the policy ``"SLMTransformerPolicy"`` by name besides PPO's.

    A failing update is backtracked: parameters ``old + backtrack_ratio**k * (new - old)`` for
    ``k = 1 .. max_backtracks``, the first passing one kept. If none passes, the policy, the
    optimizer state, ``_n_updates``, the ``_rollback_attributes`` and the ``train/`` figures
    logged by the update are restored exactly. Each update appends an entry to
    ``verification_log``; ``verification_rate`` is the share accepted at the full step; the
    figures also go to the logger under ``verl/``.

    With ``max_reuse_rise``, an accepted update is judged once more on the next rollout, the first
    one its policy collected: checks on the rollout an update trained on cannot see where the
    updated policy takes its own sequences. If the reuse mass there (the mean probability of
    choosing a token already in the sequence, :func:`verl_sb3.checks.reuse_mass`) rose by more
    than ``max_reuse_rise`` standard errors of the difference from the rollout the update
    trained on, the update is undone (as a rollback, keeping what it logged), that rollout is
    collected again by the restored policy, and ``lr_scale``, a factor on the learning-rate
    schedule, is multiplied by ``lr_shrink`` (not below ``min_lr_scale``); each accepted update
    multiplies it by ``lr_recovery`` (up to 1). The log entry of an undone update says
    ``undone`` and why; ``n_undone`` counts them. Updates that left the policy unchanged (KL 0,
    e.g. a critic warm-up) are not judged. An update awaiting its judgement is saved with the
    model.

    :param kl_threshold: largest accepted mean KL(old || new), > 0.
    :param min_entropy: smallest accepted mean policy entropy in nats, >= 0, or None to skip the check.
    :param forbidden_tokens: actions whose probability mass is bounded (Discrete actions); None takes
        the environment's ``config.forbidden_tokens`` when it has one (TextGen-v0).
    :param max_forbidden_prob: bound on the mean probability of the forbidden tokens, in [0, 1].
    :param max_repeat_prob: bound on the mean probability of repeating the previous token, in [0, 1],
        or None (default) to skip the check. Needs token-sequence observations (TextGen-v0's); the
        default training sets it to 0.03, 1.5 times a uniform policy's over 50 tokens.
    :param returns_tolerance: largest accepted |returns - (advantages + values)|, relative to the returns' scale.
    :param advantage_tolerance: largest accepted deviation of normalised advantages from mean 0 / std 1.
    :param surrogate_tolerance: largest accepted decrease of the surrogate objective.
    :param max_abs_return: largest accepted |return| of the rollout (rewards and the critic's
        bootstrap together), > 0, or None to skip the check; non-finite returns always fail.
    :param max_backtracks: how many shorter steps to try before rolling back, >= 0.
    :param backtrack_ratio: step shrink factor per backtrack, in (0, 1).
    :param checks: extra checks: callables ``check(ctx: UpdateContext) -> CheckResult``.
    :param max_log_entries: keep only the last entries of ``verification_log`` (None: keep all).
    :param target_entropy: when set (nats), ``ent_coef`` adapts after each accepted update to keep the
        policy's mean entropy at least near it, as a Lagrange multiplier:
        ``ent_coef = max(0, ent_coef + entropy_coef_rate * (target - entropy))``. ``ent_coef`` is then
        its starting value. Needs ``min_entropy``.
    :param entropy_coef_rate: step size of that adaptation, > 0.
    :param max_reuse_rise: judge each accepted update on the next rollout (see above): the rise
        of the reuse mass that undoes it, in standard errors, >= 0; None (default) not to judge.
        Needs token-sequence observations (as ``max_repeat_prob``) and at least 2 environments.
        The default training uses 3.
    :param lr_shrink: factor on ``lr_scale`` when an update is undone, in (0, 1].
    :param lr_recovery: factor on ``lr_scale`` after each accepted update, >= 1.
    :param min_lr_scale: the smallest ``lr_scale``, in (0, 1].

    KL control toward a frozen reference policy (off by default) takes the arguments of
    :class:`verl_sb3.reference.ReferenceKLMixin`: ``ref_kl_coef``, ``ref_kl_estimator``,
    ``ref_kl_mode``, ``ref_kl_target``, ``ref_kl_horizon``, ``reference``. Its coefficient
    controller is restored with the rest when an update is rolled back.
    """

    policy_aliases: ClassVar[dict[str, type]] = {**PPO.policy_aliases, "SLMTransformerPolicy": SLMTransformerPolicy}

    def _policy_on_batch(self, batch: Any) -> tuple[Distribution, th.Tensor, th.Tensor]:
        distribution = copy.copy(self.policy.get_distribution(batch.observations))
        log_prob = distribution.log_prob(self._batch_actions(batch))
        return distribution, log_prob, self._real_samples(batch)


class VerifiedRecurrentPPO(VerificationMixin, ReferenceKLMixin, RecurrentPPO):
    """sb3-contrib's RecurrentPPO with the verification of :class:`VerifiedPPO`.

    The update is verified on the rollout's sequences with their stored LSTM states, episode
    starts and padding masks (padding is excluded from every figure). Accepts the policy
    ``"SLMLstmPolicy"`` by name. Arguments: those of ``RecurrentPPO`` plus :class:`VerifiedPPO`'s.
    """

    policy_aliases: ClassVar[dict[str, type]] = {**RecurrentPPO.policy_aliases, "SLMLstmPolicy": SLMLstmPolicy}

    def _policy_on_batch(self, batch: Any) -> tuple[Distribution, th.Tensor, th.Tensor]:
        distribution, _ = self.policy.get_distribution(batch.observations, batch.lstm_states, batch.episode_starts)
        distribution = copy.copy(distribution)
        log_prob = distribution.log_prob(self._batch_actions(batch))
        return distribution, log_prob, self._real_samples(batch)

    def _rollout_batch(self) -> RolloutBatch:
        """One sequence per environment, starting from the actor's LSTM state stored at its first step."""
        batch = super()._rollout_batch()
        buffer = self.rollout_buffer
        if buffer.generator_ready:  # (n_envs * n_steps, layers, hidden), environment-major
            first = slice(None, None, buffer.buffer_size)
            states = (buffer.hidden_states_pi[first].swapaxes(0, 1), buffer.cell_states_pi[first].swapaxes(0, 1))
        else:  # (n_steps, layers, n_envs, hidden)
            states = (buffer.hidden_states_pi[0], buffer.cell_states_pi[0])
        batch.lstm_states = tuple(th.as_tensor(np.ascontiguousarray(x), device=self.device) for x in states)
        return batch
