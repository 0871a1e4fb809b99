"""Reward models as TextGen-v0 reward components: the RLHF hook.

:class:`TorchRewardModel` makes a ``torch.nn.Module`` that scores token sequences usable as an entry
of the environment's ``reward_fns``. torch is imported when an adaptor is built, not when
``textenv_gym`` is imported.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import torch


class TorchRewardModel:
    """A ``torch.nn.Module`` scoring sequences, as a reward component ``fn(tokens, lengths)``.

    Each call runs ``module(tokens, lengths)`` under ``torch.no_grad()`` in eval mode (the module's
    previous mode is restored afterwards) on ``torch.as_tensor(tokens)`` (int64, ``(N, max_length)``,
    padded with ``pad_id = vocab_size``) and ``torch.as_tensor(lengths)`` (int64, ``(N,)``), both on
    ``device``, and returns the scores as a float64 numpy array of shape ``(N,)``. The module must
    return a tensor of shape ``(N,)`` or ``(N, 1)``.

    Example: ``gym.make("TextGen-v0", reward_fns={"preference": TorchRewardModel(model)})``.

    :param module: the reward model; it is moved to ``device``.
    :param device: the torch device it runs on (default ``"cpu"``).
    :param at_end: score only the sequences whose episode ends on this step (full: ``lengths`` equal to
        ``max_length``, the tokens' width; or ending with ``eos_id``), 0 for the others: the reward of a
        whole completion, as in RLHF. False (the default) scores every sequence on every step.
    :param eos_id: the environment's end token, with ``at_end`` (None: episodes end when full).
    """

    def __init__(
        self,
        module: torch.nn.Module,
        device: str | torch.device = "cpu",
        at_end: bool = False,
        eos_id: int | None = None,
    ) -> None:
        import torch

        if not isinstance(module, torch.nn.Module):
            raise ValueError(f"module: expected a torch.nn.Module, got {type(module).__name__} {module!r}")
        try:
            self.device = torch.device(device)
        except (RuntimeError, TypeError) as error:
            raise ValueError(
                f"device: expected a torch device such as 'cpu' or 'cuda:0', got {device!r} ({error})"
            ) from None
        if not isinstance(at_end, bool):
            raise ValueError(f"at_end: expected True or False, got {at_end!r}")
        if eos_id is not None and (isinstance(eos_id, bool) or not isinstance(eos_id, (int, np.integer)) or eos_id < 0):
            raise ValueError(f"eos_id: expected None or a token id >= 0, got {eos_id!r}")
        self.module = module.to(self.device)
        self.at_end, self.eos_id = at_end, None if eos_id is None else int(eos_id)

    def __call__(self, tokens: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        if not self.at_end:
            return self.scores(tokens, lengths)
        tokens, lengths = np.asarray(tokens), np.asarray(lengths)
        ended = lengths >= tokens.shape[1]
        if self.eos_id is not None:
            last = tokens[np.arange(len(lengths)), np.maximum(lengths - 1, 0)]
            ended |= (lengths > 0) & (last == self.eos_id)
        values = np.zeros(len(lengths))
        if ended.any():
            values[ended] = self.scores(tokens[ended], lengths[ended])
        return values

    def scores(self, tokens: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """The module's score of every sequence, float64 of shape ``(N,)``."""
        import torch

        expected = (len(lengths),)
        was_training = self.module.training
        self.module.eval()
        try:
            with torch.no_grad():
                scores: Any = self.module(
                    torch.as_tensor(tokens, device=self.device), torch.as_tensor(lengths, device=self.device)
                )
        finally:
            self.module.train(was_training)
        name = type(self.module).__name__
        if not isinstance(scores, torch.Tensor):
            raise ValueError(
                f"TorchRewardModel({name}): the module returned {type(scores).__name__}, expected a tensor of "
                f"shape {expected}"
            )
        if tuple(scores.shape) not in (expected, (*expected, 1)):
            raise ValueError(
                f"TorchRewardModel({name}): the module returned shape {tuple(scores.shape)}, "
                f"expected {expected} or {(*expected, 1)} (one score per sequence)"
            )
        return scores.detach().to("cpu", torch.float64).reshape(expected).numpy()

    def __repr__(self) -> str:
        end = f", at_end=True, eos_id={self.eos_id}" if self.at_end else ""
        return f"TorchRewardModel({type(self.module).__name__}, device={str(self.device)!r}{end})"
