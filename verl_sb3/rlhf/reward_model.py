"""A reward model over token sequences: the SLM's encoder with a scalar head, saved without pickle.

:class:`SequenceRewardModel` reads ``[BOS, tokens]`` with an embedding and an LSTM of the same
shapes as :class:`~verl_sb3.policies.SLMLstmPolicy`'s (it can start from a policy's weights,
:meth:`SequenceRewardModel.from_policy`) and maps the state after the last token to one score.
It takes the environment's reward-component arguments ``(tokens, lengths)``: int64 ids padded
with ``pad_id = vocab_size``.

A saved reward model is a folder in Hugging Face's layout: ``config.json`` (its settings, the
environment it was fitted on and the fit's figures) and ``model.safetensors`` (the tensors). Loading
reads no pickle and runs no code from the folder: the settings are checked, the file's tensor
names and shapes must be exactly those the settings describe, and only then is the model built.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch as th
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from textenv_gym.reward_models import TorchRewardModel
from verl_sb3._validation import is_integer, require_int

FORMAT = "verl-sb3-reward-model"
VERSION = 1
CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"
#: the architecture name of a user module, whose weights load into a module the caller builds.
USER_MODULE = "user"
_ARCHITECTURE_SETTINGS = ("vocab_size", "embedding_dim", "hidden_size", "num_layers")
_MAX_PARAMETERS = 1 << 31  # a settings file describing more is refused before anything is built


class SequenceRewardModel(nn.Module):
    """Embedding, LSTM, and a linear head on the state after the last token: one score per sequence.

    :param vocab_size: the environment's token count ``V`` (ids ``0..V-1``; ``V`` pads, ``V + 1`` is BOS).
    """

    def __init__(self, vocab_size: int, embedding_dim: int = 64, hidden_size: int = 128, num_layers: int = 1) -> None:
        super().__init__()
        self.vocab_size = require_int("vocab_size", vocab_size, 1)
        self.embedding_dim = require_int("embedding_dim", embedding_dim, 1)
        self.hidden_size = require_int("hidden_size", hidden_size, 1)
        self.num_layers = require_int("num_layers", num_layers, 1)
        self.pad_id, self.bos_id = vocab_size, vocab_size + 1
        self.embedding = nn.Embedding(vocab_size + 2, embedding_dim, padding_idx=self.pad_id)
        self.lstm = nn.LSTM(embedding_dim, hidden_size, num_layers=num_layers, batch_first=True)
        self.head = nn.Linear(hidden_size, 1)

    def settings(self) -> dict[str, int]:
        """The constructor arguments, as saved in ``config.json``."""
        return {name: getattr(self, name) for name in _ARCHITECTURE_SETTINGS}

    @classmethod
    def from_policy(cls, policy: nn.Module) -> SequenceRewardModel:
        """A reward model whose embedding and LSTM start as ``policy``'s (an ``SLMLstmPolicy``), the head new."""
        lstm = getattr(policy, "lstm_actor", None)
        if not isinstance(lstm, nn.LSTM) or not isinstance(getattr(policy, "embedding", None), nn.Embedding):
            raise ValueError(
                f"policy: expected an SLMLstmPolicy (embedding and lstm_actor), got {type(policy).__name__}"
            )
        model = cls(policy.vocab_size, lstm.input_size, lstm.hidden_size, lstm.num_layers)
        model.embedding.load_state_dict(policy.embedding.state_dict())
        model.lstm.load_state_dict(lstm.state_dict())
        return model.to(next(policy.parameters()).device)

    def forward(self, tokens: th.Tensor, lengths: th.Tensor) -> th.Tensor:
        ids, lengths = tokens.long(), lengths.long()
        if ids.dim() != 2 or lengths.shape != ids.shape[:1]:
            raise ValueError(
                f"tokens, lengths: expected shapes (N, L) and (N,), got {tuple(ids.shape)} and {tuple(lengths.shape)}"
            )
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) > self.vocab_size):
            raise ValueError(
                f"tokens: ids must be in [0, {self.vocab_size}] (the reward model's {self.vocab_size} tokens and "
                f"the padding id); got [{int(ids.min())}, {int(ids.max())}]: was it fitted on another vocabulary?"
            )
        if lengths.numel() and (int(lengths.min()) < 0 or int(lengths.max()) > ids.shape[1]):
            raise ValueError(f"lengths: expected values in [0, {ids.shape[1]}], got {lengths.tolist()}")
        bos = th.full((len(ids), 1), self.bos_id, dtype=th.long, device=ids.device)
        output, _ = self.lstm(self.embedding(th.cat([bos, ids], dim=1)))
        last = output[th.arange(len(ids), device=ids.device), lengths]  # after BOS and `length` tokens
        return self.head(last).squeeze(-1)


def save_reward_model(
    module: nn.Module,
    path: str | os.PathLike,
    environment: dict[str, Any],
    fit: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Save ``module`` (a :class:`SequenceRewardModel` or any module) into the folder ``path``.

    The folder is written whole next to ``path`` and then renamed into place: an interrupted save
    leaves what was there before. An existing folder is replaced only with ``overwrite`` and only
    if it holds a saved reward model.

    :param environment: the JSON settings of the environment the model scores (``vocab_size``,
        ``max_length``, ``vocabulary``, ``eos_id``: see :func:`environment_settings`).
    :param fit: the fit's figures, kept in ``config.json``.
    """
    path = Path(path)
    if path.exists() or path.is_symlink():
        if not overwrite:
            raise ValueError(f"{path}: already exists; pass overwrite=True (--overwrite) to replace it")
        if not path.is_dir() or path.is_symlink() or not _is_reward_model(path):
            raise ValueError(f"{path}: exists and is not a saved reward model; it is left as it is")
    architecture = "SequenceRewardModel" if isinstance(module, SequenceRewardModel) else USER_MODULE
    config = {
        "format": FORMAT,
        "version": VERSION,
        "architecture": architecture,
        "module_class": type(module).__name__,
        "settings": module.settings() if isinstance(module, SequenceRewardModel) else {},
        "environment": environment,
        "fit": fit or {},
    }
    text = json.dumps(config, indent=2, allow_nan=False)  # a NaN in the figures would not be JSON
    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in module.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        save_file(tensors, str(staging / WEIGHTS_FILE), metadata={"format": FORMAT})
        (staging / CONFIG_FILE).write_text(text + "\n", encoding="utf-8")
        if path.exists():
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.old."))
            path.replace(old / path.name)
            staging.replace(path)
            shutil.rmtree(old)
        else:
            staging.replace(path)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return path


def environment_settings(config: Any) -> dict[str, Any]:
    """What a reward model records of the environment (a ``TextGenConfig``) it scores: enough to check
    it is used on the same tokens and to encode text as the environment does."""
    vocabulary = None if config.tokenizer_source is not None else list(config.vocabulary)
    source = config.tokenizer_source if isinstance(config.tokenizer_source, str) else None
    return {
        "vocab_size": config.vocab_size,
        "max_length": config.max_length,
        "vocabulary": vocabulary,
        "tokenizer": source,
        "eos_id": config.eos_id,
    }


def read_reward_model(path: str | os.PathLike, module: nn.Module | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """The module saved in the folder ``path`` and its ``config.json``.

    :param module: for a user module (``architecture: "user"``), the module to load the weights into.
    """
    path = Path(path)
    config = _checked_config(path)
    names = _tensor_shapes(path / WEIGHTS_FILE)
    if config["architecture"] == USER_MODULE:
        if not isinstance(module, nn.Module):
            raise ValueError(
                f"{path}: holds the weights of a user module ({config['module_class']}); pass module= an instance "
                "of it to load them into"
            )
    else:
        if module is not None:
            raise ValueError(f"module: {path} holds a SequenceRewardModel, which is built from its settings")
        settings = config["settings"]
        with th.device("meta"):  # the shapes the settings describe, before any memory is spent
            module = SequenceRewardModel(**settings)
    expected = {name: tuple(tensor.shape) for name, tensor in module.state_dict().items()}
    if names != expected:
        raise ValueError(
            f"{path / WEIGHTS_FILE}: its tensors {names} are not those of {type(module).__name__}: {expected}"
        )
    if config["architecture"] != USER_MODULE:  # its weights come from the file: no random initialisation
        module = module.to_empty(device="cpu")  # (which would draw from torch's generator, and change a run's)
    with safe_open(str(path / WEIGHTS_FILE), framework="pt") as weights:
        state = {name: weights.get_tensor(name) for name in names}
    module.load_state_dict(state, strict=True)
    return module, config


def load_reward_model(
    path: str | os.PathLike, module: nn.Module | None = None, device: str = "cpu", at_end: bool = True
) -> TorchRewardModel:
    """The reward model saved in ``path`` as a reward component for any TextGen form (``reward_fns``).

    :param at_end: score a sequence only on the step that ends its episode (full, or its end token),
        0 on the others, as RLHF rewards a whole completion (False: score every prefix).
    """
    module, config = read_reward_model(path, module)
    environment = config["environment"]
    component = TorchRewardModel(module, device=device, at_end=at_end, eos_id=environment.get("eos_id"))
    component.config = config
    return component


def reward_model_config(path: str | os.PathLike) -> dict[str, Any]:
    """The checked ``config.json`` of the reward model saved in ``path`` (its weights are not read)."""
    return _checked_config(Path(path))


def _is_reward_model(path: Path) -> bool:
    try:
        _checked_config(path)
    except ValueError:
        return False
    return True


def _checked_config(path: Path) -> dict[str, Any]:
    file = path / CONFIG_FILE
    if not path.is_dir():
        raise ValueError(f"{path}: no such reward-model folder")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{path}: has no {CONFIG_FILE}; is it a saved reward model?") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{file}: not JSON ({error})") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ValueError(f'{file}: not a verl-sb3 reward model (expected "format": {FORMAT!r})')
    if config.get("version") != VERSION:
        raise ValueError(f"{file}: version {config.get('version')!r}, this verl-sb3 reads version {VERSION}")
    if config.get("architecture") not in ("SequenceRewardModel", USER_MODULE):
        raise ValueError(f"{file}: unknown architecture {config.get('architecture')!r}")
    for name in ("settings", "environment", "fit"):
        if not isinstance(config.get(name), dict):
            raise ValueError(f"{file}: {name!r} must be a JSON object")
    if config["architecture"] == "SequenceRewardModel":
        settings = config["settings"]
        if sorted(settings) != sorted(_ARCHITECTURE_SETTINGS) or not all(
            is_integer(value) and 1 <= value <= 1 << 24 for value in settings.values()
        ):
            raise ValueError(f"{file}: settings must give {list(_ARCHITECTURE_SETTINGS)} as integers in [1, 2**24]")
        size = (settings["vocab_size"] + 2) * settings["embedding_dim"] + 4 * settings["hidden_size"] * (
            settings["embedding_dim"] + settings["hidden_size"]
        ) * settings["num_layers"]
        if size > _MAX_PARAMETERS:
            raise ValueError(f"{file}: settings describe {size:,} parameters, more than {_MAX_PARAMETERS:,}")
    _check_environment(config["environment"], file)
    return config


def _check_environment(environment: dict[str, Any], file: Path) -> None:
    vocab_size = environment.get("vocab_size")
    if not is_integer(vocab_size) or vocab_size < 1:
        raise ValueError(f"{file}: environment.vocab_size must be an integer >= 1, got {vocab_size!r}")
    if not is_integer(environment.get("max_length")) or environment["max_length"] < 1:
        raise ValueError(f"{file}: environment.max_length must be an integer >= 1")
    eos_id = environment.get("eos_id")
    if eos_id is not None and (not is_integer(eos_id) or not 0 <= eos_id < vocab_size):
        raise ValueError(f"{file}: environment.eos_id must be null or a token id below {vocab_size}, got {eos_id!r}")
    vocabulary = environment.get("vocabulary")
    if vocabulary is not None and (
        not isinstance(vocabulary, list)
        or len(vocabulary) != vocab_size
        or not all(isinstance(w, str) for w in vocabulary)
    ):
        raise ValueError(f"{file}: environment.vocabulary must be null or {vocab_size} strings")


def _tensor_shapes(file: Path) -> dict[str, tuple[int, ...]]:
    if not file.is_file():
        raise ValueError(f"{file}: missing; a saved reward model has {CONFIG_FILE} and {WEIGHTS_FILE}")
    try:
        with safe_open(str(file), framework="pt") as weights:
            return {name: tuple(weights.get_slice(name).get_shape()) for name in weights.keys()}  # noqa: SIM118
    except Exception as error:  # safetensors raises its own error types for a damaged header
        raise ValueError(f"{file}: not a safetensors file ({error})") from None
