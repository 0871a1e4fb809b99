"""The module that models saved by verl_sb3 0.1 name as their transformer policy's home; it now
lives in :mod:`verl_sb3.policies.transformer`."""

from verl_sb3.policies.transformer import SLMTransformerPolicy

__all__ = ["SLMTransformerPolicy"]
