"""TextGen environments on Ray RLlib (new API stack) with verified PPO updates. Needs the extra ``rllib``."""

from __future__ import annotations

from typing import Any

RLLIB_EXTRA = 'the optional extra "rllib": pip install "textenv-gym[rllib]" (or pip install -e ".[rllib]")'


def ppo_config(
    env_id: str = "TextGen-v0",
    num_env_runners: int = 2,
    kl_threshold: float = 0.25,
    min_entropy: float = 0.01,
    checks: tuple = (),
    model_config: dict[str, Any] | None = None,
    **env_kwargs: Any,
) -> Any:
    """An RLlib ``PPOConfig`` ready to ``build_algo()``: ``env_id`` (TextGen-v0 or a task, with
    ``env_kwargs``) registered for RLlib, the SLM as its module, the verified learner with its
    thresholds (:class:`verl_sb3.VerifiedPPO`'s meaning and defaults) and your ``checks``."""
    try:
        from ray.rllib.algorithms.ppo import PPOConfig
        from ray.rllib.core.rl_module.rl_module import RLModuleSpec
        from ray.tune.registry import register_env
    except ImportError as error:
        raise ImportError(f"ppo_config needs Ray RLlib, which is not installed; install {RLLIB_EXTRA}") from error
    from verl_sb3.rllib.learner import CHECKS_KEY, KL_THRESHOLD_KEY, MIN_ENTROPY_KEY, VerifiedPPOTorchLearner
    from verl_sb3.rllib.module import SLMTorchRLModule

    name = f"verl_sb3/{env_id}"
    register_env(name, lambda config: _make_env(env_id, config))
    return (
        PPOConfig()
        .environment(name, env_config=dict(env_kwargs))
        .env_runners(num_env_runners=num_env_runners)
        .rl_module(rl_module_spec=RLModuleSpec(module_class=SLMTorchRLModule, model_config=model_config or {}))
        .training(
            learner_class=VerifiedPPOTorchLearner,
            learner_config_dict={
                KL_THRESHOLD_KEY: kl_threshold,
                MIN_ENTROPY_KEY: min_entropy,
                CHECKS_KEY: list(checks),
            },
        )
    )


def _make_env(env_id: str, config: dict[str, Any]) -> Any:
    import gymnasium as gym

    import textenv_gym  # noqa: F401  (registers the environments in the env-runner process)

    return gym.make(env_id, **dict(config))
