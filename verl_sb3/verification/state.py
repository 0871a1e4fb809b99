"""The model's state that an update changes: captured before it, restored to undo it.

One type serves every way back: the rollback of a rejected update, the backtracking line search
(by interpolating the policy), the undoing of an update judged on the next rollout, and the
repair of parameters found non-finite between updates.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch as th
from stable_baselines3.common.base_class import BaseAlgorithm

from verl_sb3.bounded_unpickler import objects_in
from verl_sb3.verification.checks import count_non_finite, non_finite_parameter_names


def clone_state(value: Any) -> Any:
    """A copy of a (nested) state dict: tensors cloned, containers rebuilt, the rest shared."""
    if isinstance(value, th.Tensor):
        return value.clone()
    if isinstance(value, dict):
        return {key: clone_state(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(clone_state(item) for item in value)
    return value


def policy_state(model: BaseAlgorithm) -> dict[str, th.Tensor]:
    """A copy of the policy's parameters and buffers."""
    return {name: tensor.clone() for name, tensor in model.policy.state_dict().items()}


def rollback_attribute_names(cls: type) -> tuple[str, ...]:
    """The ``_rollback_attributes`` of every class of ``cls``'s ladder, parents first, without repeats."""
    names = (name for klass in reversed(cls.__mro__) for name in vars(klass).get("_rollback_attributes", ()))
    return tuple(dict.fromkeys(names))


#: Implementation flags an optimizer is built with: a state may not change them (torch's fused
#: kernels write a parameter's worth of elements into each state tensor, whatever its size).
IMPLEMENTATION_FLAGS = ("fused", "foreach", "capturable", "differentiable")
_SCALAR_STATES = frozenset({"step", "mu_product"})  # the others have their parameter's shape


def irregular_tensor(value: Any) -> str | None:
    """What is wrong with the first tensor in ``value`` (nested dicts, lists, tuples) that is not
    a plain dense tensor within its storage (sparse, quantized, nested, meta: torch's kernels
    trust their indices and sizes); None when every tensor is plain."""
    for obj in objects_in(value, lambda _: False):
        if not isinstance(obj, th.Tensor):
            continue
        if obj.layout != th.strided or obj.is_quantized or obj.is_nested or obj.is_meta:
            return (
                f"a {obj.layout} tensor{' (quantized)' if obj.is_quantized else ''}{' (meta)' if obj.is_meta else ''}"
            )
        if obj.numel():
            extent = obj.storage_offset() + sum((n - 1) * s for n, s in zip(obj.shape, obj.stride())) + 1
            if extent * obj.element_size() > obj.untyped_storage().nbytes():
                return f"a tensor of shape {tuple(obj.shape)} reaching past its storage"
    return None


def optimizer_state_fault(optimizer: th.optim.Optimizer, state: Any) -> str | None:
    """What makes ``state`` (an optimizer state dict) unfit for ``optimizer``: other groups or
    implementation flags than it was built with, or state tensors that are not dense, contiguous
    tensors of their parameters' shapes (scalars for ``step``); None when it fits."""
    irregular = irregular_tensor(state)
    if irregular:
        return f"{irregular} in an optimizer state"
    groups, tensors = (state.get("param_groups"), state.get("state")) if isinstance(state, dict) else (None, None)
    if not (isinstance(groups, list) and isinstance(tensors, dict)):
        return "an optimizer state that is not a state dict"
    if len(state["param_groups"]) != len(optimizer.param_groups):
        return f"{len(state['param_groups'])} optimizer parameter groups for {len(optimizer.param_groups)}"
    parameters: dict[Any, th.Tensor] = {}
    for saved, group in zip(state["param_groups"], optimizer.param_groups):
        if not isinstance(saved, dict) or len(saved.get("params", ())) != len(group["params"]):
            return "optimizer parameter groups of other sizes than the model's"
        for flag in IMPLEMENTATION_FLAGS:
            if flag in saved and saved[flag] != optimizer.defaults.get(flag):  # left out: torch's default
                return f"the optimizer's {flag}={saved[flag]!r} (it was built with {optimizer.defaults.get(flag)!r})"
        parameters.update(zip(saved["params"], group["params"]))
    for key, values in state["state"].items():
        if key not in parameters or not isinstance(values, dict):
            return "an optimizer state for something else than the model's parameters"
        for name, value in values.items():
            fault = _state_tensor_fault(name, value, parameters[key])
            if fault:
                return fault
    return None


def _policy_state_fault(current: dict[str, th.Tensor], saved: Any) -> str | None:
    irregular = irregular_tensor(saved)
    if irregular:
        return f"{irregular} in a policy state"
    if not isinstance(saved, dict) or set(saved) != set(current):
        names = sorted(map(str, saved)) if isinstance(saved, dict) else type(saved).__name__
        return f"a policy state of other entries than the policy's ({names})"
    for name, tensor in current.items():
        value = saved[name]
        if not (isinstance(value, th.Tensor) and value.shape == tensor.shape and value.dtype == tensor.dtype
                and value.layout == th.strided and value.is_contiguous()):  # fmt: skip
            expected = f"a contiguous {tensor.dtype} tensor of shape {tuple(tensor.shape)}"
            return f"a policy tensor {name!r} that is not {expected}"
    return None


def _state_tensor_fault(name: str, value: Any, parameter: th.Tensor) -> str | None:
    if value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)):
        return None
    if not isinstance(value, th.Tensor):
        return f"an optimizer state {name!r} of type {type(value).__name__}"
    expected = "one element" if name in _SCALAR_STATES else f"shape {tuple(parameter.shape)}"
    fits = value.numel() == 1 if name in _SCALAR_STATES else value.shape == parameter.shape
    dense = value.layout == th.strided and value.is_contiguous() and not value.is_quantized
    within = value.untyped_storage().nbytes() >= (value.storage_offset() + value.numel()) * value.element_size()
    if not (fits and dense and within):
        return (
            f"an optimizer state {name!r} of shape {tuple(value.shape)} and strides {value.stride()} "
            f"(a contiguous tensor of {expected} expected)"
        )
    return None


@dataclass
class ModelState:
    """The policy's and the optimizer's state, SB3's update counter and the controllers an update
    moves (the model's ``_rollback_attributes``), with a label saying when they were captured."""

    policy: dict[str, th.Tensor]
    optimizer: dict[str, Any]
    n_updates: int
    attributes: dict[str, Any] = field(default_factory=dict)
    label: str = ""

    @classmethod
    def capture(cls, model: BaseAlgorithm, label: str = "", attributes: Iterable[str] = ()) -> ModelState:
        return cls(
            policy=policy_state(model),
            optimizer=clone_state(model.policy.optimizer.state_dict()),
            n_updates=model._n_updates,
            attributes={name: copy.deepcopy(getattr(model, name)) for name in attributes},
            label=label,
        )

    def fault(self, model: BaseAlgorithm) -> str | None:
        """What makes this state unfit for ``model`` (a state loaded from a file: another model's
        optimizer state); None when it fits."""
        fault = _policy_state_fault(model.policy.state_dict(), self.policy)
        if fault:
            return fault
        if not isinstance(self.n_updates, int) or isinstance(self.n_updates, bool):
            return f"an update count {self.n_updates!r}"
        return optimizer_state_fault(model.policy.optimizer, self.optimizer)

    def restore(self, model: BaseAlgorithm) -> None:
        """Put everything back, bit for bit. The state stays usable: the optimizer gets copies of
        its tensors (it may keep the given ones and update them in place).

        :raises ValueError: when the state does not fit the model (:meth:`fault`).
        """
        fault = self.fault(model)
        if fault:
            raise ValueError(f"cannot restore the model state {self.label!r}: it holds {fault}")
        model.policy.load_state_dict(self.policy)
        model.policy.optimizer.load_state_dict(clone_state(self.optimizer))
        model._n_updates = self.n_updates
        for name, value in self.attributes.items():
            setattr(model, name, copy.deepcopy(value))

    def interpolate(self, model: BaseAlgorithm, target: dict[str, th.Tensor], step_size: float) -> None:
        """Set the policy's floating-point tensors to ``self + step_size * (target - self)``."""
        with th.no_grad():
            for name, tensor in model.policy.state_dict().items():
                if tensor.is_floating_point():
                    tensor.copy_(self.policy[name] + step_size * (target[name] - self.policy[name]))


def restore_if_non_finite(model: BaseAlgorithm, last_verified: ModelState | None, where: str) -> str | None:
    """Restore ``last_verified`` when ``model``'s policy parameters are found non-finite ``where``;
    the message saying so, or None when they are finite.

    :raises RuntimeError: naming the parameters, when there is no verified state to go back to.
    """
    parameters = [p.detach() for p in model.policy.parameters()]
    bad = count_non_finite(parameters)
    if not bad:
        return None
    message = (
        f"finite_parameters: {bad} non-finite parameters ({', '.join(non_finite_parameter_names(model.policy))}) "
        f"found {where}, at timestep {model.num_timesteps}"
    )
    if last_verified is None:
        raise RuntimeError(f"{message}; no verified state to restore")
    last_verified.restore(model)
    return f"{message}; restored the last verified state ({last_verified.label})"
