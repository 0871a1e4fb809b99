"""TextGen-v0 as a Stable-Baselines3 ``VecEnv``: the native batched dynamics, SB3's conventions."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from stable_baselines3.common.vec_env import VecEnv, VecMonitor
from stable_baselines3.common.vec_env.base_vec_env import VecEnvIndices

from textenv_gym.dynamics import SequenceBatch, TextGenConfig, validate_actions
from textenv_gym.episodes import EpisodeStarter
from textenv_gym.rendering import text_frame
from textenv_gym.text_gen import check_render_mode, observation_space_for


class TextGenVecEnv(VecEnv):
    """``num_envs`` TextGen-v0 sequences stepped together, for SB3 algorithms.

    Follows SB3's ``VecEnv`` conventions: an environment whose episode ends is reset in the same
    ``step`` (the returned observation is the new episode's first), and its info holds the last
    observation under ``terminal_observation``, plus ``length`` and ``diversity`` of the finished
    sequence and ``TimeLimit.truncated=False``. Per-step info of running environments is empty
    with the default reward: it is built for speed. With ``reward_weights`` or ``reward_fns``, every
    info holds ``reward_components``, as :class:`textenv_gym.TextGenEnv`'s. A prompt set with
    ``set_options({"prompt": p})`` (or a list of option dicts, one per environment) is used from
    the next reset on (SB3 applies options at ``reset()``) until another is set (None: back to
    ``prompts`` or the empty prompt). Wrap it in SB3's ``VecMonitor`` (or use
    :func:`make_textgen_vec_env`) for episode statistics.

    With ``prompts``, each episode's prompt keys (``prompt``, ``ground_truth``, ``data_source``,
    ``prompt_index``, ``group``, ``group_episode``) are in ``reset_infos`` when it starts, and
    the finished episode's ``prompt_index``, ``group`` and ``group_episode`` in its last info.
    Without ``prompts`` but with ``group_size`` >= 2, groups share the empty prompt and only
    ``group`` and ``group_episode`` are given (the group estimators of ``verl_sb3`` read them).

    :param num_envs: number of sequences.
    :param seed: seed of the action space's and the prompt draws' generators (the dynamics are
        deterministic); ``seed()`` reseeds the draws at the next ``reset()``.
    :param group_size: environments answering the same prompts, in consecutive groups.
    :param render_mode: None or ``"rgb_array"``: ``render()`` tiles the environments' frames, as
        SB3's vectorised environments do (``get_images()`` gives them one by one).
    :param env_kwargs: the other arguments of :class:`textenv_gym.TextGenEnv`.
    """

    metadata = {"render_modes": ["rgb_array"]}

    def __init__(
        self,
        num_envs: int,
        seed: int | None = None,
        render_mode: str | None = None,
        group_size: int = 1,
        **env_kwargs: Any,
    ) -> None:
        check_render_mode(render_mode, self.metadata)
        self.config = TextGenConfig(**env_kwargs)
        self.sequences = SequenceBatch(self.config, num_envs)
        self.starter = EpisodeStarter(self.sequences, group_size)
        self.render_mode = render_mode
        super().__init__(num_envs, observation_space_for(self.config), spaces.Discrete(self.config.vocab_size))
        self.action_space.seed(seed)
        self._rng = np.random.default_rng(seed)
        self._actions = np.zeros(num_envs, dtype=np.int64)

    def set_options(self, options: list[dict] | dict | None = None) -> None:
        """SB3's ``set_options`` (for the next ``reset``), a list of exactly ``num_envs`` dicts, their
        prompts checked now rather than at that reset."""
        if isinstance(options, (list, tuple)) and len(options) != self.num_envs:
            raise ValueError(f"set_options: {len(options)} options for {self.num_envs} environments; give one each")
        given = options if isinstance(options, (list, tuple)) else [options or {}] * self.num_envs
        for index, option in enumerate(given):
            if not isinstance(option, dict):
                raise ValueError(f"set_options[{index}]: expected a dict such as {{'prompt': ...}}, got {option!r}")
            if "prompt" in option:
                self.starter.record(option["prompt"], f"set_options[{index}]['prompt']")
        super().set_options(options)

    def reset(self) -> np.ndarray:
        if self._seeds and self._seeds[0] is not None:
            self._rng = np.random.default_rng(self._seeds[0])
        prompts = {i: options["prompt"] for i, options in enumerate(self._options) if "prompt" in options}
        self.starter.set_options(prompts, name="set_options prompt")
        self.starter.start(np.arange(self.num_envs), self._rng, restart=True)
        self.reset_infos = [self.starter.info(i) for i in range(self.num_envs)]
        self._reset_seeds()
        self._reset_options()
        return self.sequences.tokens.copy()

    def step_async(self, actions: np.ndarray) -> None:
        self._actions = validate_actions(actions, self.num_envs, self.config.vocab_size)

    def step_wait(self):
        # all of the step or none: a prompt that cannot be drawn at an autoreset undoes the appends too
        # (without a prompt source, resetting cannot fail, and append is atomic on its own)
        guard = self.starter.transaction(self._rng, np.arange(self.num_envs)) if self.starter.draws else nullcontext()
        with guard:
            outcome = self.sequences.append(self._actions, reward_dtype=np.float32)
            done = outcome.terminated
            if done.any():
                terminal = {int(index): self.sequences.tokens[index].copy() for index in np.flatnonzero(done)}
                lengths = {index: int(self.sequences.lengths[index]) for index in terminal}
                finished = {index: self._finished_episode(index, outcome) for index in terminal}
                self.starter.start(np.flatnonzero(done), self._rng)
        infos: list[dict[str, Any]] = [{} for _ in range(self.num_envs)]
        if self.config.custom_reward:
            components = {name: value.tolist() for name, value in outcome.components.items()}
            for index, info in enumerate(infos):
                info["reward_components"] = {name: values[index] for name, values in components.items()}
        if done.any():
            for index in terminal:
                infos[index].update(
                    {
                        "terminal_observation": terminal[index],
                        "length": lengths[index],
                        "diversity": float(outcome.diversity[index]),
                        "TimeLimit.truncated": False,
                        **finished[index],
                    }
                )
                if self.starter.grouped:
                    self.reset_infos[index] = self.starter.info(index)
        return self.sequences.tokens.copy(), outcome.reward.astype(np.float32), done.copy(), infos

    def _finished_episode(self, index: int, outcome) -> dict[str, Any]:
        """Which prompt and group the episode that ``index`` just ended answered, and its score's details."""
        info = {}
        if self.starter.grouped:
            last = self.starter.info(index)
            info.update((key, last[key]) for key in ("prompt_index", "group", "group_episode") if key in last)
        if outcome.score_details.get(index):
            info["score_details"] = outcome.score_details[index]
        return info

    def close(self) -> None:
        pass

    @property
    def group_size(self) -> int:
        """Environments answering the same prompts (the empty prompt without a prompt source)."""
        return self.starter.schedule.group_size

    def get_attr(self, attr_name: str, indices: VecEnvIndices = None) -> list[Any]:
        return [getattr(self, attr_name) for _ in self._get_indices(indices)]

    def set_attr(self, attr_name: str, value: Any, indices: VecEnvIndices = None) -> None:
        raise AttributeError(f"set_attr: TextGenVecEnv has no per-environment attribute {attr_name!r} to set")

    def env_method(self, method_name: str, *method_args, indices: VecEnvIndices = None, **method_kwargs) -> list[Any]:
        raise AttributeError(f"env_method: TextGenVecEnv holds no environment objects to call {method_name!r} on")

    def env_is_wrapped(self, wrapper_class: type[gym.Wrapper], indices: VecEnvIndices = None) -> list[bool]:
        return [False for _ in self._get_indices(indices)]

    def get_images(self) -> list[np.ndarray | None]:
        if self.render_mode != "rgb_array":
            return [None] * self.num_envs
        return [text_frame(text) for text in self.sequences.texts()]


def make_textgen_vec_env(
    num_envs: int = 8, seed: int | None = None, group_size: int = 1, **env_kwargs: Any
) -> VecMonitor:
    """A :class:`TextGenVecEnv` wrapped in SB3's ``VecMonitor`` (episode returns and lengths)."""
    return VecMonitor(TextGenVecEnv(num_envs, seed=seed, group_size=group_size, **env_kwargs))


def environment_config(env: Any) -> Any:
    """The ``config`` an SB3 vec env's environments declare (TextGen's :class:`TextGenConfig`), or None."""
    if env is None:
        return None
    try:
        return env.get_attr("config")[0]
    except (AttributeError, IndexError):
        return None
