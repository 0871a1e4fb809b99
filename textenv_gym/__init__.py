"""textenv_gym: TextGen-v0, a Gymnasium text-generation environment for reinforcement learning.

``import textenv_gym`` registers ``TextGen-v0`` and the tasks ``TextGen-Reverse-v0`` and
``TextGen-Arithmetic-v0``; ``gym.make("textenv_gym:TextGen-v0")`` works without it.
"""

from gymnasium.envs.registration import register, registry

from textenv_gym.dynamics import BUILTIN_COMPONENTS, SequenceBatch, TextGenConfig, reward_components
from textenv_gym.reward_models import TorchRewardModel
from textenv_gym.text_gen import TextGenEnv
from textenv_gym.vector import TextGenVectorEnv
from textenv_gym.vocabulary import DEFAULT_VOCABULARY, Tokenizer

__all__ = [
    "BUILTIN_COMPONENTS",
    "DEFAULT_VOCABULARY",
    "SequenceBatch",
    "TextGenConfig",
    "TextGenEnv",
    "TextGenVectorEnv",
    "Tokenizer",
    "TorchRewardModel",
    "reward_components",
]
__version__ = "0.2.0"

if "TextGen-v0" not in registry:
    register(
        id="TextGen-v0",
        entry_point="textenv_gym.text_gen:TextGenEnv",
        vector_entry_point="textenv_gym.vector:TextGenVectorEnv",
    )
for _env_id, _name in (("TextGen-Reverse-v0", "reverse"), ("TextGen-Arithmetic-v0", "arithmetic")):
    if _env_id not in registry:
        register(
            id=_env_id,
            entry_point=f"textenv_gym.tasks:{_name}_env",
            vector_entry_point=f"textenv_gym.tasks:{_name}_vector_env",
        )
