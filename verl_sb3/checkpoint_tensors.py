"""The torch entries of a checkpoint not trusted: what SB3's loader does with them, checked.

SB3's ``load`` reads each ``NAME.pth`` entry with ``weights_only`` (tensors only) but then uses
the names: it loads the state dict into the model's attribute ``NAME`` (a dotted path), and for
each key of ``pytorch_variables.pth`` it sets ``<key>.data`` on the model, along any attribute
path (``policy.__class__...`` reaches torch's classes for the whole process). An optimizer state
is loaded as it is, and torch's fused kernels write as many elements as a parameter has into its
state's tensors, whatever their size. So, for a file not trusted:

- an entry's name is a dotted path of public attribute names, and its tensors are plain dense
  ones within their storage (not sparse, quantized, nested or meta: torch trusts their indices);
- ``pytorch_variables.pth`` names only the tensors the algorithm saves there (SAC's
  ``log_ent_coef``...), and holds tensors;
- after loading, each optimizer keeps the implementation flags it was built with (``fused``,
  ``foreach``, ``capturable``, ``differentiable``) and its state tensors are dense, contiguous
  tensors of their parameters' shapes; so are those of a saved model state a pending judgement
  would restore, whose other attributes are only those the model rolls back;
- the records the model goes on from are sane: the verification report's counters are counts,
  the reference-KL controller's coefficient is finite and >= 0, its mode and estimator known.
"""

from __future__ import annotations

import io
import math
import re
import zipfile

import torch as th
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.save_util import recursive_getattr

from verl_sb3.bounded_unpickler import objects_in
from verl_sb3.kl_control import KL_ESTIMATORS, AdaptiveKLController, FixedKLController
from verl_sb3.safe_unpickle import RestrictedUnpickler
from verl_sb3.verification.report import VerificationReport
from verl_sb3.verification.state import ModelState, irregular_tensor, optimizer_state_fault, rollback_attribute_names

__all__ = ["check_model_states", "check_optimizer_states", "check_torch_entries", "tensor_variables"]

#: Tensors that SB3 and sb3-contrib algorithms save in ``pytorch_variables.pth`` (SAC's, TQC's, CrossQ's).
KNOWN_TENSOR_VARIABLES = frozenset({"log_ent_coef", "ent_coef_tensor"})
_VARIABLE_ENTRIES = ("pytorch_variables.pth", "tensors.pth")  # SB3 reads both names
_ATTRIBUTE_PATH = re.compile(r"[A-Za-z][A-Za-z0-9_]*(\.[A-Za-z][A-Za-z0-9_]*)*")


def tensor_variables(cls: type[BaseAlgorithm]) -> frozenset[str]:
    """The names ``cls`` may save in ``pytorch_variables.pth``: its ``_get_torch_save_params``'s
    (when a bare instance can tell) and :data:`KNOWN_TENSOR_VARIABLES`."""
    try:
        _, names = cls._get_torch_save_params(object.__new__(cls))
    except Exception:  # the list depends on the model's settings: SAC's
        names = []
    return KNOWN_TENSOR_VARIABLES | frozenset(names)


def _refusal(error: type[Exception], name: str, entry: str, why: str) -> Exception:
    return error(
        f"checkpoint {name!r}: entry {entry!r} {why}, which a saved model never holds; load it with trusted=True "
        "only if you trust the file"
    )


def check_torch_entries(archive: zipfile.ZipFile, cls: type[BaseAlgorithm], name: str, error: type[Exception]) -> None:
    """Refuse (with ``error``) a ``.pth`` entry whose name or ``pytorch_variables`` SB3's loader would misuse."""
    for entry in archive.namelist():
        if not entry.endswith(".pth"):
            continue
        content = th.load(io.BytesIO(archive.read(entry)), weights_only=True)
        irregular = irregular_tensor(content)
        if irregular:
            raise _refusal(error, name, entry, f"holds {irregular}")
        if entry in _VARIABLE_ENTRIES:
            variables = content
            allowed = tensor_variables(cls)
            if not isinstance(variables, dict):
                raise _refusal(error, name, entry, f"holds a {type(variables).__name__} (a dict of tensors expected)")
            unknown = sorted(str(key) for key in variables if key not in allowed)
            if unknown:
                raise _refusal(error, name, entry, f"names {unknown} (only {sorted(allowed)} may be there)")
            if not all(value is None or isinstance(value, th.Tensor) for value in variables.values()):
                raise _refusal(error, name, entry, "holds other values than tensors")
        elif not _ATTRIBUTE_PATH.fullmatch(entry[: -len(".pth")]):
            raise _refusal(error, name, entry, "is not named after a public attribute of the model")


def check_optimizer_states(model: BaseAlgorithm, archive: zipfile.ZipFile, name: str, error: type[Exception]) -> None:
    """Refuse a loaded model whose optimizers (from the file's ``.pth`` entries) changed their
    implementation flags or hold other state tensors than dense ones of their parameters' shapes
    (:func:`~verl_sb3.verification.state.optimizer_state_fault`)."""
    for entry in archive.namelist():
        if not entry.endswith(".pth") or entry in _VARIABLE_ENTRIES:
            continue
        optimizer = recursive_getattr(model, entry[: -len(".pth")])
        if isinstance(optimizer, th.optim.Optimizer):
            fault = optimizer_state_fault(optimizer, optimizer.state_dict())
            if fault:
                raise _refusal(error, name, entry, f"holds {fault}")


def check_model_states(model: BaseAlgorithm, name: str, error: type[Exception]) -> None:
    """Refuse a loaded model holding a saved :class:`~verl_sb3.verification.state.ModelState`
    (a pending judgement's state before the update) that would not fit it when restored, a
    verification report whose counters are not counts, or reference-KL settings out of range."""
    fault = _reference_kl_fault(model)
    if fault:
        raise _refusal(error, name, "data", f"holds {fault}")
    buildable = RestrictedUnpickler.buildable()
    for obj in objects_in(vars(model), lambda candidate: type(candidate) in buildable):
        if isinstance(obj, VerificationReport):
            counters = {k: v for k, v in vars(obj).items() if k.startswith("n_")}
            if not isinstance(obj.log, list) or not all(type(v) is int and v >= 0 for v in counters.values()):
                raise _refusal(error, name, "data", f"holds a verification report with counters {counters}")
        if isinstance(obj, ModelState):
            unknown = sorted(map(str, set(obj.attributes) - set(rollback_attribute_names(type(model)))))
            fault = f"attributes {unknown} that {type(model).__name__} does not roll back" if unknown else None
            fault = fault or obj.fault(model)
            if fault:
                raise _refusal(error, name, "data", f"holds a model state to restore with {fault}")


def _reference_kl_fault(model: BaseAlgorithm) -> str | None:
    """What is wrong with the reference-KL settings a file gave the model (a negative, infinite
    or array coefficient turns the penalty into a bonus or NaN, an unknown mode skips it)."""
    from verl_sb3.reference import REF_KL_MODES  # the reference module imports the algorithms

    mode, estimator = getattr(model, "ref_kl_mode", "reward"), getattr(model, "ref_kl_estimator", "k1")
    if mode not in REF_KL_MODES or estimator not in KL_ESTIMATORS:
        return f"a reference-KL mode {mode!r} and estimator {estimator!r}"
    controller = getattr(model, "kl_ctrl", None)
    if controller is None:
        return None
    if type(controller) not in (FixedKLController, AdaptiveKLController):
        return f"a reference-KL controller of type {type(controller).__name__}"
    numbers = [controller.value] + ([controller.target] if isinstance(controller, AdaptiveKLController) else [])
    if not all(type(x) is float and math.isfinite(x) and x >= 0 for x in numbers):
        return f"a reference-KL controller {controller!r}"
    if isinstance(controller, AdaptiveKLController) and not (
        controller.target > 0 and type(controller.horizon) is int and controller.horizon >= 1
    ):
        return f"a reference-KL controller {controller!r}"
    return None
