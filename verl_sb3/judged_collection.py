"""The collection side of a verified algorithm: each rollout collected with the policy's logits
recorded, its parameters checked first, and the last accepted update judged on it.

:class:`JudgedCollectionMixin` is the part of :class:`verl_sb3.verified.VerificationMixin` that
runs around ``collect_rollouts``; the verification of the update itself is the other part. It
reads the mixin's state: ``rollout_judgement`` (None: no judge), ``lr_scale`` and the
``lr_shrink`` / ``lr_recovery`` / ``min_lr_scale`` settings, the ``verification_report``, and the
methods ``_repair_non_finite``, ``_capture``, ``_count_non_finite_parameters``.
"""

from __future__ import annotations

from typing import Any

import torch as th

from verl_sb3.rollout import LogitsRecorder
from verl_sb3.verification.checks import non_finite_parameter_names
from verl_sb3.verification.judgement import CollectedRollout, PendingJudgement, UndoSettings


class JudgedCollectionMixin:
    """``collect_rollouts`` with the recorded logits and the next-rollout judgement (see the module)."""

    _rollout_logits: th.Tensor | None = None

    def collect_rollouts(self, env: Any, callback: Any, rollout_buffer: Any, n_rollout_steps: int) -> bool:
        """The parent's collection, recording the policy's logits; then the update awaiting its
        judgement is judged on this rollout and, if the judge says so, undone and the rollout
        collected again."""
        collected = self._collect(env, callback, rollout_buffer, n_rollout_steps)
        judgement = self.rollout_judgement
        if not collected or judgement is None:
            return collected
        verdict = judgement.judge_rollout(self._collected_rollout())
        if verdict is not None:
            self._undo(*verdict)
            collected = self._collect(env, callback, rollout_buffer, n_rollout_steps)
            judgement.judge_rollout(self._collected_rollout() if collected else None)
        return collected

    def _collect(self, env: Any, callback: Any, rollout_buffer: Any, n_rollout_steps: int) -> bool:
        """The collection, with parameters found non-finite restored to the last verified state:
        before it, and, when they break during it (a callback, user code), once more before the
        rollout is collected again. Without a verified state, or when they break again, a
        RuntimeError names them (and the last verified state, if any, is put back first)."""
        for attempt, where in enumerate(("before collecting a rollout", "while collecting a rollout")):
            self._repair_non_finite(where)
            try:
                return self._collect_recording(env, callback, rollout_buffer, n_rollout_steps)
            except (ValueError, RuntimeError) as error:
                bad = self._count_non_finite_parameters()
                if not bad:
                    raise
                if attempt == 0 and self._last_verified is not None:
                    continue  # restored at the start of the next attempt
                names = ", ".join(non_finite_parameter_names(self.policy))
                if self._last_verified is not None:
                    self._last_verified.restore(self)
                raise RuntimeError(
                    f"finite_parameters: {bad} policy parameters ({names}) became non-finite while collecting a "
                    f"rollout{' again after the last verified state was restored' if attempt else ''}, at timestep "
                    f"{self.num_timesteps}: the rollout cannot be used"
                ) from error
        raise AssertionError("unreachable")

    def _collect_recording(self, env: Any, callback: Any, rollout_buffer: Any, n_rollout_steps: int) -> bool:
        recorder = LogitsRecorder(self.policy, rollout_buffer.n_envs, rollout_buffer.buffer_size)
        try:
            with recorder:
                return super().collect_rollouts(env, callback, rollout_buffer, n_rollout_steps)
        finally:
            self._rollout_logits = recorder.logits

    def _collected_rollout(self) -> CollectedRollout | None:
        if self._rollout_logits is None:
            return None
        return CollectedRollout(self._rollout_logits, self.rollout_buffer.observations)

    def _undo(self, pending: PendingJudgement, verdict: str) -> None:
        """Restore the state before the judged update, lower the learning-rate scale, report it."""
        pending.before.restore(self)
        self._last_verified = self._capture(f"after undoing update {pending.update}")
        self.lr_scale = self._undo_settings().shrunk(self.lr_scale)
        reason = (
            f"undone on the next rollout: {verdict}; rollout collected again, learning-rate scale {self.lr_scale:g}"
        )
        judgement = self.rollout_judgement
        self.verification_report.mark_undone(
            pending.update, reason, {f"{judgement.judge.name}_after": judgement.measured[0]}
        )
        self.logger.record("verl/undone", 1.0)
        self.logger.record("verl/n_undone", self.verification_report.n_undone)
        self.logger.record("verl/lr_scale", self.lr_scale)
        if self.verbose >= 1:
            print(f"verl: update {pending.update}: {reason}")

    def _undo_settings(self) -> UndoSettings:
        return UndoSettings(self.lr_shrink, self.lr_recovery, self.min_lr_scale)

    def _learning_rate(self) -> float:
        """SB3's schedule, times ``lr_scale``."""
        return super()._learning_rate() * self.lr_scale
