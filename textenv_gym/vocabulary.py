"""The default vocabulary and the whitespace tokenizer of TextGen-v0."""

from __future__ import annotations

from collections.abc import Sequence

#: 50 human-readable words; token id ``i`` is ``DEFAULT_VOCABULARY[i]``.
DEFAULT_VOCABULARY: tuple[str, ...] = (
    "start",
    "sequence",
    "generation",
    "the",
    "a",
    "model",
    "learns",
    "to",
    "write",
    "new",
    "words",
    "with",
    "every",
    "step",
    "and",
    "reward",
    "grows",
    "when",
    "tokens",
    "differ",
    "policy",
    "value",
    "agent",
    "text",
    "language",
    "small",
    "large",
    "quick",
    "slow",
    "bright",
    "dark",
    "river",
    "mountain",
    "forest",
    "ocean",
    "city",
    "light",
    "sound",
    "story",
    "dream",
    "idea",
    "world",
    "time",
    "space",
    "code",
    "data",
    "signal",
    "pattern",
    "music",
    "end",
)


def default_vocabulary(vocab_size: int) -> tuple[str, ...]:
    """The first ``vocab_size`` default words, extended with ``tok50``, ``tok51``, ... if larger."""
    extra = tuple(f"tok{i}" for i in range(len(DEFAULT_VOCABULARY), vocab_size))
    return (DEFAULT_VOCABULARY + extra)[:vocab_size]


class Tokenizer:
    """Maps words to token ids and back, one token per whitespace-separated word.

    Encoding lower-cases the text and splits it on whitespace. An unknown word raises a
    ``ValueError`` listing the unknown words (``unknown="error"``, the default) or is dropped
    (``unknown="skip"``). Decoding joins the words with single spaces.

    :param vocabulary: the token strings; token id ``i`` is ``vocabulary[i]``.
    :param unknown: ``"error"`` or ``"skip"``: what ``encode`` does with a word not in the vocabulary.
    """

    def __init__(self, vocabulary: Sequence[str], unknown: str = "error") -> None:
        words = list(vocabulary)
        not_text = [word for word in words if not isinstance(word, str)]
        if not_text:
            raise ValueError(f"vocabulary: every token must be a str, got {not_text[:5]!r}")
        spaced = [word for word in words if not word or any(character.isspace() for character in word)]
        if spaced:
            raise ValueError(f"vocabulary: every token must be a non-empty word without whitespace, got {spaced[:5]!r}")
        lowered = [word.lower() for word in words]
        if len(set(lowered)) != len(lowered):
            raise ValueError("vocabulary: tokens must be distinct (compared case-insensitively)")
        if unknown not in ("error", "skip"):
            raise ValueError(f"unknown: expected 'error' or 'skip', got {unknown!r}")
        self.vocabulary = tuple(words)
        self.unknown = unknown
        self._ids = {word: index for index, word in enumerate(lowered)}

    def __len__(self) -> int:
        return len(self.vocabulary)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``."""
        if not isinstance(text, str):
            raise TypeError(f"text: expected a str, got {type(text).__name__}")
        words = text.lower().split()
        unknown_words = [word for word in words if word not in self._ids]
        if unknown_words and self.unknown == "error":
            raise ValueError(
                f"text: unknown words {unknown_words!r}; the vocabulary has {len(self)} tokens "
                "(pass unknown='skip' to drop unknown words)"
            )
        return [self._ids[word] for word in words if word in self._ids]

    def decode(self, token_ids: Sequence[int]) -> str:
        """The words of ``token_ids`` joined by spaces."""
        words = []
        for token_id in token_ids:
            index = int(token_id)
            if not 0 <= index < len(self):
                raise ValueError(f"token_ids: id {index} out of range [0, {len(self) - 1}]")
            words.append(self.vocabulary[index])
        return " ".join(words)
