"""A Hugging Face causal language model as an SB3 actor-critic policy (``VerifiedPPO("HFCausalLMPolicy", ...)``)."""

from __future__ import annotations

import copy
import json
import os
from typing import Any

import torch as th
from gymnasium import spaces
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from stable_baselines3.common.type_aliases import Schedule
from torch import nn

from textenv_gym.hf_tokenizer import local_folder, require_transformers
from verl_sb3.hf.language_model import CausalLMActorCritic, causal_lm
from verl_sb3.policies.layers import TokenIdsExtractor
from verl_sb3.tokens import token_space_sizes

#: The critics of :class:`HFCausalLMPolicy` (see its docstring).
CRITICS = ("shared", "detached", "none")
#: The dtypes a model may be cast to (``model_dtype``).
MODEL_DTYPES = (None, "float32", "float64", "float16", "bfloat16")


class ZeroValue(nn.Module):
    """The value head of a policy without a critic: 0 for every state (for the critic-free estimators)."""

    def forward(self, latent: th.Tensor) -> th.Tensor:
        return latent.new_zeros(latent.shape[0], 1)


def load_causal_lm(
    model: Any = None, model_config: dict[str, Any] | None = None, dtype: str | None = None
) -> nn.Module:
    """The causal LM ``model`` names: itself (a ``PreTrainedModel``), a folder or a name in the local
    Hugging Face cache (``from_pretrained``, never downloading), or, with ``model_config``, a model
    of that configuration (``from_config``: its weights come from a saved policy)."""
    transformers = require_transformers("HFCausalLMPolicy")
    if model is None and model_config is None:
        raise ValueError(
            "policy_kwargs: HFCausalLMPolicy needs model= (a PreTrainedModel or the folder of one), e.g. "
            'policy_kwargs={"model": "path/to/model"}'
        )
    if model is not None and model_config is not None:
        raise ValueError("policy_kwargs: give model= or model_config=, not both")
    if model_config is not None:
        built = transformers.AutoModelForCausalLM.from_config(
            configuration_from_dict(model_config), trust_remote_code=False
        )
    elif isinstance(model, transformers.PreTrainedModel):
        built = copy.deepcopy(model)  # the caller's model stays as it is (no LoRA, its dropout), and unshared
    elif isinstance(model, (str, os.PathLike)):
        folder = local_folder(model, "policy_kwargs['model']")
        try:
            built = transformers.AutoModelForCausalLM.from_pretrained(
                folder, local_files_only=True, trust_remote_code=False
            )
        except (OSError, ValueError) as error:
            raise ValueError(f"policy_kwargs['model']: cannot load a causal LM from {folder!r}: {error}") from None
    elif hasattr(model, "get_base_model"):
        raise ValueError(
            "policy_kwargs['model']: give the base model and the adapters' settings in lora=, not a peft model"
        )
    else:
        raise ValueError(f"policy_kwargs['model']: expected a PreTrainedModel or a folder, got {type(model).__name__}")
    return built.to(getattr(th, dtype)) if dtype is not None else built


def disable_dropout(model: nn.Module) -> nn.Module:
    """Set every dropout of ``model`` to 0 (as TRL's ``disable_dropout_in_model``): PPO's ratio and
    the verification compare the logits of the rollout with those of training, which dropout would
    make differ. Returns ``model``."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return model


#: Attention implementations a saved configuration may ask for (no kernel from the Hub).
ATTENTION_IMPLEMENTATIONS = (None, "eager", "sdpa")


def configuration_from_dict(model_config: Any) -> Any:
    """A transformers configuration from a saved ``model_config`` dict: no custom code
    (``auto_map``), and PyTorch's own attention (``eager`` / ``sdpa``) only."""
    transformers = require_transformers("HFCausalLMPolicy")
    if not isinstance(model_config, dict) or not isinstance(model_config.get("model_type"), str):
        raise ValueError(f"model_config: expected a configuration dict with a 'model_type', got {model_config!r:.200}")
    _check_configuration(model_config, "model_config")
    try:
        return transformers.AutoConfig.for_model(**model_config)
    except (TypeError, ValueError, KeyError) as error:
        raise ValueError(f"model_config: not a transformers configuration: {error}") from None


def _check_configuration(config: dict[str, Any], where: str) -> None:
    """No custom code (``auto_map``), no attention but PyTorch's; nested configurations too."""
    if "auto_map" in config:
        raise ValueError(f"{where}: names custom code ('auto_map'), which is never run")
    for key in ("attn_implementation", "_attn_implementation", "_attn_implementation_internal"):
        if config.get(key) not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(f"{where}: {key} must be one of {ATTENTION_IMPLEMENTATIONS}, got {config[key]!r}")
    for key, value in config.items():
        if isinstance(value, dict):
            _check_configuration(value, f"{where}[{key!r}]")


def saved_weight_bytes(model_config: dict[str, Any], dtype: str | None) -> int:
    """The bytes of the weights of a model of ``model_config`` (built on the meta device: no memory)."""
    transformers = require_transformers("HFCausalLMPolicy")
    with th.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(
            configuration_from_dict(model_config), trust_remote_code=False
        )
    size = th.tensor([], dtype=getattr(th, dtype)).element_size() if dtype else None
    unique = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() * (size or p.element_size()) for p in unique)


def with_lora(model: nn.Module, lora: dict[str, Any] | None) -> nn.Module:
    """``model`` with LoRA adapters of peft's ``LoraConfig(**lora)`` (only they train), or itself for None."""
    if lora is None:
        return model
    if not isinstance(lora, dict):
        raise ValueError(f"lora: expected None or a dict of peft LoraConfig arguments, got {type(lora).__name__}")
    if lora.get("task_type", "CAUSAL_LM") != "CAUSAL_LM":
        raise ValueError(f"lora: task_type must be 'CAUSAL_LM' (the policy is a causal LM), got {lora['task_type']!r}")
    try:
        import peft
    except ImportError as error:
        raise ImportError('lora= needs peft, which is not installed; pip install "textenv-gym[hf]"') from error
    try:
        config = peft.LoraConfig(**{**lora, "task_type": "CAUSAL_LM"})
        return peft.get_peft_model(model, config)
    except (TypeError, ValueError) as error:
        raise ValueError(f"lora: not settings peft's LoraConfig and this model accept: {error}") from None


def configuration_dict(model: nn.Module) -> dict[str, Any]:
    """The model's configuration as plain JSON values (a save holds it instead of the model)."""
    return json.loads(causal_lm(model).config.to_json_string(use_diff=False))


class HFCausalLMPolicy(ActorCriticPolicy):
    """A Hugging Face causal LM (``AutoModelForCausalLM``) as the actor-critic of ``PPO`` / ``VerifiedPPO``.

    The actor is the model itself: the action distribution is its next-token distribution after
    ``[BOS, s_0, ..., s_{n-1}]`` (the observation's tokens, :mod:`verl_sb3.tokens`), with the
    padding masked out, over the first ``V`` logits (``V``: the action space, the tokenizer's
    vocabulary, e.g. ``TextGenEnv(tokenizer=...)``). The critic is a linear value head on the
    model's final hidden state at the last token (:class:`~verl_sb3.hf.language_model.CausalLMActorCritic`).
    Collecting a rollout reuses the previous step's key/value cache; training and verification
    encode each minibatch's distinct maximal sequences once.

    The model keeps its own weights and dtype (SB3's orthogonal initialisation is applied to the
    value head only), its dropout is set to 0 (as TRL does for RL), and SB3's ``device`` places it.
    Checkpoints (``model.save``) hold all weights (with LoRA: the base model's and the adapters')
    and the model's configuration as JSON, so loading needs neither the original folder nor
    pickled objects, and gives the same logits.

    The arguments up to ``optimizer_kwargs`` are SB3's ``ActorCriticPolicy``'s (``net_arch`` must
    be None or empty, ``use_sde`` False). The others:

    :param model: the causal LM: a ``PreTrainedModel``, or a folder (or a name in the local cache)
        that ``AutoModelForCausalLM.from_pretrained`` reads without downloading.
    :param model_config: instead of ``model``, a configuration dict (what a save keeps): a model of
        that configuration, with random weights until a saved state is loaded.
    :param model_dtype: a torch dtype name to cast the model to (default: keep its own).
    :param lora: None (default: the whole model trains) or peft ``LoraConfig`` arguments
        (``{"r": 8, "target_modules": ["c_attn"]}``): only the adapters and the value head train.
    :param critic: ``"shared"`` (default: the value loss trains the model too), ``"detached"`` (only
        the value head learns from it) or ``"none"`` (values are 0: for the critic-free estimators).
    :param bos_token_id: the id read before each sequence (default: the model's ``bos_token_id``,
        else its ``eos_token_id``, as GPT-2 does).
    :param kv_cache: reuse the key/value cache between rollout steps (default True).
    """

    def __init__(
        self,
        observation_space: spaces.Space,
        action_space: spaces.Space,
        lr_schedule: Schedule,
        net_arch: list[int] | dict[str, list[int]] | None = None,
        activation_fn: type[nn.Module] = nn.Tanh,
        ortho_init: bool = True,
        use_sde: bool = False,
        log_std_init: float = 0.0,
        full_std: bool = True,
        use_expln: bool = False,
        squash_output: bool = False,
        features_extractor_class: type[BaseFeaturesExtractor] = TokenIdsExtractor,
        features_extractor_kwargs: dict[str, Any] | None = None,
        share_features_extractor: bool = True,
        normalize_images: bool = True,
        optimizer_class: type[th.optim.Optimizer] = th.optim.Adam,
        optimizer_kwargs: dict[str, Any] | None = None,
        model: Any = None,
        model_config: dict[str, Any] | None = None,
        model_dtype: str | None = None,
        lora: dict[str, Any] | None = None,
        critic: str = "shared",
        bos_token_id: int | None = None,
        kv_cache: bool = True,
    ):
        vocab_size, max_length = token_space_sizes(observation_space, action_space)
        if use_sde:
            raise ValueError("use_sde=True is not supported: HFCausalLMPolicy has a discrete (token) action space")
        if net_arch:
            raise ValueError(
                f"net_arch: not used by HFCausalLMPolicy (the actor is the model); pass None, got {net_arch!r}"
            )
        if critic not in CRITICS:
            raise ValueError(f"critic: expected one of {', '.join(map(repr, CRITICS))}, got {critic!r}")
        if model_dtype not in MODEL_DTYPES:
            raise ValueError(f"model_dtype: expected None or one of {MODEL_DTYPES[1:]}, got {model_dtype!r}")
        if not isinstance(kv_cache, bool):
            raise ValueError(f"kv_cache: expected True or False, got {kv_cache!r}")
        if not share_features_extractor:
            raise ValueError("share_features_extractor: must be True (the actor and the critic read the same model)")
        language_model = load_causal_lm(model, model_config, model_dtype)
        self.vocab_size, self.max_length = vocab_size, max_length
        self.model_config = configuration_dict(language_model)
        self.model_dtype = str(next(language_model.parameters()).dtype).removeprefix("torch.")
        self.lora, self.critic, self.kv_cache = lora, critic, kv_cache
        self.bos_token_id = _bos_token_id(language_model, bos_token_id)
        _check_sizes(language_model, vocab_size, max_length)
        self._built_model = (
            disable_dropout(with_lora(language_model, lora)),
        )  # a tuple: nn.Module takes no module before its init
        super().__init__(
            observation_space,
            action_space,
            lr_schedule,
            [],
            activation_fn,
            ortho_init,
            use_sde,
            log_std_init,
            full_std,
            use_expln,
            squash_output,
            features_extractor_class,
            features_extractor_kwargs,
            share_features_extractor,
            normalize_images,
            optimizer_class,
            optimizer_kwargs,
        )

    def _build_mlp_extractor(self) -> None:
        self.mlp_extractor = CausalLMActorCritic(
            self._built_model[0], self.vocab_size, self.max_length, self.bos_token_id, self.critic, self.kv_cache
        )
        del self._built_model

    def _build(self, lr_schedule: Schedule) -> None:
        """The model as the actor (``action_net`` passes its logits on), a value head, the optimizer
        over the parameters that train; SB3's ``Linear(hidden, V)`` head and its initialisation of
        the whole network are not used."""
        self._build_mlp_extractor()
        self.action_net = nn.Identity()
        if self.critic == "none":
            self.value_net: nn.Module = ZeroValue()
        else:
            self.value_net = nn.Linear(self.mlp_extractor.hidden_size, 1)
            if self.ortho_init:
                nn.init.orthogonal_(self.value_net.weight, gain=1.0)
                nn.init.zeros_(self.value_net.bias)
        trainable = [parameter for parameter in self.parameters() if parameter.requires_grad]
        self.optimizer = self.optimizer_class(trainable, lr=lr_schedule(1), **self.optimizer_kwargs)

    @property
    def language_model(self) -> nn.Module:
        """The Hugging Face model (a peft model with ``lora``)."""
        return self.mlp_extractor.model

    def forward(self, obs: th.Tensor, deterministic: bool = False) -> tuple[th.Tensor, th.Tensor, th.Tensor]:
        """SB3's forward (actions, values, log-probabilities); without gradients in evaluation mode
        (a rollout step), with the key/value cache of the previous step."""
        features = self.extract_features(obs)
        if th.is_grad_enabled() or self.training:
            latent_pi, latent_vf = self.mlp_extractor(features)
        else:
            latent_pi, latent_vf = self.mlp_extractor.step(features)
        values = self.value_net(latent_vf)
        distribution = self._get_action_dist_from_latent(latent_pi)
        actions = distribution.get_actions(deterministic=deterministic)
        log_prob = distribution.log_prob(actions)
        return actions.reshape((-1, *self.action_space.shape)), values, log_prob

    def set_training_mode(self, mode: bool) -> None:
        """SB3's switch (collection: False, training: True); the rollout cache starts anew. The
        language model itself stays in evaluation mode (no dropout, no training-only noise such as
        attention dropout set in its configuration), so that rollout and training logits agree."""
        self.mlp_extractor.rollout_cache.clear()
        super().set_training_mode(mode)
        self.mlp_extractor.model.eval()

    def _get_constructor_parameters(self) -> dict[str, Any]:
        data = super()._get_constructor_parameters()
        data.pop("net_arch", None)
        data.update(
            share_features_extractor=self.share_features_extractor,
            critic=self.critic,
            kv_cache=self.kv_cache,
            **self._model_settings(),
        )
        return data

    def _model_settings(self) -> dict[str, Any]:
        """What rebuilds the model without the object or folder it was given."""
        return dict(
            model_config=self.model_config, model_dtype=self.model_dtype, lora=self.lora, bos_token_id=self.bos_token_id
        )

    @staticmethod
    def check_saved_settings(policy_kwargs: Any, weight_bytes: int) -> None:
        """A ValueError unless a file's ``policy_kwargs`` are what a save writes: a ``model_config``
        (no ``model`` to load from elsewhere) describing weights no larger than the file's
        ``weight_bytes`` of policy tensors (a configuration cannot ask for more memory than the file holds)."""
        if not isinstance(policy_kwargs, dict) or "model" in policy_kwargs:
            raise ValueError("policy_kwargs: names a model to load ('model'); a saved policy holds model_config")
        if policy_kwargs.get("model_dtype") not in MODEL_DTYPES:
            raise ValueError(f"policy_kwargs['model_dtype']: expected one of {MODEL_DTYPES}")
        needed = saved_weight_bytes(policy_kwargs.get("model_config"), policy_kwargs.get("model_dtype"))
        if needed > 1.05 * weight_bytes + (1 << 20):
            raise ValueError(
                f"policy_kwargs['model_config']: describes {needed:,} bytes of weights, but the file holds only "
                f"{weight_bytes:,} bytes of policy tensors"
            )

    def portable_kwargs(self, policy_kwargs: dict[str, Any] | None) -> dict[str, Any]:
        """``policy_kwargs`` as a save keeps them: the model's configuration instead of the model
        (no pickled object, no path needed to load), and the settings it was built with."""
        kwargs = {key: value for key, value in (policy_kwargs or {}).items() if key != "model"}
        return {**kwargs, **self._model_settings()}


def _bos_token_id(model: nn.Module, bos_token_id: int | None) -> int:
    config = model.config
    size = int(causal_lm(model).get_output_embeddings().out_features)
    value = bos_token_id
    if value is None:
        value = config.bos_token_id if config.bos_token_id is not None else config.eos_token_id
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    if value is None:
        raise ValueError("bos_token_id: the model has neither a bos_token_id nor an eos_token_id; give bos_token_id=")
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < size:
        raise ValueError(f"bos_token_id: expected a token id in [0, {size - 1}], got {value!r}")
    return value


def _check_sizes(model: nn.Module, vocab_size: int, max_length: int) -> None:
    logits = int(causal_lm(model).get_output_embeddings().out_features)
    if logits < vocab_size:
        raise ValueError(
            f"model: has {logits} logits, fewer than the action space's {vocab_size} tokens (use the model's own "
            "tokenizer for the environment: tokenizer=<the model's folder>)"
        )
    positions = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if positions is not None and positions < max_length + 1:
        raise ValueError(
            f"model: reads at most {positions} positions, fewer than BOS + the observations' {max_length} tokens"
        )
