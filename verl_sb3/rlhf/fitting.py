"""Fitting a reward model to preferences with the Bradley-Terry loss, a held-out split and early stopping."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch as th
from torch import nn

from textenv_gym.dynamics import TextGenConfig
from verl_sb3._validation import require_int, require_number
from verl_sb3.rlhf.bradley_terry import bradley_terry_loss, preference_accuracy
from verl_sb3.rlhf.preferences import Preference
from verl_sb3.rlhf.reward_model import SequenceRewardModel


@dataclass
class RewardModelFit:
    """A fitted reward model (its best held-out epoch's weights) and the fit's figures."""

    module: nn.Module
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    n_train: int = 0
    n_held_out: int = 0

    @property
    def best(self) -> dict[str, float]:
        """The figures of the epoch whose weights were kept."""
        return self.history[self.best_epoch - 1]

    def summary(self) -> dict[str, Any]:
        """The figures ``config.json`` keeps."""
        return {
            "best_epoch": self.best_epoch,
            "epochs_run": len(self.history),
            "n_train": self.n_train,
            "n_held_out": self.n_held_out,
            **{k: v for k, v in self.best.items() if k != "epoch"},
        }


def encode_pairs(preferences: Sequence[Preference], config: TextGenConfig) -> tuple[th.Tensor, ...]:
    """The token batches of the ``a`` and ``b`` sequences (prompt, then completion; padded with
    ``pad_id`` to ``max_length``), their lengths, and the targets; a ValueError names a record that
    does not fit the environment."""
    n, width = len(preferences), config.max_length
    tokens = np.full((2, n, width), config.pad_id, dtype=np.int64)
    lengths = np.zeros((2, n), dtype=np.int64)
    for index, preference in enumerate(preferences):
        try:
            prompt = list(config.encode_prompt(preference.prompt)) if preference.prompt else []
            for side, text in enumerate((preference.a, preference.b)):
                ids = prompt + list(config.tokenizer.encode(text))
                if len(ids) > width:
                    raise ValueError(
                        f"{'ab'[side]} has {len(ids)} tokens with its prompt, more than max_length {width}"
                    )
                tokens[side, index, : len(ids)], lengths[side, index] = ids, len(ids)
        except ValueError as error:
            raise ValueError(f"preferences[{index}]: {error}") from None
    targets = th.tensor([preference.target for preference in preferences], dtype=th.float32)
    return th.as_tensor(tokens[0]), th.as_tensor(lengths[0]), th.as_tensor(tokens[1]), th.as_tensor(lengths[1]), targets


def fit_reward_model(
    preferences: Sequence[Preference],
    config: TextGenConfig,
    module: nn.Module | None = None,
    held_out_share: float = 0.2,
    epochs: int = 100,
    patience: int = 10,
    batch_size: int = 64,
    learning_rate: float = 1e-3,
    seed: int = 0,
    progress: Callable[[dict[str, float]], Any] | None = None,
) -> RewardModelFit:
    """Fit ``module`` (default: a new :class:`SequenceRewardModel` for ``config``'s vocabulary) to the
    preferences with Adam on the Bradley-Terry loss.

    A random ``held_out_share`` of the pairs (at least one) is kept out of training; after each epoch
    the held-out loss and accuracy are measured, and training stops after ``patience`` epochs without
    a lower held-out loss. The weights of the best held-out epoch are kept.

    :param progress: called with each epoch's figures (``epoch``, ``train_loss``, ``held_out_loss``,
        ``held_out_accuracy``, ``train_accuracy``).
    """
    if len(preferences) < 2:
        raise ValueError(
            f"preferences: need at least 2 labelled pairs (one to train, one held out), got {len(preferences)}"
        )
    require_number("held_out_share", held_out_share, 0.0, 1.0, open_low=True, open_high=True)
    require_int("epochs", epochs, 1)
    require_int("patience", patience, 1)
    require_int("batch_size", batch_size, 1)
    require_number("learning_rate", learning_rate, 0.0, math.inf, open_low=True, open_high=True)
    require_int("seed", seed, 0)
    module = SequenceRewardModel(config.vocab_size) if module is None else module
    if not isinstance(module, nn.Module):
        raise ValueError(f"module: expected a torch.nn.Module scoring (tokens, lengths), got {module!r}")
    data = encode_pairs(preferences, config)
    order = np.random.default_rng(seed).permutation(len(preferences))
    n_held_out = min(max(1, round(held_out_share * len(preferences))), len(preferences) - 1)
    held_out, train = order[:n_held_out], order[n_held_out:]
    generator = th.Generator().manual_seed(seed)
    device = next(module.parameters()).device
    optimizer = th.optim.Adam(module.parameters(), lr=learning_rate)
    fit = RewardModelFit(module, n_train=len(train), n_held_out=n_held_out)
    best_loss, best_state = math.inf, copy.deepcopy(module.state_dict())
    for epoch in range(1, epochs + 1):
        module.train()
        for batch in th.as_tensor(train)[th.randperm(len(train), generator=generator)].split(batch_size):
            loss = bradley_terry_loss(*_scores(module, data, batch, device), data[4][batch].to(device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        figures = {
            "epoch": epoch,
            **_evaluate(module, data, train, "train", device),
            **_evaluate(module, data, held_out, "held_out", device),
        }
        fit.history.append(figures)
        if progress is not None:
            progress(figures)
        if not math.isfinite(figures["train_loss"]):
            raise ValueError(
                f"fit_reward_model: the training loss became {figures['train_loss']} at epoch {epoch}; "
                "lower learning_rate"
            )
        if figures["held_out_loss"] < best_loss:
            best_loss, best_state, fit.best_epoch = figures["held_out_loss"], copy.deepcopy(module.state_dict()), epoch
        elif epoch - fit.best_epoch >= patience:
            break
    module.load_state_dict(best_state)
    module.eval()
    return fit


def _scores(
    module: nn.Module, data: tuple[th.Tensor, ...], rows: Any, device: th.device
) -> tuple[th.Tensor, th.Tensor]:
    tokens_a, lengths_a, tokens_b, lengths_b, _ = data
    score_a = module(tokens_a[rows].to(device), lengths_a[rows].to(device)).reshape(-1)
    score_b = module(tokens_b[rows].to(device), lengths_b[rows].to(device)).reshape(-1)
    return score_a, score_b


@th.no_grad()
def _evaluate(module: nn.Module, data: tuple[th.Tensor, ...], rows: np.ndarray, name: str, device) -> dict[str, float]:
    module.eval()
    rows = th.as_tensor(rows)
    score_a, score_b = _scores(module, data, rows, device)
    target = data[4][rows].to(device)
    return {
        f"{name}_loss": float(bradley_terry_loss(score_a, score_b, target)),
        f"{name}_accuracy": preference_accuracy(score_a, score_b, target),
    }
