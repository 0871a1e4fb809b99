"""A Hugging Face causal language model read as the actor-critic of a token-sequence policy.

:class:`CausalLMActorCritic` is the ``mlp_extractor`` of :class:`verl_sb3.hf.HFCausalLMPolicy`:
from token-sequence observations (:mod:`verl_sb3.tokens`) it gives the next-token logits (the
actor's latent, which the policy's ``action_net`` passes on unchanged) and the final hidden state
at the last real token (the critic's latent). A sequence is read as ``[BOS, s_0, ..., s_{n-1}]``.

Two ways to compute them, both exact up to float rounding:

- a batch of observations (training, evaluation, verification): only the batch's maximal
  sequences are encoded, up to its longest one, with an attention mask over the padding
  (:meth:`verl_sb3.policies.CausalTransformerLM.shared_prefixes`);
- a rollout step (:meth:`CausalLMActorCritic.step`): a sequence that is the one of the previous
  step plus one token reads only that token, with its key/value cache (:class:`RolloutCache`);
  only new episodes are encoded whole.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch as th
from torch import nn

from verl_sb3.policies.transformer import CausalTransformerLM
from verl_sb3.tokens import features_to_token_ids, padded_after_end


def causal_lm(model: nn.Module) -> nn.Module:
    """The ``PreTrainedModel`` itself: a peft model's base model (its LoRA layers in place), else ``model``."""
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


def _cache_argument(body: nn.Module) -> str:
    """The name under which ``body``'s forward takes the key/value cache (``cache`` from transformers 5)."""
    parameters = inspect.signature(body.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


@dataclass
class Cohort:
    """Sequences that started together: their key/value cache, its attention mask, what it holds."""

    rows: th.Tensor  # the batch rows, in the cache's order
    tokens: th.Tensor  # (rows, L) the sequences the cache holds
    lengths: th.Tensor
    mask: th.Tensor  # (rows, slots)
    cache: Any

    def extended(self, tokens: th.Tensor, lengths: th.Tensor) -> th.Tensor:
        """Which of the cohort's rows now hold its sequence plus exactly one token."""
        tokens, lengths = tokens[self.rows], lengths[self.rows]
        kept = th.arange(tokens.shape[1], device=tokens.device) < self.lengths.unsqueeze(1)
        return (lengths == self.lengths + 1) & ((tokens == self.tokens) | ~kept).all(dim=1)

    def keep(self, selected: th.Tensor) -> None:
        """Drop the rows not ``selected`` (booleans over the cohort's rows), cache included."""
        if bool(selected.all()):
            return
        index = selected.nonzero().squeeze(1)
        self.cache.batch_select_indices(index)
        self.rows, self.tokens, self.lengths, self.mask = (
            x[index] for x in (self.rows, self.tokens, self.lengths, self.mask)
        )


class RolloutCache:
    """The key/value caches of the sequences the last rollout step read, one per cohort.

    A rollout step reads the sequences that started (or restarted) at the same step as one
    cohort, with one cache; a row that restarts leaves its cohort (``batch_select_indices``) and
    joins the new one. Within a cohort, sequences of different prompt lengths leave masked slots,
    which the attention mask and explicit position ids keep out. A copy is empty (a deep copy of
    the policy, such as the frozen reference, starts its own).
    """

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self.cohorts: list[Cohort] = []
        self.shape: tuple[int, ...] | None = None
        self.version: int | None = None

    @property
    def tokens(self) -> th.Tensor | None:
        """The tokens of the sequences held (None when empty)."""
        return th.cat([cohort.tokens for cohort in self.cohorts]) if self.cohorts else None

    def __deepcopy__(self, memo: dict) -> RolloutCache:
        return RolloutCache()


class CausalLMActorCritic(nn.Module):
    """Next-token logits and the last hidden state of a causal LM, from token-sequence observations.

    :param model: a ``PreTrainedModel`` with a causal-LM head (or a peft model around one).
    :param vocab_size: ``V``, the action space's size; the model's logits are cut to their first
        ``V`` (a model may have padded its embedding matrix beyond its tokenizer's vocabulary).
    :param max_length: ``L``, the observations' length.
    :param bos_token_id: the id read before every sequence.
    :param critic: ``"shared"`` (the value loss trains the model too), ``"detached"`` (the value
        head reads the hidden state without sending gradients into the model) or ``"none"``.
    :param kv_cache: use :class:`RolloutCache` in :meth:`step` (else every step encodes the batch whole).
    """

    def __init__(
        self, model: nn.Module, vocab_size: int, max_length: int, bos_token_id: int, critic: str, kv_cache: bool
    ) -> None:
        super().__init__()
        self.model = model
        self.vocab_size, self.max_length, self.pad_id = vocab_size, max_length, vocab_size
        self.bos_token_id, self.critic, self.kv_cache = bos_token_id, critic, kv_cache
        lm = causal_lm(model)
        self.hidden_size = int(lm.get_output_embeddings().in_features)
        self.latent_dim_pi, self.latent_dim_vf = vocab_size, self.hidden_size
        self._cache_argument = _cache_argument(lm.base_model)
        self.rollout_cache = RolloutCache()

    # ------------------------------------------------------------------ the model's parts
    @property
    def body(self) -> nn.Module:
        """The transformer without its head (``base_model`` of the ``PreTrainedModel``)."""
        return causal_lm(self.model).base_model

    @property
    def head(self) -> nn.Module:
        """The output projection to the vocabulary (``get_output_embeddings()``)."""
        return causal_lm(self.model).get_output_embeddings()

    def logits(self, hidden: th.Tensor) -> th.Tensor:
        """Float32 logits over the ``V`` tokens from final hidden states."""
        return self.head(hidden)[..., : self.vocab_size].float()

    def token_ids(self, features: th.Tensor) -> tuple[th.Tensor, th.Tensor]:
        return padded_after_end(features_to_token_ids(features, self.vocab_size, self.max_length), self.pad_id)

    def _encode(
        self, input_ids: th.Tensor, mask: th.Tensor, positions: th.Tensor, use_cache: bool = False, cache: Any = None
    ) -> tuple[th.Tensor, Any]:
        """The body's final hidden states and, with ``use_cache``, its key/value cache (extending ``cache``)."""
        output = self.body(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=use_cache,
            **({self._cache_argument: cache} if cache is not None else {}),
        )
        return output.last_hidden_state, getattr(output, self._cache_argument, None)

    def _inputs(self, tokens: th.Tensor) -> tuple[th.Tensor, th.Tensor, th.Tensor]:
        """``[BOS, tokens]`` up to the longest sequence, padding as id 0, its mask and positions."""
        width = int((tokens != self.pad_id).sum(dim=1).max()) + 1 if tokens.shape[0] else 1
        bos = th.full((tokens.shape[0], 1), self.bos_token_id, dtype=th.long, device=tokens.device)
        real = tokens[:, : width - 1] != self.pad_id
        mask = th.cat([th.ones_like(bos), real.long()], dim=1)  # BOS is read even when its id is V
        inputs = th.cat([bos, tokens[:, : width - 1].masked_fill(~real, 0)], dim=1)
        positions = th.arange(width, device=tokens.device).expand(tokens.shape[0], width)
        return inputs, mask, positions

    # ------------------------------------------------------------------ batches of observations
    def hidden_states(self, features: th.Tensor) -> th.Tensor:
        """The final hidden state at each sequence's last token (BOS when empty): ``(batch, hidden)``."""
        tokens, lengths = self.token_ids(features)
        if tokens.shape[0] == 0:
            return self.head.weight.new_zeros(0, self.hidden_size)
        rows, positions = CausalTransformerLM.shared_prefixes(tokens, lengths)
        hidden, _ = self._encode(*self._inputs(tokens[rows]))
        return hidden[positions]

    def forward(self, features: th.Tensor) -> tuple[th.Tensor, th.Tensor]:
        hidden = self.hidden_states(features)
        return self.logits(hidden), self._critic_latent(hidden)

    def forward_actor(self, features: th.Tensor) -> th.Tensor:
        return self.logits(self.hidden_states(features))

    def forward_critic(self, features: th.Tensor) -> th.Tensor:
        if self.critic == "none":
            return features.new_zeros(features.shape[0], self.hidden_size)
        return self._critic_latent(self.hidden_states(features))

    def _critic_latent(self, hidden: th.Tensor) -> th.Tensor:
        if self.critic == "none":
            return th.zeros_like(hidden, dtype=th.float32)
        return (hidden.detach() if self.critic == "detached" else hidden).float()

    # ------------------------------------------------------------------ rollout steps
    def parameters_version(self) -> int:
        """Changes whenever a parameter is modified in place (an update, a rollback, a load)."""
        return sum(parameter._version for parameter in self.parameters())

    @th.no_grad()
    def step(self, features: th.Tensor) -> tuple[th.Tensor, th.Tensor]:
        """:meth:`forward` for a rollout step: each sequence that is the previous step's plus one
        token reads only that token with its cohort's key/value cache; the others (new episodes, or
        any sequence after the parameters changed) are encoded whole, as a new cohort."""
        tokens, lengths = self.token_ids(features)
        if not self.kv_cache or tokens.shape[0] == 0:
            return self.forward(features)
        state, version = self.rollout_cache, self.parameters_version()
        if state.version != version or state.shape != tuple(tokens.shape):
            state.clear()
            state.version, state.shape = version, tuple(tokens.shape)
        hidden: th.Tensor | None = None
        served = th.zeros(tokens.shape[0], dtype=th.bool, device=tokens.device)
        cohorts = []
        for cohort in state.cohorts:
            extended = cohort.extended(tokens, lengths)
            if not bool(extended.any()):
                continue
            cohort.keep(extended)
            cohort.tokens, cohort.lengths = tokens[cohort.rows], lengths[cohort.rows]
            new = cohort.tokens[th.arange(len(cohort.rows), device=tokens.device), cohort.lengths - 1].unsqueeze(1)
            cohort.mask = th.cat([cohort.mask, cohort.mask.new_ones(len(cohort.rows), 1)], dim=1)
            out, cohort.cache = self._encode(new, cohort.mask, cohort.lengths.unsqueeze(1), True, cohort.cache)
            hidden = _placed(hidden, cohort.rows, out[:, -1], tokens.shape[0])
            served[cohort.rows] = True
            cohorts.append(cohort)
        fresh = (~served).nonzero().squeeze(1)
        if len(fresh):
            inputs, mask, positions = self._inputs(tokens[fresh])
            out, cache = self._encode(inputs, mask, positions, True)
            hidden = _placed(
                hidden, fresh, out[th.arange(len(fresh), device=tokens.device), lengths[fresh]], len(served)
            )
            cohorts.append(Cohort(fresh, tokens[fresh], lengths[fresh], mask, cache))
        state.cohorts = cohorts
        return self.logits(hidden), self._critic_latent(hidden)


def _placed(hidden: th.Tensor | None, rows: th.Tensor, values: th.Tensor, n_rows: int) -> th.Tensor:
    """``hidden`` (created for ``n_rows`` rows on first use) with ``values`` written at ``rows``."""
    if hidden is None:
        hidden = values.new_zeros(n_rows, values.shape[-1])
    hidden[rows] = values
    return hidden
