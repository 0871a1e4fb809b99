"""Human feedback: preference labels, a Bradley-Terry reward model fitted to them, and RL against it.

- :mod:`~verl_sb3.rlhf.preferences`: the JSONL preference format (:func:`read_preferences`,
  :func:`append_preferences`);
- :mod:`~verl_sb3.rlhf.labelling`: pairs sampled from a model (:func:`sample_pairs`) and labelled by a
  function or a person (:func:`label_pairs`, :class:`TerminalLabeller`);
- :mod:`~verl_sb3.rlhf.fitting`: :func:`fit_reward_model` (Bradley-Terry loss, held-out split, early
  stopping) of a :class:`SequenceRewardModel` or a user module;
- :mod:`~verl_sb3.rlhf.reward_model`: saving it without pickle and loading it as a reward component
  (:func:`save_reward_model`, :func:`load_reward_model`);
- :mod:`~verl_sb3.rlhf.overoptimisation`: proxy reward against gold score as the KL grows
  (:class:`GoldScoreCallback`, :func:`plot_overoptimisation`).
"""

from verl_sb3.rlhf.bradley_terry import bradley_terry_loss, preference_accuracy
from verl_sb3.rlhf.fitting import RewardModelFit, encode_pairs, fit_reward_model
from verl_sb3.rlhf.labelling import LabelSession, Pair, label_pairs, model_prompts, sample_pairs
from verl_sb3.rlhf.overoptimisation import (
    GoldScoreCallback,
    environment_return,
    measure_gold_and_proxy,
    plot_overoptimisation,
)
from verl_sb3.rlhf.preferences import Preference, append_preferences, read_preferences
from verl_sb3.rlhf.reward_model import (
    SequenceRewardModel,
    environment_settings,
    load_reward_model,
    read_reward_model,
    save_reward_model,
)
from verl_sb3.rlhf.terminal import TerminalLabeller

__all__ = [
    "GoldScoreCallback",
    "LabelSession",
    "Pair",
    "Preference",
    "RewardModelFit",
    "SequenceRewardModel",
    "TerminalLabeller",
    "append_preferences",
    "bradley_terry_loss",
    "encode_pairs",
    "environment_return",
    "environment_settings",
    "fit_reward_model",
    "label_pairs",
    "load_reward_model",
    "measure_gold_and_proxy",
    "model_prompts",
    "plot_overoptimisation",
    "preference_accuracy",
    "read_preferences",
    "read_reward_model",
    "sample_pairs",
    "save_reward_model",
]
