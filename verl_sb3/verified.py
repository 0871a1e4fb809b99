"""Verified PPO: every update is checked, backtracked or rolled back, and can be undone on the next rollout.

:class:`VerificationMixin` puts the parts of :mod:`verl_sb3.verification` together around
:class:`~verl_sb3.ppo_update.PPOUpdateMixin`'s update: capture the model's state, update, verify,
search a shorter step, commit or restore, report. :class:`VerifiedPPO` and
:class:`VerifiedRecurrentPPO` put it on SB3's ``PPO`` and sb3-contrib's ``RecurrentPPO``.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, ClassVar

import torch as th
from gymnasium import spaces
from sb3_contrib import RecurrentPPO
from stable_baselines3 import PPO
from stable_baselines3.common.distributions import Distribution

from verl_sb3.entropy import DEFAULT_ENTROPY_COEF_RATE, EntropyController
from verl_sb3.estimation import AdvantageEstimationMixin
from verl_sb3.hf.policy import HFCausalLMPolicy
from verl_sb3.judged_collection import JudgedCollectionMixin
from verl_sb3.policies import SLMLstmPolicy, SLMTransformerPolicy
from verl_sb3.ppo_update import PPOUpdateMixin
from verl_sb3.reference import ReferenceKLMixin
from verl_sb3.rollout import FeedForward, RolloutBatch, policy_kind
from verl_sb3.tokens import require_token_sequences
from verl_sb3.trust import SafeLoadMixin
from verl_sb3.verification import checks as C
from verl_sb3.verification import legacy
from verl_sb3.verification.config import (
    DEFAULT_ADVANTAGE_TOLERANCE,
    DEFAULT_BACKTRACK_RATIO,
    DEFAULT_KL_THRESHOLD,
    DEFAULT_MAX_ABS_RETURN,
    DEFAULT_MAX_BACKTRACKS,
    DEFAULT_MAX_FORBIDDEN_PROB,
    DEFAULT_MIN_ENTROPY,
    DEFAULT_RETURNS_TOLERANCE,
    DEFAULT_SURROGATE_TOLERANCE,
    VerificationConfig,
)
from verl_sb3.verification.context import Check, CheckResult, UpdateContext, rollout_context
from verl_sb3.verification.judgement import (
    DEFAULT_LR_RECOVERY,
    DEFAULT_LR_SHRINK,
    DEFAULT_MIN_LR_SCALE,
    NextRolloutJudgement,
    RolloutJudge,
    UndoSettings,
)
from verl_sb3.verification.line_search import LineSearchResult, backtracking_line_search
from verl_sb3.verification.report import UpdateRecord, VerificationReport
from verl_sb3.verification.reuse_mass import ReuseMassJudge
from verl_sb3.verification.state import ModelState, policy_state, restore_if_non_finite, rollback_attribute_names
from verl_sb3.verification.verifier import non_finite_results, verify_update

# The classes that checkpoints of verl_sb3 0.1 pickled from this module (see verification.legacy).
_Snapshot, _PendingJudgement = legacy.Snapshot, legacy.PendingJudgement


def _judge_of(max_reuse_rise: float | None, judge: Any) -> RolloutJudge | None:
    """The judge of the next rollout: ``judge``, or the reuse-mass judge of ``max_reuse_rise``, or none."""
    if max_reuse_rise is not None:
        if judge is not None:
            raise ValueError("judge: give either judge= or max_reuse_rise= (the reuse-mass judge), not both")
        return ReuseMassJudge(max_reuse_rise)
    if judge is not None and not isinstance(judge, RolloutJudge):
        raise ValueError(
            f"judge: expected an object with the RolloutJudge methods (name, validate, measure, verdict), got {judge!r}"
        )
    return judge


def _forbidden_tokens_of(model: Any, forbidden_tokens: Any) -> tuple[int, ...]:
    """The forbidden tokens given, or, when None, those ``model``'s environment declares (TextGen-v0's ``config``)."""
    if forbidden_tokens is None:
        forbidden_tokens = C.environment_forbidden_tokens(model.env)
    tokens = VerificationConfig(forbidden_tokens=forbidden_tokens).forbidden_tokens
    if tokens:
        if not isinstance(model.action_space, spaces.Discrete):
            raise ValueError("forbidden_tokens: only supported for a Discrete action space")
        bad = [t for t in tokens if not 0 <= t < model.action_space.n]
        if bad:
            raise ValueError(f"forbidden_tokens: ids must lie in [0, {model.action_space.n - 1}], got {bad}")
    return tokens


class VerificationMixin(JudgedCollectionMixin, SafeLoadMixin):
    """Verifies each update of :class:`~verl_sb3.ppo_update.PPOUpdateMixin`; see :class:`VerifiedPPO`.

    The collection side (recorded logits, the next-rollout judgement) is :class:`JudgedCollectionMixin`'s.
    """

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
        forbidden_tokens: list[int] | tuple[int, ...] | None = None,
        max_forbidden_prob: float = DEFAULT_MAX_FORBIDDEN_PROB,
        max_repeat_prob: float | None = None,
        returns_tolerance: float = DEFAULT_RETURNS_TOLERANCE,
        advantage_tolerance: float = DEFAULT_ADVANTAGE_TOLERANCE,
        surrogate_tolerance: float = DEFAULT_SURROGATE_TOLERANCE,
        max_abs_return: float | None = DEFAULT_MAX_ABS_RETURN,
        max_backtracks: int = DEFAULT_MAX_BACKTRACKS,
        backtrack_ratio: float = DEFAULT_BACKTRACK_RATIO,
        checks: list[Check] | tuple[Check, ...] = (),
        max_log_entries: int | None = None,
        target_entropy: float | None = None,
        entropy_coef_rate: float = DEFAULT_ENTROPY_COEF_RATE,
        max_reuse_rise: float | None = None,
        judge: RolloutJudge | None = None,
        lr_shrink: float = DEFAULT_LR_SHRINK,
        lr_recovery: float = DEFAULT_LR_RECOVERY,
        min_lr_scale: float = DEFAULT_MIN_LR_SCALE,
        **kwargs: Any,
    ) -> None:
        if not isinstance(self, PPOUpdateMixin):
            raise TypeError(
                f"{type(self).__name__}: VerificationMixin verifies the update of PPOUpdateMixin; add it to the bases"
            )
        config = VerificationConfig(
            kl_threshold=kl_threshold,
            min_entropy=min_entropy,
            max_forbidden_prob=max_forbidden_prob,
            max_repeat_prob=max_repeat_prob,
            returns_tolerance=returns_tolerance,
            advantage_tolerance=advantage_tolerance,
            surrogate_tolerance=surrogate_tolerance,
            max_abs_return=max_abs_return,
            max_backtracks=max_backtracks,
            backtrack_ratio=backtrack_ratio,
            checks=tuple(checks),
            max_log_entries=max_log_entries,
        )
        vars(self).update(vars(config))  # the thresholds as the model's attributes, as SB3 keeps its settings
        self.checks = list(config.checks)
        if target_entropy is not None and min_entropy is None:
            raise ValueError("target_entropy: needs the entropy check; pass min_entropy (e.g. 0.0) instead of None")
        self.target_entropy, self.entropy_coef_rate = target_entropy, entropy_coef_rate
        if target_entropy is not None:
            EntropyController(target_entropy, entropy_coef_rate)  # validates both
        undo = UndoSettings(lr_shrink, lr_recovery, min_lr_scale)
        self.lr_shrink, self.lr_recovery, self.min_lr_scale = undo.lr_shrink, undo.lr_recovery, undo.min_lr_scale
        judge = _judge_of(max_reuse_rise, judge)
        self.max_reuse_rise = None if max_reuse_rise is None else judge.max_rise
        self.rollout_judgement = None if judge is None else NextRolloutJudgement(judge)
        #: Factor on the learning-rate schedule: lowered when an update is undone, see ``max_reuse_rise``.
        self.lr_scale = 1.0
        self.verification_report = VerificationReport()
        self._last_verified: ModelState | None = None  # what broken parameters return to
        self._update_figures: dict[str, Any] | None = None
        super().__init__(policy, env, *args, **kwargs)
        self.forbidden_tokens = _forbidden_tokens_of(self, forbidden_tokens)
        if self.max_repeat_prob is not None:
            require_token_sequences("max_repeat_prob", self)
        if self.rollout_judgement is not None:
            self.rollout_judgement.judge.validate(self)

    # ------------------------------------------------------------------ settings and reports
    def _setup_model(self) -> None:
        legacy.migrate(self)  # a model saved by verl_sb3 0.1, just loaded
        super()._setup_model()
        portable_kwargs = getattr(self.policy, "portable_kwargs", None)
        if callable(portable_kwargs):  # a save keeps settings, not the objects given (HFCausalLMPolicy's model)
            self.policy_kwargs = portable_kwargs(self.policy_kwargs)

    @property
    def verification_config(self) -> VerificationConfig:
        """The thresholds in force, from the model's attributes of the same names."""
        return VerificationConfig.from_object(self)

    @property
    def verification_log(self) -> list[UpdateRecord]:
        """One :class:`~verl_sb3.verification.report.UpdateRecord` per verified update."""
        return self.verification_report.log

    @property
    def verification_rate(self) -> float:
        """Share of verified updates accepted at the full step (NaN before the first update)."""
        return self.verification_report.verification_rate

    @property
    def n_undone(self) -> int:
        """How many accepted updates were undone on the next rollout."""
        return self.verification_report.n_undone

    def _excluded_save_params(self) -> list[str]:
        return [*super()._excluded_save_params(), "_rollout_logits", "_last_verified", "_update_figures"]

    def verify(self, ctx: UpdateContext) -> dict[str, CheckResult]:
        """The results of every check on ``ctx``, by name; the update is accepted when all pass.

        Override it to add checks (``results = super().verify(ctx); results["mine"] = ...``).
        """
        return verify_update(ctx, self.verification_config)

    # ------------------------------------------------------------------ the update
    def train(self) -> None:
        """The update, then its verification: kept, kept at a shorter step, or rolled back.

        Anything raised during the update (an interruption included) restores the state before
        it. An update that makes the parameters non-finite fails verification even when torch
        refused the NaN logits: it is rolled back and training goes on. Parameters already
        non-finite before the update are first restored to the last verified state.
        """
        self._repair_non_finite("before the update")
        kind = policy_kind(self.policy)
        batch = kind.rollout_batch(self.rollout_buffer, self.device)
        before = self._capture("before the update")
        old_distribution = self._old_distribution(kind, batch)
        try:
            try:
                super().train()
            except (ValueError, RuntimeError):
                if self._count_non_finite_parameters() == 0:
                    raise
            self._settle(kind, batch, old_distribution, before)
        except BaseException:
            before.restore(self)
            raise
        finally:
            self._update_figures = None

    def _record_update_figures(self, figures: dict[str, Any]) -> None:
        self._update_figures = figures  # logged once the update is accepted

    def _settle(
        self, kind: type[FeedForward], batch: RolloutBatch, old_distribution: Distribution, before: ModelState
    ) -> None:
        updated: dict[str, th.Tensor] | None = None

        def verify_at(step_size: float) -> dict[str, CheckResult]:
            nonlocal updated
            if step_size != 1.0:
                updated = updated if updated is not None else policy_state(self)
                before.interpolate(self, updated, step_size)
            return self._verify_current(kind, batch, old_distribution)

        search = backtracking_line_search(verify_at, self.max_backtracks, self.backtrack_ratio)
        if not search.accepted:
            before.restore(self)
        record = self.verification_report.add(search, self.num_timesteps, self.lr_scale, self.max_log_entries)
        self.verification_report.log_update(self.logger, record, self.rollout_judgement is not None, self.lr_scale)
        if self.verbose >= 1 and record["reason"]:
            print(f"verl: update {record['update']}: {record['reason']}")
        self._last_verified = self._capture(f"after update {record['update']}")
        if search.accepted:
            self._commit(search, record, before)

    def _commit(self, search: LineSearchResult, record: UpdateRecord, before: ModelState) -> None:
        """An accepted update: its figures logged, the entropy coefficient adapted, and, with a
        judge, the update kept undoable until the next rollout judges it."""
        if self._update_figures is not None:
            super()._record_update_figures(self._update_figures)
        entropy = search.final["entropy"].value if "entropy" in search.final else math.nan
        if self.target_entropy is not None and math.isfinite(entropy):
            self.ent_coef = EntropyController(self.target_entropy, self.entropy_coef_rate).next_coefficient(
                self.ent_coef, entropy
            )
            self.logger.record("verl/ent_coef", self.ent_coef)
        if self.rollout_judgement is not None:
            self.lr_scale = self._undo_settings().regrown(self.lr_scale)
            if record["kl_applied"] > 0:  # an update that left the policy unchanged is not judged
                self.rollout_judgement.await_judgement(before, record["update"])

    def _old_distribution(self, kind: type[FeedForward], batch: RolloutBatch) -> Distribution:
        """The policy's distribution on ``batch`` before the update: recorded during collection, else computed."""
        logits, self._rollout_logits = self._rollout_logits, None  # freed once the distribution holds them
        return kind.old_distribution(self.policy, batch, logits)

    def _verify_current(
        self, kind: type[FeedForward], batch: RolloutBatch, old: Distribution
    ) -> dict[str, CheckResult]:
        """:meth:`verify` on the current parameters; with non-finite ones, only what can be said."""
        bad = self._count_non_finite_parameters()
        if bad:
            return non_finite_results(
                self._context(kind, batch, old, evaluate_new=False), self.verification_config, bad
            )
        return self.verify(self._context(kind, batch, old))

    def _context(
        self, kind: type[FeedForward], batch: RolloutBatch, old: Distribution, evaluate_new: bool = True
    ) -> UpdateContext:
        """The update's context; with ``evaluate_new=False`` the old policy stands for the new one."""
        new_policy = self.policy if evaluate_new else None
        return rollout_context(kind, batch, old, new_policy, self.normalize_advantage, self.forbidden_tokens)

    # ------------------------------------------------------------------ the model's state
    def _capture(self, label: str) -> ModelState:
        return ModelState.capture(self, label, self._rollback_attribute_names())

    def _rollback_attribute_names(self) -> tuple[str, ...]:
        return rollback_attribute_names(type(self))

    def _count_non_finite_parameters(self) -> int:
        return C.count_non_finite([p.detach() for p in self.policy.parameters()])

    def _repair_non_finite(self, where: str) -> None:
        """Restore the last verified state when the parameters are found non-finite ``where``.

        Something outside the update (a callback, a user's code, a memory fault) broke them since
        the last verified update: rolling back the next update would only return to the broken
        state. A RuntimeWarning is issued, the logger records ``verl/recovered`` and the next log
        entry's ``recovered`` says what was done. With no verified state yet, a RuntimeError.
        """
        message = restore_if_non_finite(self, self._last_verified, where)
        if message is None:
            if self._last_verified is None:
                self._last_verified = self._capture("at the start of training")
            return
        self.verification_report.note_recovery(message)
        self.logger.record("verl/recovered", 1.0)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


class VerifiedPPO(VerificationMixin, ReferenceKLMixin, AdvantageEstimationMixin, PPOUpdateMixin, PPO):
    """SB3's PPO whose every update is verified, backtracked when it fails, rolled back if still failing.

    All of ``PPO``'s arguments and behaviour are kept (with permissive thresholds it trains bit
    for bit as ``PPO``); the verification arguments are keyword-only. After each ``train()``, on
    every state of the rollout just used, the update must pass the checks that
    :func:`~verl_sb3.verification.verifier.verify_update` runs (exact KL, the rollout's returns and
    advantages, the surrogate, finite parameters, entropy, the forbidden and repeat masses, the
    ``checks`` given, and whatever an override of :meth:`verify` adds).

    A failing update is backtracked: parameters ``old + backtrack_ratio**k * (new - old)`` for
    ``k = 1 .. max_backtracks``, the first passing one kept. If none passes, the policy, the
    optimizer state, ``_n_updates`` and the ``_rollback_attributes`` are restored exactly, and the
    update's ``train/`` figures are not logged. Each update appends an entry to
    ``verification_log``; ``verification_rate`` is the share accepted at the full step; the
    figures also go to the logger under ``verl/``.

    With a judge (``max_reuse_rise=z`` for TextGen-v0's reuse-mass judge, or ``judge=``), an
    accepted update is judged once more on the next rollout, the first one its policy collected
    (:mod:`verl_sb3.verification.judgement`): if the judge says so, it is undone (as a rollback,
    keeping what it logged), that rollout is collected again by the restored policy, and
    ``lr_scale``, a factor on the learning-rate schedule, shrinks (it regrows per accepted update).
    Updates that left the policy unchanged (KL 0) are not judged. An update awaiting its judgement
    is saved with the model.

    Verification arguments: those of :class:`~verl_sb3.verification.config.VerificationConfig`
    (``forbidden_tokens=None`` takes the environment's own, TextGen-v0's ``config.forbidden_tokens``),
    ``target_entropy`` and ``entropy_coef_rate`` (:class:`~verl_sb3.entropy.EntropyController`,
    applied after each accepted update; ``ent_coef`` is its starting value; needs ``min_entropy``),
    ``max_reuse_rise`` (:class:`~verl_sb3.verification.reuse_mass.ReuseMassJudge`) or ``judge``
    (any :class:`~verl_sb3.verification.judgement.RolloutJudge`), and ``lr_shrink``,
    ``lr_recovery``, ``min_lr_scale`` (:class:`~verl_sb3.verification.judgement.UndoSettings`).
    KL control toward a frozen reference policy takes :class:`verl_sb3.reference.ReferenceKLMixin`'s
    ``ref_kl_*`` arguments and ``reference``. The advantage estimator and veRL's loss settings
    (``advantage_estimator``: GAE or GRPO, Dr. GRPO, RLOO, REINFORCE++; ``loss_agg_mode``,
    ``clip_range_high``, ``filter_groups``) are :class:`verl_sb3.estimation.AdvantageEstimationMixin`'s;
    with a critic-free one the critic's checks give way to ``group_advantages``. Accepts the policies
    ``"SLMTransformerPolicy"`` and ``"HFCausalLMPolicy"`` (:mod:`verl_sb3.hf`) by name.
    """

    policy_aliases: ClassVar[dict[str, type]] = {
        **PPO.policy_aliases,
        "SLMTransformerPolicy": SLMTransformerPolicy,
        "HFCausalLMPolicy": HFCausalLMPolicy,
    }


class VerifiedRecurrentPPO(VerificationMixin, ReferenceKLMixin, AdvantageEstimationMixin, PPOUpdateMixin, RecurrentPPO):
    """sb3-contrib's RecurrentPPO with the verification of :class:`VerifiedPPO`.

    The update is verified on the rollout's sequences with their stored LSTM states and episode
    starts. Accepts the policy ``"SLMLstmPolicy"`` by name. Arguments: those of ``RecurrentPPO``
    plus :class:`VerifiedPPO`'s.
    """

    policy_aliases: ClassVar[dict[str, type]] = {**RecurrentPPO.policy_aliases, "SLMLstmPolicy": SLMLstmPolicy}
