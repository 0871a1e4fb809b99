"""verl_sb3: verified PPO (Stable-Baselines3) for small language models."""

from verl_sb3.advantages import ADVANTAGE_ESTIMATORS, LOSS_AGG_MODES
from verl_sb3.entropy import EntropyController, TargetEntropyCallback
from verl_sb3.estimation import AdvantageEstimationMixin
from verl_sb3.hf import HFCausalLMPolicy
from verl_sb3.kl_control import AdaptiveKLController, FixedKLController
from verl_sb3.policies import SLMLstmPolicy, SLMTransformerPolicy
from verl_sb3.ppo_update import PPOUpdateMixin
from verl_sb3.reference import ReferenceKLMixin
from verl_sb3.verification import CheckResult, ReuseMassJudge, RolloutJudge, UpdateContext, VerificationConfig
from verl_sb3.verified import VerificationMixin, VerifiedPPO, VerifiedRecurrentPPO
from verl_sb3.warmup import CriticWarmupCallback

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "LOSS_AGG_MODES",
    "AdaptiveKLController",
    "AdvantageEstimationMixin",
    "CheckResult",
    "CriticWarmupCallback",
    "EntropyController",
    "FixedKLController",
    "HFCausalLMPolicy",
    "PPOUpdateMixin",
    "ReferenceKLMixin",
    "ReuseMassJudge",
    "RolloutJudge",
    "SLMLstmPolicy",
    "SLMTransformerPolicy",
    "TargetEntropyCallback",
    "UpdateContext",
    "VerificationConfig",
    "VerificationMixin",
    "VerifiedPPO",
    "VerifiedRecurrentPPO",
]
__version__ = "0.2.0"
