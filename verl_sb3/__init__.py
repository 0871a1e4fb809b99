"""verl_sb3: verified PPO (Stable-Baselines3) for small language models on TextGen-v0."""

from verl_sb3.checks import CheckResult, UpdateContext
from verl_sb3.verified import VerificationMixin, VerifiedPPO, VerifiedRecurrentPPO

__all__ = ["CheckResult", "UpdateContext", "VerificationMixin", "VerifiedPPO", "VerifiedRecurrentPPO"]
__version__ = "0.1.0"
