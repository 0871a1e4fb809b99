"""Reward-model over-optimisation made visible: proxy reward, gold score and KL to the reference.

A policy trained against a learned reward model (the proxy) can raise the proxy while the quality
it stands for (the gold score: the hidden rule a simulated labeller used, or a person's judgement)
stops rising or falls; Gao et al. (2022, "Scaling laws for reward model over-optimization") plot
both against the square root of the KL to the initial policy. :func:`measure_gold_and_proxy`
samples completions and gives the three figures; :class:`GoldScoreCallback` measures them during
training into SB3's logger (``rlhf/gold``, ``rlhf/proxy``, ``rlhf/kl``) and :attr:`~GoldScoreCallback.history`;
:func:`plot_overoptimisation` draws the history.
"""

from __future__ import annotations

import copy
import dataclasses
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch as th
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.policies import BasePolicy

from textenv_gym.dynamics import TextGenConfig
from textenv_gym.reward_models import TorchRewardModel
from verl_sb3._validation import require_int
from verl_sb3.categorical import categorical_kl
from verl_sb3.generation import (
    PolicyStepper,
    evaluation_mode,
    sample_tokens,
    sampling_generator,
    start_sequences,
    textgen_config,
)
from verl_sb3.rlhf.labelling import model_prompts

GoldFn = Callable[[str, str], float]


def environment_return(config: TextGenConfig, prompt: str, completion: str) -> float:
    """The return the environment ``config`` (its own reward, without user components) gives
    ``completion`` after ``prompt``: the sum of its rewards over the completion's tokens."""
    sequences, _, _ = start_sequences(own_reward(config), 1, prompt or None)
    total = 0.0
    for token in config.tokenizer.encode(completion):
        total += float(sequences.append(np.array([token], dtype=np.int64)).reward[0])
    return total


@th.no_grad()
def measure_gold_and_proxy(
    model: BaseAlgorithm,
    reward_model: TorchRewardModel,
    gold_fn: GoldFn,
    num_sequences: int = 200,
    seed: int = 0,
    reference: BasePolicy | None = None,
    prompts: Sequence[str] | None = None,
) -> dict[str, float]:
    """Sample ``num_sequences`` whole completions from ``model`` (cycling through ``prompts``, default
    :func:`~verl_sb3.rlhf.labelling.model_prompts`) and return their mean ``proxy`` score (the
    reward model's, on the whole sequence), mean ``gold`` score (``gold_fn(prompt, completion)``)
    and mean ``kl`` to ``reference`` (default ``model.ref_policy``): the sum over the sampled steps
    of the exact KL(policy || reference) of the next-token distributions, the sequence's KL."""
    require_int("num_sequences", num_sequences, 1)
    reference = getattr(model, "ref_policy", None) if reference is None else reference
    if not isinstance(reference, BasePolicy):
        raise ValueError("reference: the model has no ref_policy (ref_kl_coef unset); pass the reference policy")
    config = own_reward(textgen_config(model))
    prompts = model_prompts(model) if prompts is None else list(prompts)
    groups = Counter(prompts[index % len(prompts)] for index in range(num_sequences))
    generator = sampling_generator(seed)
    proxy, gold, kl = [], [], []
    with evaluation_mode(model):
        for prompt, count in groups.items():
            tokens, lengths, texts, sequence_kl = _sample(model, reference, config, prompt, count, generator)
            proxy.extend(reward_model.scores(tokens, lengths).tolist())
            gold.extend(float(gold_fn(prompt, text)) for text in texts)
            kl.extend(sequence_kl.tolist())
    return {"proxy": float(np.mean(proxy)), "gold": float(np.mean(gold)), "kl": float(np.mean(kl))}


def own_reward(config: TextGenConfig) -> TextGenConfig:
    """``config`` without user reward components, scores or a prompt source: its own reward only."""
    return dataclasses.replace(config, reward_fns=None, compute_score=None, prompts=None)


def _sample(model, reference, config, prompt, count, generator):
    sequences, prompt_ids, _ = start_sequences(config, count, prompt or None)
    start = len(prompt_ids)
    policy, ref = PolicyStepper(model, count), PolicyStepper(model, count, policy=reference)
    kl = th.zeros(count, dtype=th.float64)
    active = np.ones(count, dtype=bool)
    for _ in range(config.max_length - start):
        logits = policy.logits(sequences.tokens).cpu().double()
        ref_logits = ref.logits(sequences.tokens).cpu().double()
        step_kl = categorical_kl(th.log_softmax(logits, dim=1), th.log_softmax(ref_logits, dim=1))
        kl += th.where(th.as_tensor(active), step_kl, 0.0)
        actions = sample_tokens(logits, 1.0, False, generator).numpy().astype(np.int64)
        rows = np.flatnonzero(active)
        ended = sequences.append(actions[rows], rows).terminated
        active[rows[ended]] = False
        if not active.any():
            break
    tokens, lengths = sequences.tokens.copy(), sequences.lengths.copy()
    texts = [config.tokenizer.decode(row[start:n]) for row, n in zip(tokens, lengths)]
    return tokens, lengths, texts, kl.numpy()


class GoldScoreCallback(BaseCallback):
    """Measures the proxy reward, the gold score and the KL to the reference during training.

    At the start, then between updates once ``eval_freq`` more steps were taken, and at the end,
    :func:`measure_gold_and_proxy` runs (``num_sequences`` samples, a fresh seed each time) and its
    figures go to the logger (``rlhf/proxy``, ``rlhf/gold``, ``rlhf/kl``) and to :attr:`history`
    (with ``timesteps``). Without ``model.ref_policy`` the reference is the policy at the start.

    :param history: earlier measurements to go on from (a resumed run's); none are taken at the start then.
    :param on_measure: called with :attr:`history` after each measurement (to write it out).
    """

    def __init__(
        self,
        reward_model: TorchRewardModel,
        gold_fn: GoldFn,
        eval_freq: int = 10_000,
        num_sequences: int = 200,
        seed: int = 0,
        history: Sequence[dict[str, float]] = (),
        on_measure: Callable[[list[dict[str, float]]], Any] | None = None,
        verbose: int = 0,
    ) -> None:
        super().__init__(verbose)
        if not isinstance(reward_model, TorchRewardModel):
            raise ValueError(f"reward_model: expected a TorchRewardModel (load_reward_model), got {reward_model!r}")
        if not callable(gold_fn):
            raise ValueError(f"gold_fn: expected a callable (prompt, completion) -> float, got {gold_fn!r}")
        self.reward_model, self.gold_fn = reward_model, gold_fn
        self.eval_freq = require_int("eval_freq", eval_freq, 1)
        self.num_sequences = require_int("num_sequences", num_sequences, 1)
        self.seed = require_int("seed", seed, 0)
        self.history: list[dict[str, float]] = [dict(row) for row in history]
        self.on_measure = on_measure
        self._reference: BasePolicy | None = None

    def _on_training_start(self) -> None:
        reference = getattr(self.model, "ref_policy", None)
        self._reference = reference if reference is not None else copy.deepcopy(self.model.policy)
        if not self.history:
            self._measure()

    def _on_rollout_start(self) -> None:
        if self.model.num_timesteps - self.history[-1]["timesteps"] >= self.eval_freq:
            self._measure()

    def _on_training_end(self) -> None:
        if self.model.num_timesteps > self.history[-1]["timesteps"]:
            self._measure()

    def _on_step(self) -> bool:
        return True

    def _measure(self) -> None:
        figures = measure_gold_and_proxy(
            self.model,
            self.reward_model,
            self.gold_fn,
            self.num_sequences,
            self.seed + len(self.history),
            self._reference,
        )
        for name, value in figures.items():
            self.logger.record(f"rlhf/{name}", value)
        self.history.append({"timesteps": int(self.model.num_timesteps), **figures})
        if self.on_measure is not None:
            self.on_measure(self.history)
        if self.verbose:
            print(
                f"rlhf at {self.model.num_timesteps} steps: proxy {figures['proxy']:.3f}, "
                f"gold {figures['gold']:.3f}, KL {figures['kl']:.3f}"
            )


def plot_overoptimisation(
    history: Sequence[dict[str, float]], path: str | Path, gold_label: str = "gold score"
) -> Path:
    """Proxy reward and gold score against sqrt(KL to the reference) (Gao et al.'s axes) and against
    training steps, from :attr:`GoldScoreCallback.history`; written to ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    draw_overoptimisation(axes, history, gold_label)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def draw_overoptimisation(axes: Sequence[Any], history: Sequence[dict[str, float]], gold_label: str) -> None:
    """:func:`plot_overoptimisation`'s two panels, on the matplotlib ``axes`` given (the dashboard's)."""
    if not history:
        raise ValueError("history: no measurements to plot")
    steps = np.array([row["timesteps"] for row in history])
    root_kl = np.sqrt(np.maximum([row["kl"] for row in history], 0.0))
    proxy, gold = np.array([row["proxy"] for row in history]), np.array([row["gold"] for row in history])
    panels = ((axes[0], root_kl, "sqrt(KL to the reference), nats^0.5"), (axes[1], steps, "training steps"))
    for ax, x, label in panels:
        ax.plot(x, proxy, "o-", color="tab:blue", alpha=0.8, label="proxy (reward model)")
        ax.set_xlabel(label)
        ax.set_ylabel("proxy reward", color="tab:blue")
        twin = ax.twinx()
        twin.plot(x, gold, "s-", color="tab:orange", alpha=0.8, label=gold_label)
        twin.set_ylabel(gold_label, color="tab:orange")
        lines = ax.get_lines() + twin.get_lines()
        ax.legend(lines, [line.get_label() for line in lines], loc="lower right", fontsize=8)
        ax.grid(alpha=0.3)
    axes[0].set_title("Proxy and gold as the policy leaves its reference")
    axes[1].set_title("Proxy and gold during training")
