"""RLlib's PPO Learner with every update verified: exact KL to the behaviour policy and finite
parameters, checked on the whole train batch after the update; a failing update is undone,
module and optimizer state restored exactly."""

from __future__ import annotations

import copy
from typing import Any

import torch as th
from ray.rllib.algorithms.ppo.torch.ppo_torch_learner import PPOTorchLearner
from ray.rllib.core.columns import Columns

from verl_sb3.categorical import categorical_kl
from verl_sb3.verification.checks import non_finite_parameter_names

#: ``learner_config_dict`` keys: the largest accepted mean KL(old || new) over the train batch.
KL_THRESHOLD_KEY = "verl_kl_threshold"


class VerifiedPPOTorchLearner(PPOTorchLearner):
    """PPO's torch Learner; after each ``update`` the exact KL between the behaviour policy (the
    batch's ``action_dist_inputs``) and the updated module on every state of the batch, and the
    parameters' finiteness. Above ``learner_config_dict["verl_kl_threshold"]`` (or not finite) the
    update is undone. Figures go to the results under ``verl/``."""

    def _update(self, batch: dict[str, Any]) -> Any:
        self._verl_minibatches.append({mid: {k: b[k] for k in (Columns.OBS, Columns.ACTION_DIST_INPUTS)}
                                       for mid, b in batch.items()})  # fmt: skip
        return super()._update(batch)

    def update(self, *args: Any, **kwargs: Any) -> Any:
        self._verl_minibatches: list[dict[str, Any]] = []
        before = self._capture()
        kwargs["_no_metrics_reduce"] = True
        super().update(*args, **kwargs)
        kl, bad = self._verified_kl()
        threshold = float(self.config.learner_config_dict.get(KL_THRESHOLD_KEY, 0.25))
        rolled_back = bool(bad) or not (kl <= threshold)
        if rolled_back:
            self._restore(before)
        self.metrics.log_value("verl/kl", kl, window=1)
        self.metrics.log_value("verl/rolled_back", float(rolled_back), window=1)
        self.metrics.log_value("verl/non_finite_parameters", float(len(bad)), window=1)
        return self.metrics.reduce()

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

    def _verified_kl(self) -> tuple[float, list[str]]:
        """Mean exact KL(behaviour || updated) over the states of the update's first epoch, and the
        names of non-finite parameters."""
        bad = [name for module in self.module.values() for name in non_finite_parameter_names(module)]
        total, count = 0.0, 0
        seen = set()
        with th.no_grad():
            for minibatch in self._verl_minibatches:
                for mid, columns in minibatch.items():
                    key = (mid, columns[Columns.OBS].data_ptr())
                    if key in seen:
                        continue
                    seen.add(key)
                    old = columns[Columns.ACTION_DIST_INPUTS].log_softmax(-1)
                    new = self.module[mid].forward_train({Columns.OBS: columns[Columns.OBS]})
                    kl = categorical_kl(old, new[Columns.ACTION_DIST_INPUTS].log_softmax(-1))
                    total, count = total + float(kl.sum()), count + kl.numel()
        return (total / count if count else float("nan")), bad
