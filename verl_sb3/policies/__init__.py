"""The small language models as Stable-Baselines3 policies.

- :class:`SLMLstmPolicy` (sb3-contrib's recurrent family, for ``RecurrentPPO`` / ``VerifiedRecurrentPPO``):
  token embedding -> LSTM -> vocabulary logits, reading the whole prompt at each episode start;
- :class:`SLMTransformerPolicy` (SB3's ``ActorCriticPolicy``, for ``PPO`` / ``VerifiedPPO``): a small
  causal transformer over the whole observed sequence.

Both read token-sequence observations (:mod:`verl_sb3.tokens`) and act on ``Discrete(V)``.
"""

from verl_sb3.policies.layers import SPARSE_BAG_RATIO, BagOfTokensCritic, TiedOutput, TokenIdsExtractor
from verl_sb3.policies.lstm import SLMLstmPolicy
from verl_sb3.policies.transformer import CausalTransformerLM, SLMTransformerPolicy, TransformerActorCritic

__all__ = [
    "SPARSE_BAG_RATIO",
    "BagOfTokensCritic",
    "CausalTransformerLM",
    "SLMLstmPolicy",
    "SLMTransformerPolicy",
    "TiedOutput",
    "TokenIdsExtractor",
    "TransformerActorCritic",
]
