"""Critic warm-up: the first updates train only the value function (veRL's ``trainer.critic_warmup``)."""

from __future__ import annotations

from stable_baselines3.common.callbacks import BaseCallback
from torch import nn

from verl_sb3._validation import require_int

#: Policy attributes that hold only critic parameters (SB3, sb3-contrib and the SLM policies).
CRITIC_MODULES = ("value_net", "mlp_extractor.value_net", "critic", "lstm_critic", "critic_embedding")


def critic_parameters(policy: nn.Module) -> list[nn.Parameter]:
    """The parameters that only the value estimate uses; everything else shapes the action distribution.

    A features extractor shared by the actor and the critic (SB3's ``share_features_extractor=True``)
    counts as the actor's.
    """
    names = list(CRITIC_MODULES)
    if not getattr(policy, "share_features_extractor", True):
        names.append("vf_features_extractor")
    found: dict[int, nn.Parameter] = {}
    for name in names:
        module = policy
        for part in name.split("."):
            module = getattr(module, part, None)
        if isinstance(module, nn.Module):
            found.update((id(p), p) for p in module.parameters())
    return list(found.values())


class CriticWarmupCallback(BaseCallback):
    """Freeze the policy's actor for the first ``updates`` updates of an on-policy algorithm.

    An untrained critic turns advantages into noise: the first policy updates then move the
    policy at random (on TextGen-v0, towards repeating tokens) before it learns anything. Warming
    the critic up first, as veRL does, gives the first actor update meaningful advantages.

    The updates are counted in rollouts (``n_steps * n_envs`` environment steps each) from
    ``model.num_timesteps``, so a resumed run does not warm up again. During the warm-up the actor's
    parameters have ``requires_grad=False``: PPO's loss still trains the value function, the policy
    and its optimizer state stay unchanged (a verified update then has KL 0). Works with
    ``PPO``, ``RecurrentPPO`` and their verified subclasses.

    :param updates: number of critic-only updates (0: none).
    """

    def __init__(self, updates: int, verbose: int = 0) -> None:
        super().__init__(verbose)
        self.updates = require_int("updates", updates, 0)

    @property
    def warmup_timesteps(self) -> int:
        return self.updates * self.model.n_steps * self.model.n_envs

    def _set_actor_trainable(self, trainable: bool) -> None:
        critic = {id(p) for p in critic_parameters(self.model.policy)}
        for parameter in self.model.policy.parameters():
            if id(parameter) not in critic:
                parameter.requires_grad_(trainable)

    def _on_rollout_end(self) -> None:
        # num_timesteps already counts the rollout that the coming train() call uses
        warming_up = self.model.num_timesteps <= self.warmup_timesteps
        self._set_actor_trainable(not warming_up)
        self.logger.record("train/critic_warmup", int(warming_up))

    def _on_training_end(self) -> None:
        self._set_actor_trainable(True)

    def _on_step(self) -> bool:
        return True
