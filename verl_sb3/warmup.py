"""Critic warm-up: the first updates train only the value function (veRL's ``trainer.critic_warmup``)."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

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


def actor_parameters(policy: nn.Module) -> list[nn.Parameter]:
    """Every parameter that shapes the action distribution (all but :func:`critic_parameters`)."""
    critic = {id(p) for p in critic_parameters(policy)}
    return [p for p in policy.parameters() if id(p) not in critic]


@contextlib.contextmanager
def frozen(parameters: list[nn.Parameter]) -> Iterator[None]:
    """``requires_grad=False`` for the block, then each parameter's own flag back, whatever happens."""
    flags = [p.requires_grad for p in parameters]
    try:
        for p in parameters:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in zip(parameters, flags):
            p.requires_grad_(flag)


class CriticWarmupCallback(BaseCallback):
    """Freeze the policy's actor for the first ``updates`` updates of an on-policy algorithm.

    An untrained critic turns advantages into noise: the first policy updates then move the
    policy at random (on TextGen-v0, towards repeating tokens) before it learns anything. Warming
    the critic up first, as veRL does, gives the first actor update meaningful advantages.

    The updates are counted in rollouts (``n_steps * n_envs`` environment steps each) from
    ``model.num_timesteps``, so a resumed run does not warm up again. During the warm-up PPO's
    loss trains the value function only; the actor and its optimizer state stay unchanged (a
    verified update then has KL 0). With verl_sb3's update (``PPOUpdateMixin``: the verified
    classes) the actor is frozen only while each update runs (``critic_only``), so an error or an
    interruption cannot leave it frozen; with SB3's own algorithms its parameters keep
    ``requires_grad=False`` from the end of a warm-up rollout until the next one starts or
    training ends. A run that ends inside the warm-up (no actor update at all) warns.

    :param updates: number of critic-only updates (0: none).
    """

    def __init__(self, updates: int, verbose: int = 0) -> None:
        super().__init__(verbose)
        self.updates = require_int("updates", updates, 0)

    @property
    def warmup_timesteps(self) -> int:
        return self.updates * self.model.n_steps * self.model.n_envs

    def _on_training_start(self) -> None:
        estimator = getattr(self.model, "advantage_estimator", "gae")
        if self.updates and estimator != "gae":
            raise ValueError(
                f"CriticWarmupCallback: advantage_estimator {estimator!r} trains no critic, so there is nothing to "
                "warm up; use CriticWarmupCallback(0) or leave it out"
            )

    def _set_actor_trainable(self, trainable: bool) -> None:
        for parameter in actor_parameters(self.model.policy):
            parameter.requires_grad_(trainable)

    def _on_rollout_end(self) -> None:
        # num_timesteps already counts the rollout that the coming train() call uses
        warming_up = self.model.num_timesteps <= self.warmup_timesteps
        if hasattr(self.model, "critic_only"):
            self.model.critic_only = warming_up
        else:
            self._set_actor_trainable(not warming_up)
        self.logger.record("train/critic_warmup", int(warming_up))

    def _on_rollout_start(self) -> None:
        if not hasattr(self.model, "critic_only"):
            self._set_actor_trainable(True)

    def _on_training_end(self) -> None:
        if hasattr(self.model, "critic_only"):
            self.model.critic_only = False
        else:
            self._set_actor_trainable(True)
        if self.updates and self.model.num_timesteps <= self.warmup_timesteps:
            warnings.warn(
                f"CriticWarmupCallback: training ended within the critic warm-up ({self.model.num_timesteps:,} of its "
                f"{self.warmup_timesteps:,} steps): only the value function was trained, the policy not at all; "
                f"train for more than {self.warmup_timesteps:,} steps or warm up for fewer updates",
                UserWarning,
                stacklevel=2,
            )

    def _on_step(self) -> bool:
        return True
