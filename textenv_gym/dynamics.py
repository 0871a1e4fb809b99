"""The dynamics of TextGen-v0, written once for any number of sequences.

:class:`TextGenConfig` validates the environment's arguments, :class:`SequenceBatch` holds N token
sequences in numpy arrays and appends one token to each, and :func:`reward_components` is the
reward: named components (built-in and user-given), each weighted. The scalar environment is a
batch of one; the batched environments use the same code.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from textenv_gym.hf_tokenizer import HFTokenizer
from textenv_gym.prompts import NO_PROMPT, PromptRecord, PromptSource
from textenv_gym.scoring import ComputeScore, require_compute_score, score_answer
from textenv_gym.vocabulary import Tokenizer, default_vocabulary

DEFAULT_VOCAB_SIZE = 50
DEFAULT_MAX_LENGTH = 20
#: Upper bounds, checked before anything is allocated: a vocabulary of 2**20 tokens is four times
#: the largest tokenizers' in use; a batch holds at most 2**27 token ids (1 GiB as int64).
MAX_VOCAB_SIZE = 2**20
MAX_LENGTH = 2**16
MAX_BATCH_TOKENS = 2**27
#: The names of the built-in reward components, in the order they are summed.
BUILTIN_COMPONENTS = ("diversity", "repetition", "forbidden")
#: The component of ``compute_score``, after the built-in ones.
SCORE_COMPONENT = "score"
#: A user reward component: ``fn(tokens, lengths) -> array-like of shape (N,)`` (see ``TextGenEnv``).
RewardFunction = Callable[[np.ndarray, np.ndarray], Any]


def _require_int(name: str, value: Any, minimum: int, maximum: int | None = None) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name}: expected an integer <= {maximum:,}, got {value}")
    return int(value)


def _require_finite(name: str, value: Any) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name}: expected a finite number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite number, got {value}")
    return float(value)


def _token_ids(name: str, values: Any, vocab_size: int) -> np.ndarray:
    """``values`` as an int64 array of token ids in ``[0, vocab_size)``, or a ValueError naming ``name``."""
    array = np.asarray(values)
    if array.size == 0:
        return np.zeros(0, dtype=np.int64)
    if array.ndim != 1:
        raise ValueError(f"{name}: expected a flat list of token ids, got shape {array.shape}")
    if array.dtype.kind not in "iu":
        raise ValueError(f"{name}: expected integer token ids, got {values!r}")
    out_of_range = array[(array < 0) | (array >= vocab_size)]
    if out_of_range.size:
        raise ValueError(f"{name}: token ids must lie in [0, {vocab_size - 1}], got {out_of_range.tolist()}")
    return array.astype(np.int64)


def _reward_fns(reward_fns: Any, taken: Sequence[str]) -> dict[str, RewardFunction] | None:
    """``reward_fns`` as a dict of user components (None when there are none), or a ValueError."""
    if reward_fns is None:
        return None
    if not isinstance(reward_fns, Mapping):
        raise ValueError(f"reward_fns: expected a mapping of component name -> callable, got {reward_fns!r}")
    for name, fn in reward_fns.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"reward_fns: component names must be non-empty strings, got {name!r}")
        if name in taken:
            raise ValueError(
                f"reward_fns[{name!r}]: clashes with a built-in component; built-in components are "
                f"{list(taken)} (weigh them with reward_weights instead)"
            )
        if not callable(fn):
            raise ValueError(
                f"reward_fns[{name!r}]: expected a callable fn(tokens, lengths) -> array of shape (N,), got {fn!r}"
            )
    return dict(reward_fns) or None


def _reward_weights(reward_weights: Any, known: Sequence[str]) -> dict[str, float] | None:
    """``reward_weights`` as a dict of finite floats over ``known`` names (None when empty), or a ValueError."""
    if reward_weights is None:
        return None
    if not isinstance(reward_weights, Mapping):
        raise ValueError(f"reward_weights: expected a mapping of component name -> weight, got {reward_weights!r}")
    unknown = [name for name in reward_weights if name not in known]
    if unknown:
        raise ValueError(f"reward_weights: unknown components {unknown}; known components are {list(known)}")
    return {
        name: _require_finite(f"reward_weights[{name!r}]", weight) for name, weight in reward_weights.items()
    } or None


@dataclass(frozen=True)
class TextGenConfig:
    """The validated arguments of TextGen-v0 (see :class:`textenv_gym.TextGenEnv` for their meaning)."""

    vocab_size: int | None = None
    max_length: int = DEFAULT_MAX_LENGTH
    repetition_penalty: float = -0.5
    repetition_window: int = 3
    forbidden_tokens: Sequence[int] = ()
    forbidden_penalty: float = -1.0
    vocabulary: Sequence[str] | None = None
    reward_weights: Mapping[str, float] | None = field(default=None, hash=False)
    reward_fns: Mapping[str, RewardFunction] | None = field(default=None, hash=False)
    eos_token: str | int | None = None
    compute_score: ComputeScore | None = field(default=None, hash=False)
    prompts: Any = field(default=None, hash=False, repr=False)
    #: given: None, or a Hugging Face tokenizer (:mod:`textenv_gym.hf_tokenizer`); after
    #: validation: the tokenizer in use (:class:`Tokenizer` or :class:`~textenv_gym.hf_tokenizer.HFTokenizer`)
    tokenizer: Any = field(default=None, hash=False, repr=False, compare=False)
    tokenizer_source: Any = field(init=False, repr=False, compare=False)
    forbidden_mask: np.ndarray = field(init=False, repr=False, compare=False)
    eos_id: int | None = field(init=False, repr=False, compare=False)
    prompt_source: PromptSource | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen)
        vocab_size = self.vocab_size
        given = self.tokenizer
        if isinstance(given, HFTokenizer) and self.vocabulary == given.vocabulary:
            set_("vocabulary", None)  # a copy of a configuration (dataclasses.replace): the tokenizer in use
        given = None if isinstance(given, Tokenizer) else given  # the copy of a configuration without one
        set_("tokenizer_source", given.source if isinstance(given, HFTokenizer) else given)
        if given is not None:
            tokenizer = _hf_tokenizer(given, self.vocabulary, vocab_size)
            set_("tokenizer", tokenizer)
            vocab_size = len(tokenizer)
        elif self.vocabulary is not None:
            if isinstance(self.vocabulary, str):
                raise ValueError("vocabulary: expected a list of token strings, got one str")
            if len(self.vocabulary) < 2:
                raise ValueError(f"vocabulary: expected at least 2 tokens, got {len(self.vocabulary)}")
            if vocab_size is not None and vocab_size != len(self.vocabulary):
                raise ValueError(
                    f"vocab_size: got {vocab_size} but vocabulary has {len(self.vocabulary)} tokens; "
                    "pass one of them or make them agree"
                )
            vocab_size = len(self.vocabulary)
        vocab_size = _require_int(
            "vocab_size", DEFAULT_VOCAB_SIZE if vocab_size is None else vocab_size, 2, MAX_VOCAB_SIZE
        )
        set_("vocab_size", vocab_size)
        set_("max_length", _require_int("max_length", self.max_length, 1, MAX_LENGTH))
        set_("repetition_window", _require_int("repetition_window", self.repetition_window, 2))
        set_("repetition_penalty", _require_finite("repetition_penalty", self.repetition_penalty))
        set_("forbidden_penalty", _require_finite("forbidden_penalty", self.forbidden_penalty))
        if isinstance(self.forbidden_tokens, (str, bytes)) or not isinstance(
            self.forbidden_tokens, (Sequence, np.ndarray)
        ):
            raise ValueError(f"forbidden_tokens: expected a list of token ids, got {self.forbidden_tokens!r}")
        forbidden = _token_ids("forbidden_tokens", list(self.forbidden_tokens), vocab_size)
        mask = np.zeros(vocab_size, dtype=bool)
        mask[forbidden] = True
        if mask.all():
            raise ValueError(f"forbidden_tokens: every one of the {vocab_size} tokens is forbidden; allow at least one")
        mask.setflags(write=False)
        set_("forbidden_tokens", tuple(sorted(set(forbidden.tolist()))))
        set_("forbidden_mask", mask)
        if self.tokenizer_source is None:
            vocabulary = default_vocabulary(vocab_size) if self.vocabulary is None else self.vocabulary
            set_("tokenizer", Tokenizer(vocabulary))
        set_("vocabulary", self.tokenizer.vocabulary)
        set_("eos_id", self._eos_id())
        set_("compute_score", require_compute_score(self.compute_score))
        set_("reward_fns", _reward_fns(self.reward_fns, self._builtin_names))
        set_("reward_weights", _reward_weights(self.reward_weights, self.component_names))
        encode, decode = self.encode_prompt, self.tokenizer.decode
        set_("prompt_source", None if self.prompts is None else PromptSource(self.prompts, encode, decode))

    def _eos_id(self) -> int | None:
        token = self.eos_token
        if token is None:
            return getattr(self.tokenizer, "eos_id", None)  # a Hugging Face tokenizer's end of sequence
        if isinstance(token, str) and self.tokenizer_source is not None:
            index = self.tokenizer.token_id(token)
            if index is None:
                raise ValueError(f"eos_token: expected one token of the tokenizer or a token id, got {token!r}")
            return index
        if isinstance(token, str):
            words = token.split()
            if len(words) != 1 or words[0].lower() not in (word.lower() for word in self.tokenizer.vocabulary):
                raise ValueError(f"eos_token: expected one word of the vocabulary or a token id, got {token!r}")
            return self.tokenizer.encode(token)[0]
        return _require_int("eos_token", token, 0, self.vocab_size - 1)

    @property
    def _builtin_names(self) -> tuple[str, ...]:
        return BUILTIN_COMPONENTS + ((SCORE_COMPONENT,) if self.compute_score is not None else ())

    @property
    def component_names(self) -> tuple[str, ...]:
        """The names of the reward components: the built-in ones (``score`` with a ``compute_score``),
        then those of ``reward_fns``."""
        return self._builtin_names + tuple(self.reward_fns or ())

    @property
    def custom_reward(self) -> bool:
        """Whether the reward differs from the default sum of the built-in components."""
        return self.reward_fns is not None or self.reward_weights is not None or self.compute_score is not None

    @property
    def pad_id(self) -> int:
        """The padding id of observations: ``vocab_size`` (one past the last token id)."""
        return self.vocab_size

    def as_kwargs(self) -> dict[str, Any]:
        """The arguments that rebuild this configuration (for ``gym.make`` or a saved model)."""
        return {
            "vocab_size": self.vocab_size,
            "max_length": self.max_length,
            "repetition_penalty": self.repetition_penalty,
            "repetition_window": self.repetition_window,
            "forbidden_tokens": list(self.forbidden_tokens),
            "forbidden_penalty": self.forbidden_penalty,
            "vocabulary": None if self.tokenizer_source is not None else list(self.vocabulary),
            "reward_weights": None if self.reward_weights is None else dict(self.reward_weights),
            "reward_fns": None if self.reward_fns is None else dict(self.reward_fns),
            "eos_token": self.eos_token,
            "compute_score": self.compute_score,
            "prompts": self.prompts,
            "tokenizer": self.tokenizer_source,
        }

    def encode_prompt(self, prompt: Any) -> np.ndarray:
        """A prompt (text, token ids or None) as token ids, checked to leave room for one action."""
        if prompt is None:
            return np.zeros(0, dtype=np.int64)
        ids = (
            self.tokenizer.encode(prompt) if isinstance(prompt, str) else _token_ids("prompt", prompt, self.vocab_size)
        )
        if len(ids) > self.max_length - 1:
            raise ValueError(
                f"prompt: has {len(ids)} tokens but at most max_length - 1 = {self.max_length - 1} "
                "are allowed (the episode needs room for at least one action)"
            )
        return np.asarray(ids, dtype=np.int64)


def _hf_tokenizer(tokenizer: Any, vocabulary: Any, vocab_size: int | None) -> Any:
    """The Hugging Face tokenizer in use, checked against ``vocabulary`` and ``vocab_size``."""
    if vocabulary is not None:
        raise ValueError("vocabulary: not used with tokenizer= (the tokenizer's vocabulary is the action space); "
                         "pass one of them")  # fmt: skip
    hf = tokenizer if isinstance(tokenizer, HFTokenizer) else HFTokenizer(tokenizer)
    if vocab_size is not None and vocab_size != len(hf):
        raise ValueError(f"vocab_size: got {vocab_size} but the tokenizer has {len(hf)} tokens; leave it out")
    if len(hf) < 2:
        raise ValueError(f"tokenizer: expected at least 2 tokens, got {len(hf)}")
    return hf


def reward_components(
    diversity: np.ndarray,
    repeated: np.ndarray,
    forbidden: np.ndarray,
    config: TextGenConfig,
    tokens: np.ndarray | None = None,
    lengths: np.ndarray | None = None,
    score: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """The reward of each new sequence, by component, each already multiplied by its weight
    (``config.reward_weights``, 1.0 when not given); the reward is their sum.

    - ``diversity``: unique tokens / total tokens of the whole sequence (prompt included);
    - ``repetition``: ``repetition_penalty`` when the last ``repetition_window`` tokens are identical;
    - ``forbidden``: ``forbidden_penalty`` when the appended token is forbidden;
    - ``score`` (with ``config.compute_score``): ``score``, the answers' scores on the steps that
      end their episodes, 0 on the others;
    - one per user component ``name`` of ``config.reward_fns``: ``fn(tokens, lengths)``, called once
      for the whole batch with the new sequences (``tokens``, int64 ``(N, max_length)`` padded with
      ``pad_id``) and their ``lengths`` (needed only when there are user components).
    """
    components = {
        "diversity": diversity,
        "repetition": np.where(repeated, config.repetition_penalty, 0.0),
        "forbidden": np.where(forbidden, config.forbidden_penalty, 0.0),
    }
    if config.compute_score is not None:
        components[SCORE_COMPONENT] = np.zeros(len(diversity)) if score is None else score
    for name, fn in (config.reward_fns or {}).items():
        if tokens is None or lengths is None:
            raise ValueError(f"reward_components: the user component {name!r} needs the sequences' tokens and lengths")
        components[name] = _user_component(name, fn, tokens, lengths)
    for name, weight in (config.reward_weights or {}).items():
        with np.errstate(over="ignore"):
            components[name] = weight * components[name]
        if not np.all(np.isfinite(components[name])):
            raise ValueError(f"reward_weights[{name!r}]: weight {weight} times the component's values is not finite")
    return components


def _user_component(name: str, fn: RewardFunction, tokens: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The values of the user component ``name`` for the sequences, as float64 of shape (N,), or a ValueError."""
    expected = (len(lengths),)
    if not len(lengths):  # nothing was stepped (every environment autoreset): no call
        return np.zeros(0)
    try:
        returned = fn(tokens, lengths)
    except Exception as error:
        raise ValueError(f"reward_fns[{name!r}]: raised {type(error).__name__}: {error}") from error
    if np.iscomplexobj(np.asarray(returned)):
        raise ValueError(f"reward_fns[{name!r}]: returned complex values, expected real numbers of shape {expected}")
    try:
        values = np.asarray(returned, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"reward_fns[{name!r}]: returned {returned!r}, expected numbers of shape {expected}") from None
    if values.shape != expected:
        raise ValueError(f"reward_fns[{name!r}]: returned shape {values.shape}, expected {expected}")
    if not np.all(np.isfinite(values)):
        bad = values[~np.isfinite(values)].tolist()
        raise ValueError(f"reward_fns[{name!r}]: returned non-finite values {bad}, expected finite numbers")
    return values


def _require_representable(reward: np.ndarray, dtype: type) -> None:
    """A ValueError unless every reward is finite once cast to ``dtype``."""
    with np.errstate(over="ignore"):
        cast = np.asarray(reward, dtype=dtype)
    if len(reward) and not np.all(np.isfinite(cast)):
        bad = reward[~np.isfinite(cast)].tolist()
        raise ValueError(
            f"reward: the components sum to {bad}, not a finite {np.dtype(dtype).name}; "
            "check the reward_weights and the reward_fns' values"
        )


@dataclass
class StepOutcome:
    """What appending one token did to each of the sequences it was appended to."""

    reward: np.ndarray  # float64
    components: dict[str, np.ndarray]
    diversity: np.ndarray  # float64
    repeated: np.ndarray  # bool: the last repetition_window tokens are identical
    forbidden: np.ndarray  # bool: the appended token is forbidden
    terminated: np.ndarray  # bool: the sequence reached max_length or ends with the end token
    score_details: dict[int, dict[str, Any]] = field(default_factory=dict)  # by position: compute_score's extras


class SequenceBatch:
    """N token sequences of at most ``max_length`` tokens, in numpy arrays.

    ``tokens[i, :lengths[i]]`` is sequence ``i``; the rest of the row is ``pad_id``. Alongside,
    ``unique`` counts its distinct tokens and ``run_length`` the length of its trailing run of
    identical tokens, so that appending a token costs O(max_length) per sequence, without Python
    loops over sequences. Each sequence has its own prompt (:class:`PromptRecord`): where it
    starts from at a reset, and what its answer (the tokens after it) is scored against.
    """

    def __init__(self, config: TextGenConfig, num_sequences: int) -> None:
        self.config = config
        self.num_sequences = _require_int("num_envs", num_sequences, 1, max(1, MAX_BATCH_TOKENS // config.max_length))
        shape = (self.num_sequences, config.max_length)
        self.tokens = np.full(shape, config.pad_id, dtype=np.int64)
        self.lengths = np.zeros(self.num_sequences, dtype=np.int64)
        self.unique = np.zeros(self.num_sequences, dtype=np.int64)
        self.run_length = np.zeros(self.num_sequences, dtype=np.int64)
        self.prompt_lengths = np.zeros(self.num_sequences, dtype=np.int64)
        self._prompt_tokens = np.full(shape, config.pad_id, dtype=np.int64)
        self._prompt_length = np.zeros(self.num_sequences, dtype=np.int64)
        self._prompt_unique = np.zeros(self.num_sequences, dtype=np.int64)
        self._prompt_run = np.zeros(self.num_sequences, dtype=np.int64)
        self.records: list[PromptRecord] = [NO_PROMPT] * self.num_sequences
        self.set_prompt(None)

    def set_prompt(self, prompt: Any) -> None:
        """Make ``prompt`` (text, token ids or None) the start of every sequence reset from now on."""
        ids = self.config.encode_prompt(prompt)
        record = PromptRecord(ids, self.config.tokenizer.decode(ids))
        for row in range(self.num_sequences):
            self.set_row_prompt(row, record)

    def set_row_prompt(self, row: int, record: PromptRecord) -> None:
        """Make ``record`` the prompt sequence ``row`` starts from at its next reset."""
        ids = record.ids
        if len(ids) > self.config.max_length - 1:
            raise ValueError(f"prompt: has {len(ids)} tokens but at most max_length - 1 = {self.config.max_length - 1}")
        run = 0
        while run < len(ids) and ids[len(ids) - 1 - run] == ids[-1]:
            run += 1
        self._prompt_tokens[row] = self.config.pad_id
        self._prompt_tokens[row, : len(ids)] = ids
        self._prompt_length[row] = len(ids)
        self._prompt_unique[row] = len(np.unique(ids))
        self._prompt_run[row] = run
        self.records[row] = record

    _ROW_STATE = ("tokens", "lengths", "unique", "run_length", "prompt_lengths", "_prompt_tokens", "_prompt_length",
                  "_prompt_unique", "_prompt_run")  # fmt: skip

    def snapshot(self, rows: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray], list[PromptRecord]]:
        """A copy of the sequences ``rows`` (indices) and their prompts, for :meth:`restore`."""
        return rows, {name: getattr(self, name)[rows] for name in self._ROW_STATE}, [self.records[r] for r in rows]

    def restore(self, snapshot: tuple[np.ndarray, dict[str, np.ndarray], list[PromptRecord]]) -> None:
        rows, arrays, records = snapshot
        for name, values in arrays.items():
            getattr(self, name)[rows] = values
        for row, record in zip(rows, records):
            self.records[row] = record

    def reset(self, rows: np.ndarray | slice = slice(None)) -> None:
        """Start the selected sequences (a boolean mask, indices or a slice) from their prompts."""
        self.tokens[rows] = self._prompt_tokens[rows]
        self.lengths[rows] = self.prompt_lengths[rows] = self._prompt_length[rows]
        self.unique[rows] = self._prompt_unique[rows]
        self.run_length[rows] = self._prompt_run[rows]

    def append(
        self, actions: np.ndarray, rows: np.ndarray | None = None, reward_dtype: type = np.float64
    ) -> StepOutcome:
        """Append ``actions[j]`` to sequence ``rows[j]`` (all sequences when ``rows`` is None).

        Atomic: the new sequences and their reward are computed first, and stored only when the
        reward is known and finite in ``reward_dtype`` (the type the caller hands it on in); a
        component that fails raises a ValueError naming it, and the sequences stay as they were.
        The caller validates the actions and never appends to a full sequence.
        """
        rows = np.arange(self.num_sequences) if rows is None else rows
        tokens, lengths = self.tokens[rows], self.lengths[rows]  # copies (fancy indexing)
        last = np.where(lengths > 0, tokens[np.arange(len(rows)), np.maximum(lengths - 1, 0)], self.config.pad_id)
        is_new = ~np.any(tokens == actions[:, None], axis=1)  # padding never equals a token id
        tokens[np.arange(len(rows)), lengths] = actions
        lengths = lengths + 1
        unique = self.unique[rows] + is_new
        run = np.where(last == actions, self.run_length[rows] + 1, 1)

        diversity = unique / lengths
        repeated = run >= self.config.repetition_window
        forbidden = self.config.forbidden_mask[actions]
        terminated = lengths >= self.config.max_length
        if self.config.eos_id is not None:
            terminated |= actions == self.config.eos_id
        score, details = self._scores(rows, tokens, lengths, terminated)
        # copies for user components, which then cannot alter the sequences
        user = (tokens.copy(), lengths.copy()) if self.config.reward_fns else (None, None)
        components = reward_components(diversity, repeated, forbidden, self.config, *user, score=score)
        with np.errstate(over="ignore"):  # an overflow is reported next
            reward = sum(components.values())
        _require_representable(reward, reward_dtype)
        self.tokens[rows], self.lengths[rows], self.unique[rows], self.run_length[rows] = tokens, lengths, unique, run
        return StepOutcome(reward, components, diversity, repeated, forbidden, terminated, details)

    def answer_ids(self, row: int, tokens: np.ndarray | None = None, length: int | None = None) -> np.ndarray:
        """The tokens sequence ``row`` generated after its prompt, a final end token left out."""
        tokens = self.tokens[row] if tokens is None else tokens
        length = int(self.lengths[row]) if length is None else length
        answer = tokens[int(self.prompt_lengths[row]) : length]
        if len(answer) and self.config.eos_id is not None and answer[-1] == self.config.eos_id:
            answer = answer[:-1]
        return answer

    def _scores(
        self, rows: np.ndarray, tokens: np.ndarray, lengths: np.ndarray, terminated: np.ndarray
    ) -> tuple[np.ndarray | None, dict[int, dict[str, Any]]]:
        """``compute_score`` of each answer that ends here (by position in ``rows``), and its extras."""
        fn = self.config.compute_score
        if fn is None:
            return None, {}
        score, details = np.zeros(len(rows)), {}
        for position in np.flatnonzero(terminated):
            row = int(rows[position])
            prompt = self.records[row]
            answer = self.config.tokenizer.decode(self.answer_ids(row, tokens[position], int(lengths[position])))
            score[position], details[int(position)] = score_answer(
                fn, prompt.data_source, answer, prompt.ground_truth, prompt.extra_info
            )
        return score, details

    def texts(self) -> tuple[str, ...]:
        """The decoded text of every sequence."""
        decode = self.config.tokenizer.decode
        return tuple(decode(row[:length]) for row, length in zip(self.tokens, self.lengths))


def validate_action(action: Any, vocab_size: int) -> int:
    """A single action as an int token id, or a ValueError that says what is wrong with it."""
    if isinstance(action, np.ndarray):
        if action.shape != ():
            raise ValueError(f"action: expected one token id, got an array of shape {action.shape}")
        action = action[()]
    if isinstance(action, (bool, np.bool_)) or not isinstance(action, (int, float, np.integer, np.floating)):
        raise ValueError(f"action: expected an integer token id, got {type(action).__name__} {action!r}")
    if isinstance(action, (float, np.floating)) and not (math.isfinite(action) and float(action).is_integer()):
        raise ValueError(f"action: expected an integral token id, got the non-integral float {action!r}")
    if not 0 <= action < vocab_size:
        raise ValueError(f"action: token id must lie in [0, {vocab_size - 1}], got {action!r}")
    return int(action)


def validate_actions(actions: Any, num_envs: int, vocab_size: int) -> np.ndarray:
    """A batch of actions as an int64 array of shape ``(num_envs,)``, or a ValueError."""
    array = np.asarray(actions)
    if array.shape != (num_envs,):
        raise ValueError(f"actions: expected shape ({num_envs},), one token id per environment, got {array.shape}")
    if array.dtype.kind == "f":
        integral = np.isfinite(array) & (array == np.round(array))
        if not integral.all():
            raise ValueError(
                f"actions: expected integral token ids, got non-integral floats {array[~integral].tolist()}"
            )
    elif array.dtype.kind not in "iu":
        raise ValueError(f"actions: expected integer token ids, got dtype {array.dtype}")
    bad = (array < 0) | (array >= vocab_size)
    if bad.any():
        raise ValueError(f"actions: token ids must lie in [0, {vocab_size - 1}], got {array[bad].tolist()}")
    return array.astype(np.int64)
