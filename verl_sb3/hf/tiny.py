"""Tiny Hugging Face models and tokenizers built offline, for tests, benchmarks and examples.

:func:`word_tokenizer` makes a word-level tokenizer with ``tokenizers`` (one token per
whitespace-separated word, the case kept); :func:`tiny_causal_lm` a randomly initialised GPT-2
or Llama of a few layers; :func:`save_tiny_model` saves both with ``save_pretrained`` to a folder
that ``from_pretrained`` (and ``policy_kwargs={"model": folder}``) reads. Nothing is downloaded.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from textenv_gym.hf_tokenizer import require_transformers
from textenv_gym.tasks import TASKS, task_kwargs
from textenv_gym.tasks.reverse import END
from textenv_gym.vocabulary import DEFAULT_VOCABULARY

#: The special tokens of :func:`word_tokenizer`, in this order, first in the vocabulary.
SPECIAL_TOKENS = ("<pad>", "<unk>", "<bos>", "<eos>")


def task_words() -> list[str]:
    """The words of TextGen-v0's default vocabulary and of the registered tasks' vocabularies."""
    words = list(DEFAULT_VOCABULARY)
    for env_id in TASKS:
        words += task_kwargs(env_id)["vocabulary"]
    return list(dict.fromkeys(word for word in words if word != END))  # the tokenizer's own <eos> ends answers


def word_tokenizer(words: Iterable[str] | None = None, extra_size: int = 0) -> Any:
    """A ``PreTrainedTokenizerFast``: :data:`SPECIAL_TOKENS`, then ``words`` (default :func:`task_words`),
    then ``extra_size`` filler words ``w0, w1, ...`` (to make a large vocabulary)."""
    transformers = require_transformers("word_tokenizer")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocabulary = list(dict.fromkeys([*SPECIAL_TOKENS, *(task_words() if words is None else words)]))
    vocabulary += [f"w{i}" for i in range(extra_size)]
    model = models.WordLevel({word: index for index, word in enumerate(vocabulary)}, unk_token="<unk>")
    tokenizer = Tokenizer(model)
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>", eos_token="<eos>"
    )


def tiny_causal_lm(
    tokenizer: Any,
    architecture: str = "gpt2",
    width: int = 32,
    layers: int = 2,
    max_positions: int = 256,
    seed: int = 0,
) -> Any:
    """A randomly initialised ``GPT2LMHeadModel`` or ``LlamaForCausalLM`` for ``tokenizer``'s vocabulary."""
    transformers = require_transformers("tiny_causal_lm")
    import torch as th

    ids = {
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    if architecture == "gpt2":
        config = transformers.GPT2Config(n_embd=width, n_layer=layers, n_head=2, n_positions=max_positions, **ids)
        model_class = transformers.GPT2LMHeadModel
    elif architecture == "llama":
        config = transformers.LlamaConfig(
            hidden_size=width,
            intermediate_size=2 * width,
            num_hidden_layers=layers,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=max_positions,
            **ids,
        )
        model_class = transformers.LlamaForCausalLM
    else:
        raise ValueError(f"architecture: expected 'gpt2' or 'llama', got {architecture!r}")
    with th.random.fork_rng():
        th.manual_seed(seed)
        return model_class(config).eval()


def save_tiny_model(folder: str | os.PathLike, architecture: str = "gpt2", extra_size: int = 0, **kwargs: Any) -> str:
    """Save a :func:`word_tokenizer` and a :func:`tiny_causal_lm` for it to ``folder``; return the folder."""
    tokenizer = word_tokenizer(extra_size=extra_size)
    model = tiny_causal_lm(tokenizer, architecture, **kwargs)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return os.fspath(folder)
