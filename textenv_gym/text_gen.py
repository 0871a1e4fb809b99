"""TextGen-v0: generate a token sequence, one token per step, rewarded for diversity."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from textenv_gym.dynamics import DEFAULT_MAX_LENGTH, RewardFunction, SequenceBatch, TextGenConfig, validate_action
from textenv_gym.episodes import EpisodeStarter
from textenv_gym.rendering import text_frame
from textenv_gym.scoring import ComputeScore


def check_render_mode(render_mode: str | None, metadata: dict) -> None:
    """A ValueError unless ``render_mode`` is None or one of ``metadata["render_modes"]``."""
    if render_mode is not None and render_mode not in metadata["render_modes"]:
        raise ValueError(f"render_mode: expected None or one of {metadata['render_modes']}, got {render_mode!r}")


def observation_space_for(config: TextGenConfig) -> spaces.Box:
    """The padded token sequence: ``max_length`` ids in ``[0, vocab_size]``, ``vocab_size`` is padding."""
    return spaces.Box(low=0, high=config.pad_id, shape=(config.max_length,), dtype=np.int64)


class TextGenEnv(gym.Env[np.ndarray, np.int64]):
    """
    ## Description
    A toy language-generation task for reinforcement learning. The state is a token sequence;
    each action appends one token; the reward favours diverse sequences and penalises repeating
    a token several times in a row and using forbidden tokens. The optimum (no prompt, defaults)
    is a sequence of 20 distinct tokens: a reward of 1.0 per step, 20.0 per episode. A uniform
    random policy gets about 18.24.

    ## Action Space
    `Discrete(vocab_size)`: the id of the token to append (default 50 tokens). A Python or numpy
    integer, a 0-d integer array or an integral float is accepted; anything else is a `ValueError`.

    ## Observation Space
    `Box(0, vocab_size, (max_length,), int64)`: the whole sequence so far (prompt included),
    left-aligned and padded on the right with the padding id `vocab_size` (also `env.pad_id`).

    ## Rewards
    After the token is appended, the reward of the new sequence is the sum of
    - `diversity = unique_tokens / total_tokens` over the whole sequence, prompt included;
    - `repetition_penalty` (default -0.5) when the sequence has at least `repetition_window`
      (default 3) tokens and its last `repetition_window` tokens are identical;
    - `forbidden_penalty` (default -1.0) when the appended token is in `forbidden_tokens`.

    Example, defaults: appending 7 to `[3, 7, 7]` gives `[3, 7, 7, 7]`: diversity 2/4 = 0.5, the
    last three tokens are identical, so the reward is 0.5 - 0.5 = 0.0. With the default weights and
    no user components, the reward of one step lies in
    `[1 / max_length + min(repetition_penalty, 0) + min(forbidden_penalty, 0), 1 + max(...)]`.

    **Weights and user components.** Each component has a weight (`reward_weights`, default 1.0)
    and `reward_fns` adds user components (e.g. a learned reward model, the RLHF hook): the
    reward is `sum(weight[name] * value[name])` over the built-in components, then the user
    components in their given order. A user component is called once per (batched) step with the
    sequences just extended: `fn(tokens, lengths)`, `tokens` an int64 array `(N, max_length)`
    padded with `pad_id`, `lengths` their lengths (int64 `(N,)`); it returns `N` finite numbers
    (the scalar environment calls it with `N = 1`). The batched environments match the scalar one
    when it is a pure function of its inputs. `textenv_gym.TorchRewardModel` makes a torch
    reward model such a component.

    `info` holds `length`, `diversity`, `repeated` (the window rule fired), `forbidden` (the token
    is forbidden) and `reward_components`: each component's weighted contribution, by name
    (`weight * value`), so the components sum exactly to the reward.

    **A task: `prompts`, `compute_score`, `eos_token`.** With `compute_score`, veRL's
    `compute_score(data_source, solution_str, ground_truth, extra_info=None) -> float | dict`,
    the step that ends an episode adds the component `score`: the function's value for the
    generated text (`solution_str`: the tokens after the prompt, decoded, the end token left out)
    and the prompt's reference answer. A dict's `"score"` is the value, its other keys are in
    `info["score_details"]`. The built-in components stay as they are unless `reward_weights`
    sets them (`{"diversity": 0.0, "repetition": 0.0}` leaves the score alone).

    ## Starting State
    The empty sequence, or a prompt: `reset(options={"prompt": p})` where `p` is a list of token
    ids, a text encoded with `env.tokenizer` (lower-cased words split on whitespace; an
    unknown word raises a `ValueError`) or a record (below). The prompt must leave room for one
    action: at most `max_length - 1` tokens. It stays for the next resets until another is given
    (`None`: back to the prompt source, or to the empty sequence), so that vector environments'
    autoresets keep it. With `prompts` (a list of prompts or of records `{"prompt", "ground_truth",
    "data_source", "extra_info"}`, veRL's field names, or a callable `(rng) -> record`), each reset
    without an explicit prompt draws one with `np_random`, and `info` holds its `prompt`,
    `ground_truth`, `data_source` and `prompt_index` (-1 when it has none). Otherwise the
    environment has no randomness: `seed` only seeds the spaces' and `np_random`'s generators,
    as Gymnasium requires.

    ## Episode End
    The episode terminates (`terminated=True`; there is no truncation) when the sequence reaches
    `max_length` tokens or ends with `eos_token`. Stepping after that raises a `ValueError`:
    call `reset()`.

    ## Arguments
    - `vocab_size`: number of tokens, at least 2 (default 50, or the length of `vocabulary`).
    - `max_length`: tokens in a full sequence, prompt included, at least 1 (default 20).
    - `repetition_penalty`: finite number added when the window rule fires (default -0.5).
    - `repetition_window`: how many identical trailing tokens count as a repetition, at least 2 (default 3).
    - `forbidden_tokens`: token ids in `[0, vocab_size)` that must not be generated (default none);
      they may not cover the whole vocabulary.
    - `forbidden_penalty`: finite number added when a forbidden token is appended (default -1.0).
    - `vocabulary`: the token strings (default: 50 English words, `textenv_gym.DEFAULT_VOCABULARY`,
      extended with `tok50`, `tok51`, ... for larger `vocab_size`).
    - `reward_weights`: finite weight per component name, built-in or user (default: 1.0 for each;
      names left out weigh 1.0). An unknown name is a `ValueError` listing the known ones.
    - `reward_fns`: user components, name -> callable `fn(tokens, lengths)` (see Rewards; default
      none). Names may not be those of the built-in components. A component returning the wrong
      shape or non-finite values raises a `ValueError` naming it at that step.
    - `eos_token`: a word of the vocabulary or a token id that ends the episode (default none;
      `env.eos_id` is its id).
    - `compute_score`: veRL's scoring function (see Rewards; default none).
    - `prompts`: where episodes' prompts come from (see Starting State; default: none, the
      explicit prompt or the empty sequence). A bad prompt or record is a `ValueError` naming its index.
    - `render_mode`: `None`, `"ansi"` (`render()` returns the decoded text), `"rgb_array"` (an RGB
      image of the decoded text, `textenv_gym.rendering.FRAME_SIZE`, for video recorders) or
      `"human"` (prints the text after every `reset` and `step`).

    Invalid arguments raise a `ValueError` that names the argument and what it accepts.

    ## Version History
    - v0: initial version.
    """

    metadata = {"render_modes": ["ansi", "human", "rgb_array"], "render_fps": 4}

    def __init__(
        self,
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
        self.render_mode = render_mode
        self.action_space = spaces.Discrete(self.config.vocab_size)
        self.observation_space = observation_space_for(self.config)
        self._sequence = SequenceBatch(self.config, 1)
        self._starter = EpisodeStarter(self._sequence)
        self._needs_reset = True

    @property
    def tokenizer(self):
        """Encodes text to token ids and decodes ids to text (:class:`textenv_gym.Tokenizer`)."""
        return self.config.tokenizer

    @property
    def pad_id(self) -> int:
        """The padding id of observations (``vocab_size``)."""
        return self.config.pad_id

    @property
    def eos_id(self) -> int | None:
        """The end token's id (None: episodes end at ``max_length`` only)."""
        return self.config.eos_id

    @property
    def sequence(self) -> list[int]:
        """The token ids of the current sequence."""
        return self._sequence.tokens[0, : self._sequence.lengths[0]].tolist()

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        if options and "prompt" in options:
            self._starter.set_options({0: options["prompt"]}, name="options['prompt']")
        self._starter.start([0], self.np_random, restart=seed is not None)
        self._needs_reset = False
        if self.render_mode == "human":
            self.render()
        info = self._info()
        info.update(self._starter.info(0))
        info.pop("group", None), info.pop("group_episode", None)  # one environment: no groups
        return self._sequence.tokens[0].copy(), info

    def step(self, action):
        if self._needs_reset:
            raise ValueError("step: the episode has ended (or never started); call reset() first")
        token = validate_action(action, self.config.vocab_size)
        outcome = self._sequence.append(np.array([token], dtype=np.int64))
        terminated = bool(outcome.terminated[0])
        self._needs_reset = terminated
        info = self._info()
        info.update(
            repeated=bool(outcome.repeated[0]),
            forbidden=bool(outcome.forbidden[0]),
            reward_components={name: float(value[0]) for name, value in outcome.components.items()},
        )
        if outcome.score_details.get(0):
            info["score_details"] = outcome.score_details[0]
        if self.render_mode == "human":
            self.render()
        return self._sequence.tokens[0].copy(), float(outcome.reward[0]), terminated, False, info

    def _info(self) -> dict[str, Any]:
        length = int(self._sequence.lengths[0])
        diversity = float(self._sequence.unique[0] / length) if length else 0.0
        return {"length": length, "diversity": diversity, "repeated": False, "forbidden": False}

    def render(self) -> str | np.ndarray | None:
        text = self.tokenizer.decode(self.sequence)
        if self.render_mode == "ansi":
            return text
        if self.render_mode == "rgb_array":
            return text_frame(text)
        if self.render_mode == "human":
            print(text)
        return None
