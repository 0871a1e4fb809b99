"""The Bradley-Terry preference model: P(a preferred over b) = sigmoid(r(a) - r(b)).

As in InstructGPT's reward-model loss (and TRL's ``RewardTrainer``), the loss of a pair is
``-log sigmoid(r_chosen - r_rejected)``; a tie has target 0.5, so its loss is the mean of both
orders' losses, which is lowest when the two rewards are equal.
"""

from __future__ import annotations

import torch as th
import torch.nn.functional as F


def bradley_terry_loss(reward_a: th.Tensor, reward_b: th.Tensor, target: th.Tensor) -> th.Tensor:
    """The mean Bradley-Terry loss of pairs with rewards ``reward_a``, ``reward_b`` and ``target`` the
    probability that ``a`` is preferred (1, 0, or 0.5 for a tie): binary cross-entropy on
    ``reward_a - reward_b`` as the logit."""
    return F.binary_cross_entropy_with_logits(reward_a - reward_b, target.to(reward_a.dtype))


def preference_accuracy(reward_a: th.Tensor, reward_b: th.Tensor, target: th.Tensor) -> float:
    """The share of pairs with a preference (ties left out) whose preferred completion has the higher
    reward; equal rewards count half. NaN when every pair is a tie."""
    decided = target != 0.5
    if not bool(decided.any()):
        return float("nan")
    margin = (reward_a - reward_b)[decided] * th.where(target[decided] > 0.5, 1.0, -1.0)
    return float(((margin > 0).double() + 0.5 * (margin == 0).double()).mean())
