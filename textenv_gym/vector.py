"""TextGen-v0 for N sequences at once: the same dynamics held in numpy arrays.

:class:`TextGenVectorEnv` is Gymnasium's native vector environment (``gym.make_vec(...,
vectorization_mode="vector_entry_point")``), with Gymnasium's default next-step autoreset.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from typing import Any

import numpy as np
from gymnasium import spaces
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from textenv_gym.dynamics import (
    DEFAULT_MAX_LENGTH,
    RewardFunction,
    SequenceBatch,
    StepOutcome,
    TextGenConfig,
    validate_actions,
)
from textenv_gym.episodes import EpisodeStarter
from textenv_gym.rendering import text_frame
from textenv_gym.scoring import ComputeScore
from textenv_gym.text_gen import check_render_mode, observation_space_for


def _masked(values: dict[str, np.ndarray], masks: dict[str, np.ndarray]) -> dict[str, Any]:
    """``values`` with Gymnasium's ``_key`` mask next to each key (one mask array per key, as ``SyncVectorEnv``)."""
    info: dict[str, Any] = {}
    for name, value in values.items():
        info[name], info[f"_{name}"] = value, masks[name]
    return info


def reset_info(batch: SequenceBatch) -> dict[str, Any]:
    """The ``info`` of :meth:`TextGenEnv.reset` for every sequence, batched: every key filled."""
    num_envs = batch.num_sequences
    values = {
        "length": batch.lengths.copy(),
        "diversity": batch.unique / np.maximum(batch.lengths, 1),
        "repeated": np.zeros(num_envs, dtype=bool),
        "forbidden": np.zeros(num_envs, dtype=bool),
    }
    return _masked(values, {name: np.ones(num_envs, dtype=bool) for name in values})


def step_info(outcome: StepOutcome, rows: np.ndarray, num_envs: int, batch: SequenceBatch) -> dict[str, Any]:
    """Gymnasium vector ``info``, as ``SyncVectorEnv`` of :class:`TextGenEnv` builds it.

    Each key is an array over all environments with a ``_key`` mask of the filled entries. The
    sequences in ``rows`` were stepped (``outcome``); the others were just autoreset and get the
    reset info of :class:`TextGenEnv` (``length``, ``diversity``, ``repeated``, ``forbidden``,
    no ``reward_components``).
    """
    stepped = np.zeros(num_envs, dtype=bool)
    stepped[rows] = True
    # Same division as SequenceBatch.append (stepped rows) and TextGenEnv's reset info (the others).
    info = reset_info(batch)
    info["repeated"][rows] = outcome.repeated
    info["forbidden"][rows] = outcome.forbidden
    if not len(rows):  # every environment was autoreset: no reward_components at all, as SyncVectorEnv
        return info
    components = {}
    for name, value in outcome.components.items():
        components[name] = np.zeros(num_envs)
        components[name][rows] = value
    info["reward_components"] = _masked(components, {name: stepped.copy() for name in components})
    info["_reward_components"] = stepped
    return info


class TextGenVectorEnv(VectorEnv):
    """TextGen-v0 for ``num_envs`` sequences, without a Python object or loop per environment.

    Same arguments, spaces (batched), rewards and ``info`` keys (as arrays, with Gymnasium's
    ``_key`` masks) as :class:`textenv_gym.TextGenEnv`, plus ``num_envs``.

    Autoreset (Gymnasium's ``AutoresetMode.NEXT_STEP``): the step that ends an episode returns
    its last observation with ``terminated=True``; the next ``step`` ignores that environment's
    action, resets it and returns the starting observation with reward 0 and
    ``terminated=False``, and its ``info`` entries are those of :meth:`TextGenEnv.reset`, as
    ``SyncVectorEnv`` reports them. User components (``reward_fns``) are called once per step with
    the sequences that were stepped. A prompt given as ``reset(options={"prompt": p})`` is the
    starting sequence of every environment (a list of prompts: one per environment), also at every
    autoreset, until another is given (None: back to ``prompts``, or the empty prompt).

    With ``prompts``, environments come in groups of ``group_size`` that answer the same drawn
    prompts in the same order (:class:`textenv_gym.prompts.PromptSchedule`); the reset info of an
    episode holds ``prompt``, ``ground_truth``, ``data_source``, ``prompt_index``, ``group`` and
    ``group_episode`` (the episode's number within its group). Without ``prompts`` but with
    ``group_size`` >= 2, groups share the empty prompt and the reset info holds ``group`` and
    ``group_episode`` only.
    """

    metadata = {"render_modes": ["ansi", "rgb_array"], "autoreset_mode": AutoresetMode.NEXT_STEP}

    def __init__(
        self,
        num_envs: int = 1,
        vocab_size: int | None = None,
        max_length: int = DEFAULT_MAX_LENGTH,
        repetition_penalty: float = -0.5,
        repetition_window: int = 3,
        forbidden_tokens: Sequence[int] = (),
        forbidden_penalty: float = -1.0,
        vocabulary: Sequence[str] | None = None,
        reward_weights: Mapping[str, float] | None = None,
        reward_fns: Mapping[str, RewardFunction] | None = None,
        render_mode: str | None = None,
        eos_token: str | int | None = None,
        compute_score: ComputeScore | None = None,
        prompts: Any = None,
        tokenizer: Any = None,
        group_size: int = 1,
    ) -> None:
        check_render_mode(render_mode, self.metadata)
        self.config = TextGenConfig(
            vocab_size,
            max_length,
            repetition_penalty,
            repetition_window,
            forbidden_tokens,
            forbidden_penalty,
            vocabulary,
            reward_weights,
            reward_fns,
            eos_token,
            compute_score,
            prompts,
            tokenizer,
        )
        self.sequences = SequenceBatch(self.config, num_envs)
        self.starter = EpisodeStarter(self.sequences, group_size)
        self.num_envs = self.sequences.num_sequences
        self.render_mode = render_mode
        self.single_action_space = spaces.Discrete(self.config.vocab_size)
        self.action_space = batch_space(self.single_action_space, self.num_envs)
        self.single_observation_space = observation_space_for(self.config)
        self.observation_space = batch_space(self.single_observation_space, self.num_envs)
        self._autoreset = np.zeros(self.num_envs, dtype=bool)
        self._started = False

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        self.starter.set_vector_options(options, self.num_envs)
        self.starter.start(np.arange(self.num_envs), self.np_random, restart=True)
        self._autoreset[:] = False
        self._started = True
        info = reset_info(self.sequences)
        self._add_prompt_info(info, np.arange(self.num_envs))
        return self.sequences.tokens.copy(), info

    def step(self, actions):
        if not self._started:
            raise ValueError("step: call reset() before the first step")
        actions = validate_actions(actions, self.num_envs, self.config.vocab_size)
        resetting = np.flatnonzero(self._autoreset)
        rows = np.flatnonzero(~self._autoreset)
        # all of the step or none (without an autoreset, append is atomic on its own)
        with self.starter.transaction(self.np_random, resetting) if len(resetting) else nullcontext():
            if len(resetting):
                self.starter.start(resetting, self.np_random)
            outcome = self.sequences.append(actions[rows], rows)
        reward = np.zeros(self.num_envs)
        terminated = np.zeros(self.num_envs, dtype=bool)
        reward[rows] = outcome.reward
        terminated[rows] = outcome.terminated
        self._autoreset = terminated.copy()
        truncated = np.zeros(self.num_envs, dtype=bool)
        info = step_info(outcome, rows, self.num_envs, self.sequences)
        self._add_prompt_info(info, resetting)
        for position, details in outcome.score_details.items():
            if details:
                info = self._add_info(info, {"score_details": details}, int(rows[position]))
        return self.sequences.tokens.copy(), reward, terminated, truncated, info

    def _add_prompt_info(self, info: dict[str, Any], rows: np.ndarray) -> None:
        """The prompt keys of the episodes started in ``rows``, as ``SyncVectorEnv`` batches them."""
        if not self.starter.grouped:
            return
        for row in rows:
            self._add_info(info, self.starter.info(int(row)), int(row))  # fills info in place

    def render(self) -> tuple[str, ...] | tuple[np.ndarray, ...] | None:
        """Each environment's text (``"ansi"``) or its frame (``"rgb_array"``), as ``SyncVectorEnv`` gives them."""
        if self.render_mode is None:
            return None
        texts = self.sequences.texts()
        return texts if self.render_mode == "ansi" else tuple(text_frame(text) for text in texts)
