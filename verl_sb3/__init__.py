"""verl_sb3: verified PPO (Stable-Baselines3) for small language models on TextGen-v0."""

from verl_sb3.checks import CheckResult, UpdateContext
from verl_sb3.kl_control import AdaptiveKLController, FixedKLController
from verl_sb3.reference import ReferenceKLMixin
from verl_sb3.transformer_policy import SLMTransformerPolicy
from verl_sb3.verified import VerificationMixin, VerifiedPPO, VerifiedRecurrentPPO
from verl_sb3.warmup import CriticWarmupCallback

__all__ = [
    "AdaptiveKLController",
    "CheckResult",
    "CriticWarmupCallback",
    "FixedKLController",
    "ReferenceKLMixin",
    "SLMTransformerPolicy",
    "UpdateContext",
    "VerificationMixin",
    "VerifiedPPO",
    "VerifiedRecurrentPPO",
]
__version__ = "0.1.0"
