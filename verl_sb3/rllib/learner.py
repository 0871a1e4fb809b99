"""RLlib's PPO Learner with every update verified by the project's checks, undone when one fails.

After RLlib's update (``PPOTorchLearner.update``), on every state of the train batch's first epoch,
the update is checked as :class:`verl_sb3.VerifiedPPO` checks its own
(:mod:`verl_sb3.verification.checks`): the exact KL between the behaviour policy (the batch's
``action_dist_inputs``, from the env runners) and the updated module, the entropy, finite
parameters and probabilities, finite advantages and value targets, and the user's ``checks``
(functions of an :class:`~verl_sb3.verification.context.UpdateContext`). If one fails, every
module's and optimizer's torch state is restored exactly. Each check's value goes to the results as
``verl/<check>``, with ``verl/rolled_back``.
"""

from __future__ import annotations

import copy
from typing import Any

import torch as th
from ray.rllib.algorithms.ppo.torch.ppo_torch_learner import PPOTorchLearner
from ray.rllib.core.columns import Columns
from ray.rllib.evaluation.postprocessing import Postprocessing
from stable_baselines3.common.distributions import CategoricalDistribution

from verl_sb3.rollout import distribution_validation
from verl_sb3.verification import checks as C
from verl_sb3.verification.context import CheckResult, UpdateContext

#: ``learner_config_dict`` keys: the largest mean KL(old || new), the entropy floor, the user's checks.
KL_THRESHOLD_KEY, MIN_ENTROPY_KEY, CHECKS_KEY = "verl_kl_threshold", "verl_min_entropy", "verl_checks"
#: The batch columns the checks read.
COLUMNS = (
    Columns.OBS,
    Columns.ACTION_DIST_INPUTS,
    Columns.ACTIONS,
    Columns.ACTION_LOGP,
    Postprocessing.ADVANTAGES,
    Postprocessing.VALUE_TARGETS,
)


class VerifiedPPOTorchLearner(PPOTorchLearner):
    """PPO's torch Learner whose every ``update`` is verified (see the module's docstring)."""

    def _update(self, batch: dict[str, Any]) -> Any:
        self._verl_minibatches.append({mid: {k: b[k] for k in COLUMNS} for mid, b in batch.items()})
        return super()._update(batch)

    def update(self, *args: Any, **kwargs: Any) -> Any:
        self._verl_minibatches: list[dict[str, Any]] = []
        before = self._capture()
        kwargs["_no_metrics_reduce"] = True
        super().update(*args, **kwargs)
        epochs = max(1, int(kwargs.get("num_epochs", 1)))
        first_epoch = self._verl_minibatches[: max(1, len(self._verl_minibatches) // epochs)]
        results = {
            name: result for mid, _ in self.module.items() for name, result in self._verify(mid, first_epoch).items()
        }
        rolled_back = not all(result.passed for result in results.values())
        if rolled_back:
            self._restore(before)
        for name, result in results.items():
            self.metrics.log_value(f"verl/{name}", float(result.value), window=1)
        self.metrics.log_value("verl/rolled_back", float(rolled_back), window=1)
        return self.metrics.reduce()

    def _verify(self, mid: str, minibatches: list[dict[str, Any]]) -> dict[str, CheckResult]:
        """The checks of module ``mid`` on the states of ``minibatches``."""
        columns = {k: th.cat([m[mid][k] for m in minibatches if mid in m]) for k in COLUMNS}
        settings = self.config.learner_config_dict
        module = self.module[mid]
        with th.no_grad(), distribution_validation(False):
            ctx = _context(module, columns)
        results = {
            "kl": C.kl_check(ctx, float(settings.get(KL_THRESHOLD_KEY, 0.25))),
            "entropy": C.entropy_check(ctx, float(settings.get(MIN_ENTROPY_KEY, 0.01))),
            "finite_parameters": C.finite_parameters_check(ctx),
            "advantage_finite": C.advantage_finite_check(ctx),
        }
        for check in settings.get(CHECKS_KEY, ()):
            results[getattr(check, "__name__", type(check).__name__)] = check(ctx)
        return results

    def _capture(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """Copies of every module's and optimizer's torch state (what an undone update returns to)."""
        modules = {mid: copy.deepcopy(module.state_dict()) for mid, module in self.module.items()}
        optimizers = {name: copy.deepcopy(opt.state_dict()) for name, opt in self._named_optimizers.items()}
        return modules, optimizers

    def _restore(self, state: tuple[dict[str, Any], dict[str, Any]]) -> None:
        modules, optimizers = state
        for mid, module in self.module.items():
            module.load_state_dict(modules[mid])
        for name, optimizer in self._named_optimizers.items():
            optimizer.load_state_dict(optimizers[name])


def _context(module: Any, columns: dict[str, th.Tensor]) -> UpdateContext:
    """The update as the project's checks see it: behaviour and updated distributions on the states."""
    logits = columns[Columns.ACTION_DIST_INPUTS]
    old = CategoricalDistribution(logits.shape[-1]).proba_distribution(action_logits=logits)
    new_logits = module.forward_train({Columns.OBS: columns[Columns.OBS]})[Columns.ACTION_DIST_INPUTS]
    new = CategoricalDistribution(logits.shape[-1]).proba_distribution(action_logits=new_logits)
    actions = columns[Columns.ACTIONS].long().flatten()
    advantages, targets = columns[Postprocessing.ADVANTAGES], columns[Postprocessing.VALUE_TARGETS]
    return UpdateContext(
        old_distribution=old,
        new_distribution=new,
        mask=th.ones(len(actions), dtype=th.bool, device=actions.device),
        actions=actions,
        advantages=advantages,
        returns=targets,
        values=targets - advantages,
        old_log_prob=columns[Columns.ACTION_LOGP],
        new_log_prob=new.log_prob(actions),
        normalize_advantage=False,
        parameters=[p.detach() for p in module.parameters()],
    )
