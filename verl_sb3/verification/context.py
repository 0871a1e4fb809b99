"""What a check sees (:class:`UpdateContext`) and what it says (:class:`CheckResult`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import cached_property
from typing import Any

import torch as th
from stable_baselines3.common.distributions import CategoricalDistribution, Distribution, kl_divergence

from verl_sb3.categorical import categorical_entropy, categorical_kl
from verl_sb3.rollout import distribution_validation


@dataclass(frozen=True)
class CheckResult:
    """The verdict of one check: ``passed``, the measured ``value``, its ``threshold``, a message,
    and ``details``: other figures the check measured (such as the KL's maximum over states)."""

    passed: bool
    value: float
    threshold: float | None = None
    message: str = ""
    details: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class UpdateContext:
    """The update under verification, on the rollout's states (padding excluded).

    ``advantages``, ``returns``, ``values``, ``actions`` and the log-probabilities are flat tensors
    over the real samples; the distributions cover the whole (possibly padded) batch, ``mask``
    selects its real samples. ``kl`` and ``entropy`` are per real sample. ``observations`` are the
    real samples' observations when the verifier has them. Checks read these tensors and must not
    modify them in place (they may share memory with the rollout and the distributions).
    """

    old_distribution: Distribution
    new_distribution: Distribution
    mask: th.Tensor
    actions: th.Tensor
    advantages: th.Tensor
    returns: th.Tensor
    values: th.Tensor
    old_log_prob: th.Tensor
    new_log_prob: th.Tensor
    normalize_advantage: bool
    parameters: Sequence[th.Tensor]
    forbidden_tokens: Sequence[int] = ()
    #: per real sample, the last token of its state's sequence (-1 when it has none); when None,
    #: the repeat-mass check reads it from ``observations`` (token sequences)
    previous_tokens: th.Tensor | None = None
    observations: Any = None
    #: the advantage estimator (``"gae"`` or a critic-free one of :mod:`verl_sb3.advantages`);
    #: per real sample, its weight in the loss (None: the mean), and for a critic-free estimator
    #: its episode and the group it was compared in (-1: left out of the loss)
    estimator: str = "gae"
    sample_weights: th.Tensor | None = None
    sample_episodes: th.Tensor | None = None
    sample_groups: th.Tensor | None = None

    def __post_init__(self) -> None:
        self._all_real = bool(self.mask.all())
        # KL >= 0; float32 rounding can give -5e-7 for one distribution written with shifted logits.
        # clamp_min keeps NaN, which the checks must see.
        self.kl = self.real(_kl(self.old_distribution, self.new_distribution)).clamp_min(0.0)
        self.entropy = distribution_entropy(self.new_distribution)
        self.entropy = self.real(self.entropy) if self.entropy is not None else -self.new_log_prob

    def real(self, values: th.Tensor) -> th.Tensor:
        """The rows of a whole-batch tensor that belong to real samples (itself when nothing is padding)."""
        return values if self._all_real else values[self.mask]

    @cached_property
    def normalized_advantages(self) -> th.Tensor:
        """Advantages scaled as PPO's loss sees them over the whole batch."""
        return (self.advantages - self.advantages.mean()) / (self.advantages.std() + 1e-8)

    @property
    def policy_advantages(self) -> th.Tensor:
        """The advantages the policy loss used: normalised when ``normalize_advantage`` is on."""
        return self.normalized_advantages if self.normalize_advantage else self.advantages

    def probabilities(self, which: str = "new") -> th.Tensor | None:
        """Action probabilities of the real samples (Discrete actions only, else None); read-only:
        without padding this is the distribution's own cached tensor."""
        distribution = self.new_distribution if which == "new" else self.old_distribution
        if not isinstance(distribution, CategoricalDistribution):
            return None
        return self.real(distribution.distribution.probs)


Check = Callable[[UpdateContext], CheckResult]


def rollout_context(
    kind: Any,
    batch: Any,
    old: Distribution,
    policy: Any,
    normalize_advantage: bool,
    forbidden_tokens: Sequence[int] = (),
) -> UpdateContext:
    """The context of an update on a whole rollout (a :class:`verl_sb3.rollout.RolloutBatch`, no padding).

    :param kind: how the policy reads the rollout (:func:`verl_sb3.rollout.policy_kind`).
    :param old: the policy's distribution on the rollout before the update.
    :param policy: the updated policy, or None to let the old policy stand for it (an update that
        cannot be evaluated: non-finite parameters).
    """
    actions = batch.token_actions if isinstance(old, CategoricalDistribution) else batch.actions
    new, new_log_prob, parameters = old, batch.old_log_prob, []
    if policy is not None:
        with th.no_grad(), distribution_validation(False):
            new = kind.distribution(policy, batch)[0]
            new_log_prob = new.log_prob(actions)
        parameters = [p.detach() for p in policy.parameters()]
    return UpdateContext(
        old_distribution=old,
        new_distribution=new,
        mask=th.ones(len(batch.advantages), dtype=th.bool, device=batch.advantages.device),
        actions=actions,
        advantages=batch.advantages,
        returns=batch.returns,
        values=batch.old_values,
        old_log_prob=batch.old_log_prob,  # as PPO's ratio uses it
        new_log_prob=new_log_prob,
        normalize_advantage=normalize_advantage,
        parameters=parameters,
        forbidden_tokens=forbidden_tokens,
        observations=batch.observations,
        estimator=batch.estimator,
        sample_weights=batch.sample_weights,
        sample_episodes=batch.sample_episodes,
        sample_groups=batch.sample_groups,
    )


def distribution_entropy(distribution: Distribution) -> th.Tensor | None:
    """Per-state entropy; for Categorical, summed in chunks of states (no full-size temporaries)."""
    if isinstance(distribution, CategoricalDistribution):
        return categorical_entropy(distribution.distribution.logits)
    return distribution.entropy()


def _kl(old: Distribution, new: Distribution) -> th.Tensor:
    """Exact KL(old || new) per state: over all logits for Categorical, else SB3's ``kl_divergence``."""
    if isinstance(old, CategoricalDistribution) and isinstance(new, CategoricalDistribution):
        # torch's Categorical holds normalised log-probabilities as its logits (not its cached
        # ``probs``: at large vocabularies a (states, vocabulary) tensor kept for the whole
        # verification raises the peak memory)
        return categorical_kl(old.distribution.logits, new.distribution.logits)
    return kl_divergence(old, new)
