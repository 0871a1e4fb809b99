"""The SLM as an RLlib ``TorchRLModule``: embedding -> 2-layer LSTM -> vocabulary logits, and a value head.

Each step reads the whole observed sequence (token-sequence observations, :mod:`verl_sb3.tokens`),
prompt included, as the SB3 policies do: the module keeps no state between steps.
"""

from __future__ import annotations

from typing import Any

import torch as th
from ray.rllib.core.columns import Columns
from ray.rllib.core.rl_module.apis import ValueFunctionAPI
from ray.rllib.core.rl_module.torch import TorchRLModule
from torch import nn

from verl_sb3.tokens import padded_after_end, token_space_sizes


class SLMTorchRLModule(TorchRLModule, ValueFunctionAPI):
    """``model_config``: ``embedding_dim`` (default 32), ``hidden_size`` (64), ``num_layers`` (2)."""

    def setup(self) -> None:
        self.vocab_size, self.max_length = token_space_sizes(self.observation_space, self.action_space)
        config = {"embedding_dim": 32, "hidden_size": 64, "num_layers": 2, **(self.model_config or {})}
        self.embedding = nn.Embedding(self.vocab_size + 1, config["embedding_dim"], padding_idx=self.vocab_size)
        self.lstm = nn.LSTM(config["embedding_dim"], config["hidden_size"], config["num_layers"], batch_first=True)
        self.logits = nn.Linear(config["hidden_size"], self.vocab_size)
        self.value = nn.Sequential(nn.Linear(config["hidden_size"], 64), nn.Tanh(), nn.Linear(64, 1))

    def _last_hidden(self, observations: th.Tensor) -> th.Tensor:
        """The LSTM's output after each sequence's last real token (a zero state for an empty one)."""
        tokens, lengths = padded_after_end(
            th.round(observations.float()).clamp(0, self.vocab_size).long(), self.vocab_size
        )
        outputs, _ = self.lstm(self.embedding(tokens))
        last = outputs.gather(1, (lengths - 1).clamp(min=0).view(-1, 1, 1).expand(-1, 1, outputs.shape[-1])).squeeze(1)
        return th.where((lengths > 0).unsqueeze(1), last, th.zeros_like(last))

    def _forward(self, batch: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        hidden = self._last_hidden(batch[Columns.OBS])
        return {Columns.ACTION_DIST_INPUTS: self.logits(hidden), Columns.EMBEDDINGS: hidden}

    def compute_values(self, batch: dict[str, Any], embeddings: Any = None) -> th.Tensor:
        hidden = self._last_hidden(batch[Columns.OBS]) if embeddings is None else embeddings
        return self.value(hidden).squeeze(-1)
