"""A Hugging Face tokenizer as TextGen's tokenizer: its vocabulary is the action space.

``TextGenEnv(tokenizer=...)`` (and every other TextGen form) takes a tokenizer folder on disk,
a model name already in the local Hugging Face cache, or a ``PreTrainedTokenizerBase``. Nothing
is downloaded and no server is asked (:func:`local_folder`). Needs the optional extra ``hf``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

#: How to install what this module needs.
HF_EXTRA = 'the optional extra "hf": pip install "textenv-gym[hf]" (or pip install -e ".[hf]" in a checkout)'


def require_transformers(what: str) -> Any:
    """The ``transformers`` module, or an ImportError saying that ``what`` needs the ``hf`` extra."""
    try:
        import transformers
    except ImportError as error:
        raise ImportError(f"{what} needs transformers, which is not installed; install {HF_EXTRA}") from error
    return transformers


def local_folder(source: str | os.PathLike, argument: str) -> str:
    """The folder of ``source``: itself, or a model name's snapshot in the local Hugging Face cache.

    Nothing is downloaded and no server is asked: a name not in the cache is a ValueError.
    """
    path = os.fspath(source)
    if os.path.isdir(path):
        return path
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(path, local_files_only=True)
    except (OSError, ValueError):
        raise ValueError(
            f"{argument}: {path!r} is neither a folder nor a model in the local Hugging Face cache; nothing is "
            "downloaded at run time: download it beforehand (e.g. `hf download NAME`) or pass its folder"
        ) from None


def load_tokenizer(tokenizer: Any, argument: str = "tokenizer") -> Any:
    """A ``PreTrainedTokenizerBase`` from itself, a local folder or a name in the local cache (no download)."""
    transformers = require_transformers(f"{argument}=")
    if isinstance(tokenizer, transformers.PreTrainedTokenizerBase):
        return tokenizer
    if not isinstance(tokenizer, (str, os.PathLike)):
        raise ValueError(
            f"{argument}: expected a tokenizer folder, a model name in the local Hugging Face cache or a "
            f"PreTrainedTokenizerBase, got {type(tokenizer).__name__}"
        )
    folder = local_folder(tokenizer, argument)
    try:
        return transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError) as error:
        raise ValueError(f"{argument}: cannot load a tokenizer from {folder!r}: {error}") from None


class HFTokenizer:
    """TextGen's tokenizer interface (``vocabulary``, ``encode``, ``decode``) on a Hugging Face tokenizer.

    Token id ``i`` is the tokenizer's id ``i``; ``vocabulary`` holds its token strings
    (``convert_ids_to_tokens``) for its ``len(tokenizer)`` ids, added tokens included. ``encode``
    is the tokenizer's own (no special tokens added, no lower-casing), ``decode`` its own decode.

    :param tokenizer: see :func:`load_tokenizer`.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.source = tokenizer
        self.hf = load_tokenizer(tokenizer)
        size = len(self.hf)
        self.vocabulary = tuple(str(token) for token in self.hf.convert_ids_to_tokens(list(range(size))))
        self.eos_id: int | None = self.hf.eos_token_id

    def __len__(self) -> int:
        return len(self.vocabulary)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (the tokenizer's own encoding, no special tokens added)."""
        if not isinstance(text, str):
            raise TypeError(f"text: expected a str, got {type(text).__name__}")
        return list(self.hf(text, add_special_tokens=False)["input_ids"])

    def decode(self, token_ids: Sequence[int]) -> str:
        """The tokenizer's decoding of ``token_ids`` (special tokens kept)."""
        ids = [int(token_id) for token_id in token_ids]
        for index in ids:
            if not 0 <= index < len(self):
                raise ValueError(f"token_ids: id {index} out of range [0, {len(self) - 1}]")
        return self.hf.decode(ids)

    def token_id(self, token: str) -> int | None:
        """The id of ``token`` when it is exactly one token of the vocabulary (or encodes to one), else None."""
        index = self.hf.convert_tokens_to_ids(token)
        if isinstance(index, int) and 0 <= index < len(self) and self.vocabulary[index] == token:
            return index
        ids = self.encode(token)
        if len(ids) != 1 or (ids[0] == self.hf.unk_token_id and token != self.hf.unk_token):
            return None  # several tokens, or an unknown one
        return ids[0]
