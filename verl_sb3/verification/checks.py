"""What is checked after a PPO update: small pure functions over the update's tensors.

Each check takes an :class:`~verl_sb3.verification.context.UpdateContext` (the old and new policy
on the states of the rollout just trained on) and returns a
:class:`~verl_sb3.verification.context.CheckResult`. Which checks run, with which thresholds, is
:mod:`verl_sb3.verification.verifier`'s; what happens to an update that fails them is
:mod:`verl_sb3.verified`'s.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch as th
from stable_baselines3.common.distributions import CategoricalDistribution

from textenv_gym.sb3_vec_env import environment_config
from verl_sb3.categorical import non_finite_probabilities, probability_mass
from verl_sb3.tokens import last_tokens, sequence_lengths
from verl_sb3.verification.context import CheckResult, UpdateContext, distribution_entropy


def _finite(value: float) -> bool:
    return math.isfinite(value)


def kl_check(ctx: UpdateContext, kl_threshold: float) -> CheckResult:
    """Exact mean KL(old || new) over the full action distribution is at most ``kl_threshold``."""
    # float64 mean: float32's can round above the largest value (6 equal KLs of 9.54e-7 give mean > max)
    mean_kl = ctx.kl.double().mean().item()
    max_kl = ctx.kl.max().item() if ctx.kl.numel() else 0.0
    passed = _finite(mean_kl) and mean_kl <= kl_threshold
    return CheckResult(
        passed, mean_kl, kl_threshold, f"mean KL {mean_kl:.4g} (max over states {max_kl:.4g})", {"max": max_kl}
    )


def advantage_finite_check(ctx: UpdateContext) -> CheckResult:
    """Advantages, returns and values are all finite."""
    bad = sum(int((~th.isfinite(t)).sum()) for t in (ctx.advantages, ctx.returns, ctx.values))
    return CheckResult(bad == 0, float(bad), 0.0, f"{bad} non-finite advantages, returns or values")


def return_bound_check(ctx: UpdateContext, max_abs_return: float) -> CheckResult:
    """Every return is finite and at most ``max_abs_return`` in absolute value.

    The other checks cannot see the scale of the rewards: PPO normalises the advantages, so a
    reward spike (say 1e6 at one step) passes them all while the value loss, and the critic's
    Adam moments, take its full size. An absolute bound is used because a relative one would be
    judged on the batch's own (possibly corrupt) statistics.
    """
    bad = int((~th.isfinite(ctx.returns)).sum())
    largest = ctx.returns.abs().max().item() if ctx.returns.numel() else 0.0
    passed = bad == 0 and largest <= max_abs_return
    return CheckResult(passed, largest, max_abs_return, f"max |return| {largest:.4g}; {bad} non-finite returns")


def returns_match_check(ctx: UpdateContext, tolerance: float) -> CheckResult:
    """Returns equal advantages plus values (GAE's definition), to ``tolerance`` relative to their scale."""
    scale = 1.0 + ctx.returns.abs().max().item() if ctx.returns.numel() else 1.0
    error = (ctx.returns - (ctx.advantages + ctx.values)).abs().max().item() / scale if ctx.returns.numel() else 0.0
    passed = _finite(error) and error <= tolerance
    return CheckResult(passed, error, tolerance, f"max |returns - (advantages + values)| / scale = {error:.3g}")


def advantage_normalization_check(ctx: UpdateContext, tolerance: float) -> CheckResult:
    """Normalised advantages have mean within ``tolerance`` of 0 and standard deviation within it of 1."""
    normalized = ctx.normalized_advantages
    mean, std = normalized.mean().item(), normalized.std().item()
    error = max(abs(mean), abs(std - 1.0))
    passed = _finite(error) and error <= tolerance
    return CheckResult(passed, error, tolerance, f"normalised advantages: mean {mean:.3g}, std {std:.3g}")


def group_advantage_check(ctx: UpdateContext, tolerance: float) -> CheckResult:
    """A critic-free estimator's advantages, over the samples in the loss: finite; for GRPO, Dr. GRPO
    and RLOO the same at every step of an episode and centred within each group (the largest
    episode spread or group mean, relative to ``1 + max |A|``, at most ``tolerance``); for
    REINFORCE++ whitened (mean within ``tolerance`` of 0, standard deviation of 1). Groups whose
    advantages are all 0 (equal outcomes: nothing to learn) are counted in the details."""
    advantages = ctx.advantages.double()
    if ctx.estimator == "reinforce_plus_plus":
        values = advantages[ctx.sample_weights > 0]
        bad = int((~th.isfinite(values)).sum())
        if values.numel() < 2:
            return CheckResult(bad == 0, 0.0, tolerance, f"{values.numel()} samples in the loss")
        mean, std = values.mean().item(), values.std().item()
        error = max(abs(mean), abs(std - 1.0))
        passed = bad == 0 and _finite(error) and error <= tolerance
        message = f"whitened advantages: mean {mean:.3g}, std {std:.3g}; {bad} non-finite"
        return CheckResult(passed, error, tolerance, message)
    included = ctx.sample_groups >= 0
    values, groups = advantages[included], ctx.sample_groups[included]
    bad = int((~th.isfinite(values)).sum())
    if values.numel() == 0:
        return CheckResult(True, 0.0, tolerance, "no group in the loss", {"groups": 0.0, "zero_variance_groups": 0.0})
    episodes, inverse = th.unique(ctx.sample_episodes[included], return_inverse=True)
    episode_mean = th.zeros(len(episodes), dtype=values.dtype).index_add_(0, inverse, values)
    episode_mean /= th.bincount(inverse, minlength=len(episodes))
    spread = (values - episode_mean[inverse]).abs().max().item()
    episode_group = th.zeros(len(episodes), dtype=groups.dtype).scatter_(0, inverse, groups)
    group_ids, group_of = th.unique(episode_group, return_inverse=True)
    size = th.bincount(group_of, minlength=len(group_ids))
    group_mean = th.zeros(len(group_ids), dtype=values.dtype).index_add_(0, group_of, episode_mean) / size
    moving = th.zeros(len(group_ids), dtype=values.dtype).index_add_(0, group_of, (episode_mean != 0).double())
    zero_variance = int((moving == 0).sum())
    error = max(group_mean.abs().max().item(), spread) / (1.0 + values.abs().max().item())
    passed = bad == 0 and _finite(error) and error <= tolerance
    message = (
        f"{len(group_ids)} groups: largest |group mean| or in-episode spread / (1 + max |A|) = {error:.3g}; "
        f"{zero_variance} with all advantages 0; {bad} non-finite"
    )
    details = {"groups": float(len(group_ids)), "zero_variance_groups": float(zero_variance)}
    return CheckResult(passed, error, tolerance, message, details)


def surrogate_check(ctx: UpdateContext, tolerance: float) -> CheckResult:
    """The update did not lower its own surrogate: mean(ratio * A) - mean(A) >= -``tolerance``
    (weighted as the loss weighs the samples, when it does).

    The message also reports the share of samples whose log-probability moved in the direction
    of their advantage.
    """
    advantages = ctx.policy_advantages
    log_ratio = ctx.new_log_prob - ctx.old_log_prob
    if ctx.sample_weights is None:
        gain = (th.exp(log_ratio) * advantages).mean().item() - advantages.mean().item()
    else:  # the loss's own weighing of the samples (loss_agg_mode)
        gain = (ctx.sample_weights * th.expm1(log_ratio) * advantages).sum().item()
    aligned = advantage_alignment(ctx)
    passed = _finite(gain) and gain >= -tolerance
    return CheckResult(
        passed,
        gain,
        -tolerance,
        f"surrogate gain {gain:.4g}; {aligned:.1%} of samples moved with their advantage",
        {"advantage_alignment": aligned},
    )


def advantage_alignment(ctx: UpdateContext) -> float:
    """Share of samples whose log-probability moved in the direction of their advantage."""
    moved = (ctx.new_log_prob - ctx.old_log_prob) * ctx.policy_advantages
    return (moved[moved != 0] > 0).float().mean().item() if (moved != 0).any() else float("nan")


def count_non_finite(tensors: Sequence[th.Tensor]) -> int:
    """How many values of ``tensors`` are NaN or infinite (0 quickly when all are finite).

    A tensor's sum is non-finite whenever one of its values is, so finite sums settle the
    common case at the cost of one sum per tensor; only otherwise are the values counted.
    """
    if not tensors or bool(th.isfinite(th.stack([t.sum() for t in tensors])).all()):
        return 0
    return int(sum((~th.isfinite(t)).sum() for t in tensors))


def non_finite_parameter_names(module: th.nn.Module) -> list[str]:
    """The names of ``module``'s parameters that hold a NaN or an infinity."""
    return [name for name, p in module.named_parameters() if not bool(th.isfinite(p).all())]


def finite_parameters_check(ctx: UpdateContext) -> CheckResult:
    """Every policy parameter and every new action log-probability is finite."""
    bad = count_non_finite(ctx.parameters)
    if isinstance(ctx.new_distribution, CategoricalDistribution):  # counted in chunks of states
        bad_probs = non_finite_probabilities(ctx.real(ctx.new_distribution.distribution.logits))
    else:  # a sum is non-finite whenever one of its terms is: one pass settles the common case
        values = ctx.new_log_prob
        bad_probs = 0 if bool(th.isfinite(values.sum())) else int((~th.isfinite(values)).sum())
    total = bad + bad_probs
    return CheckResult(
        total == 0, float(total), 0.0, f"{bad} non-finite parameters, {bad_probs} non-finite probabilities"
    )


def entropy_check(ctx: UpdateContext, min_entropy: float) -> CheckResult:
    """Mean entropy of the new policy is at least ``min_entropy`` (nats), or did not fall.

    As for the forbidden mass, an update that does not lower the entropy always passes: a policy
    that something pushed below the floor (scaled parameters, a bad checkpoint) can still be
    trained back, where a floor alone would reject every update from then on.
    """
    entropy = ctx.entropy.mean().item()
    old = distribution_entropy(ctx.old_distribution)
    before = ctx.real(old).mean().item() if old is not None else math.nan
    passed = _finite(entropy) and (entropy >= min_entropy or entropy >= before)
    message = f"mean policy entropy {before:.4g} -> {entropy:.4g} nats"
    return CheckResult(passed, entropy, min_entropy, message, {"before": before})


def environment_forbidden_tokens(env: Any) -> tuple[int, ...]:
    """The tokens an environment declares forbidden (TextGen-v0's ``config.forbidden_tokens``), else none."""
    return tuple(getattr(environment_config(env), "forbidden_tokens", ()))


def forbidden_mass_check(ctx: UpdateContext, max_forbidden_prob: float) -> CheckResult:
    """Mean probability of the forbidden tokens stays at most ``max_forbidden_prob``, or did not rise.

    An update that lowers the mass always passes, so a policy that starts above the bound can
    still be improved.
    """
    distributions = (ctx.new_distribution, ctx.old_distribution)
    if not all(isinstance(d, CategoricalDistribution) for d in distributions):
        raise ValueError("forbidden_tokens: the forbidden-mass check needs a Discrete action space")
    tokens = list(ctx.forbidden_tokens)  # summed in chunks of states: no (states, actions) probabilities kept
    new_mass, old_mass = (
        probability_mass(ctx.real(d.distribution.logits), tokens).mean().item() for d in distributions
    )
    passed = _finite(new_mass) and (new_mass <= max_forbidden_prob or new_mass <= old_mass)
    return CheckResult(passed, new_mass, max_forbidden_prob, f"forbidden mass {old_mass:.4g} -> {new_mass:.4g}")


def repeat_mass_check(ctx: UpdateContext, max_repeat_prob: float) -> CheckResult:
    """Mean probability of repeating the state's previous token stays at most ``max_repeat_prob``, or did not rise.

    Taken over the states that have a previous token. Degenerate repetition is a language
    model's typical failure (TextGen-v0 penalises three identical tokens in a row); a uniform
    policy over ``V`` tokens has ``1 / V``. As for the forbidden mass, an update that lowers the
    mass always passes.
    """
    distributions = (ctx.new_distribution, ctx.old_distribution)
    if not all(isinstance(d, CategoricalDistribution) for d in distributions):
        raise ValueError("max_repeat_prob: the repeat-mass check needs a Discrete action space")
    previous = ctx.previous_tokens if ctx.previous_tokens is not None else _previous_tokens(ctx)
    has_previous = previous >= 0
    if not bool(has_previous.any()):
        return CheckResult(True, 0.0, max_repeat_prob, "no state has a previous token")
    index = previous.clamp(min=0)[:, None]
    # from the log-probabilities: one value per state, not a (states, vocabulary) probability tensor
    new_mass, old_mass = (
        ctx.real(d.distribution.logits).gather(1, index).squeeze(1)[has_previous].exp().mean().item()
        for d in distributions
    )
    passed = _finite(new_mass) and (new_mass <= max_repeat_prob or new_mass <= old_mass)
    return CheckResult(
        passed,
        new_mass,
        max_repeat_prob,
        f"probability of repeating the previous token {old_mass:.4g} -> {new_mass:.4g}",
    )


def _previous_tokens(ctx: UpdateContext) -> th.Tensor:
    """Each real sample's last token (-1 for an empty sequence), from token-sequence observations
    padded with the number of actions."""
    if not isinstance(ctx.observations, th.Tensor):
        raise ValueError(
            "max_repeat_prob: the repeat-mass check needs the states' previous tokens (token-sequence observations)"
        )
    tokens = ctx.observations.long()
    return last_tokens(tokens, sequence_lengths(tokens, ctx.new_distribution.action_dim), empty=-1)
