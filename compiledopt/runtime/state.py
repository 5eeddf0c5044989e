"""The checks that keep a FrozenOptimizer consistent: a loaded state against the rule's schema, a
step's results against the state they replace, the step count, and the learning rate.

Each check raises ``ValueError`` naming the parameter and the state key, before anything is
written, so a refused ``load_state_dict`` or ``step`` leaves the optimizer as it was.
"""

import math
import numbers
from typing import Any, Collection, Dict, Mapping, NamedTuple, Sequence, Tuple

import torch
from torch import Tensor

from compiledopt._validation import check_flag, check_real

__all__ = [
    "STEP",
    "Expected",
    "check_batch",
    "check_current",
    "check_loaded",
    "check_lr",
    "check_rates",
    "check_result",
    "check_steps",
    "group_entry",
    "lr_of",
    "separate_lrs",
    "skip_count",
    "step_count",
    "written_mark",
]

#: The key of the step count in every parameter's state.
STEP = "step"
#: The largest step count accepted (an int64 that ``step + 1`` cannot overflow).
MAX_STEP = 2**62


class Expected(NamedTuple):
    """The shape and storage dtype the rule gives one state tensor of one parameter."""

    shape: Tuple[int, ...]
    dtype: torch.dtype


def step_count(value: Any, where: str) -> Tensor:
    """``value`` as a step count: a 0-d int64 tensor on the CPU.

    Accepted: a 0-d integer tensor, a plain int (older checkpoints), or a 0-d floating-point
    tensor or float holding an integer; all ``>= 0``. Refused (``ValueError`` naming ``where``):
    bools, fractions, negative, non-finite and multi-element values.
    """
    if isinstance(value, Tensor) and value.dtype == torch.int64 and value.dim() == 0:
        number = value.item()
    elif isinstance(value, Tensor):
        if value.dim() != 0 or value.dtype == torch.bool or value.is_complex():
            raise ValueError(
                f"{where} must be a 0-d integer tensor or an int, got a tensor of shape "
                f"{tuple(value.shape)} and dtype {value.dtype}"
            )
        number = value.item()
    elif isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{where} must be an integer >= 0, got {value!r}")
    else:
        number = int(value) if isinstance(value, numbers.Integral) else float(value)
    if isinstance(number, float) or not isinstance(number, numbers.Integral):
        number = float(number)
        if not (math.isfinite(number) and number.is_integer()):
            raise ValueError(f"{where} must be an integer >= 0, got {number!r}")
    number = int(number)
    if not 0 <= number <= MAX_STEP:
        raise ValueError(f"{where} must be an integer in [0, 2**62], got {number}")
    return torch.tensor(number, dtype=torch.int64)


def skip_count(value: Any, where: str) -> int:
    """``value`` as a param group's count of skipped steps: an int ``>= 0`` (not a bool), or
    ``ValueError`` naming ``where`` and the value."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"Invalid skipped_steps in {where}: {value!r} (expected an int >= 0)")
    return int(value)


def _keys(keys: Collection[Any]) -> str:
    """``keys`` listed in a message, sorted: ``['a', 'b']``."""
    return "[" + ", ".join(sorted(repr(k) for k in keys)) + "]"


def _check_keys(state: Mapping[Any, Any], expected: Mapping[str, Expected], where: str) -> None:
    wanted = {STEP, *expected}
    if set(state) != wanted:
        missing, extra = wanted - set(state), set(state) - wanted
        raise ValueError(
            f"{where}: the state does not fit this optimizer's rule (keys {_keys(state)}; "
            f"missing {_keys(missing)}, unexpected {_keys(extra)}; the rule keeps "
            f"{[STEP, *expected]}): is it another optimizer's state?"
        )


def _check_tensor(value: Any, key: str, shape: Tuple[int, ...], where: str) -> Tensor:
    if not isinstance(value, Tensor):
        raise ValueError(f"{where}: state {key!r} must be a tensor, got {type(value).__name__}")
    if tuple(value.shape) != tuple(shape):
        raise ValueError(
            f"{where}: state {key!r} has shape {tuple(value.shape)}, but the rule keeps a state "
            f"of shape {tuple(shape)} for this parameter (was the parameter resized after its "
            "first step?)"
        )
    return value


def check_loaded(
    saved: Any,
    expected: Mapping[str, Expected],
    where: str,
    state_dtype: torch.dtype,
    device: torch.device,
) -> Dict[str, Tensor]:
    """A saved state of one parameter, checked against the rule's schema ``expected`` (every
    state key but ``step``) and converted: floating-point tensors to ``state_dtype``, all copied
    to ``device``, the step count to a 0-d int64 tensor. An empty state stays empty (the
    parameter has not stepped).

    Raises:
        ValueError: naming ``where`` and the key: ``saved`` is not a dict, its keys are not
            exactly ``step`` and the rule's names (a foreign optimizer's state), a tensor's shape
            differs from the rule's for this parameter, a dtype is not real floating point
            (or, for an integer state, not the rule's), or the step count is not an integer
            ``>= 0``.
    """
    if not isinstance(saved, Mapping):
        raise ValueError(f"{where}: its state must be a dict, got {type(saved).__name__}")
    if not saved:
        return {}
    _check_keys(saved, expected, where)
    converted = {STEP: step_count(saved[STEP], f"{where}: state 'step'")}
    for key, (shape, dtype) in expected.items():
        value = _check_tensor(saved[key], key, shape, where)
        if dtype.is_floating_point:
            if not value.is_floating_point():
                raise ValueError(
                    f"{where}: state {key!r} has dtype {value.dtype}, expected a real "
                    "floating-point dtype"
                )
            converted[key] = value.to(device=device, dtype=state_dtype, copy=True)
        else:
            if value.dtype != dtype:
                raise ValueError(
                    f"{where}: state {key!r} has dtype {value.dtype}, the rule keeps {dtype}"
                )
            converted[key] = value.to(device=device, copy=True)
    return converted


def written_mark(param: Tensor, state: Mapping[str, Any]) -> Tuple:
    """What identifies ``state`` as the one a step wrote for ``param``, so that the next step
    need not check it again (:func:`check_current`): the parameter's shape and device, and every
    entry's key, identity, shape, dtype and device. Identities alone do not do: an ``id()`` is
    reused once its tensor is freed (a state tensor replaced by hand by one of another dtype may
    get the old one's), and a tensor keeps it when resized or moved in place (``resize_``,
    ``.data =``). A replaced, renamed, resized or retyped entry, a resized parameter or a state
    loaded since no longer matches, and is checked again before the next step."""
    entries = [
        (key, id(value), value.shape, value.dtype, value.device)
        if isinstance(value, Tensor)
        else (key, id(value), type(value))
        for key, value in state.items()
    ]
    return (param.shape, param.dtype, param.device, *entries)


def check_current(
    state: Mapping[str, Any], expected: Mapping[str, Expected], device: torch.device, where: str
) -> Mapping[str, Any]:
    """The stored ``state`` of a parameter about to step, checked against the rule's schema for
    the parameter's current shape (keys, each tensor's shape and storage dtype) and its
    ``device``: a parameter resized after its first step, or a state edited by hand, is refused
    (``ValueError`` naming ``where``, the key and the value) before the rule runs. Returned as
    it is, or copied with its step count made a 0-d int64 tensor."""
    _check_keys(state, expected, where)
    for key, (shape, dtype) in expected.items():
        value = _check_tensor(state[key], key, shape, where)
        if value.dtype != dtype:
            raise ValueError(f"{where}: state {key!r} has dtype {value.dtype}, expected {dtype}")
        if value.device != device:
            raise ValueError(
                f"{where}: state {key!r} is on {value.device}, the parameter on {device}"
            )
    step = state[STEP]
    if _is_count(step):
        return state
    return {**state, STEP: step_count(step, f"{where}: state 'step'")}


def _is_count(step: Any) -> bool:
    """Whether ``step`` is stored as a step count is: a 0-d int64 tensor on the CPU (read without
    waiting on any device)."""
    return (
        isinstance(step, Tensor)
        and step.dtype == torch.int64
        and step.dim() == 0
        and step.device.type == "cpu"
    )


def check_steps(steps: Sequence[Tensor], labels: Sequence[str]) -> None:
    """``ValueError`` naming the parameter (``labels[i]`` for ``steps[i]``) and the value unless
    every step count is in ``[0, 2**62]``, the range ``load_state_dict`` accepts (``step + 1``
    cannot overflow).

    The counts are read every step, as a state edited in place (``state["step"].fill_(-1)``)
    keeps its identity and is not checked again otherwise. They are 0-d int64 tensors on the
    CPU (:func:`check_current` makes them so), so reading them waits on no device: one stacked
    minimum and maximum for the whole step, and a per-parameter look only when one is out of
    range.
    """
    if not steps:
        return
    try:
        stacked = torch.stack(list(steps))
    except RuntimeError:  # a count resized or moved since it was checked: found below
        stacked = None
    if (
        stacked is not None
        and stacked.dtype == torch.int64
        and stacked.shape == (len(steps),)
        and stacked.device.type == "cpu"
    ):
        low, high = torch.aminmax(stacked)
        if 0 <= int(low) and int(high) <= MAX_STEP:
            return
    for step, label in zip(steps, labels):
        where = f"{label}: state 'step'"
        if not _is_count(step):  # resized or retyped in place since it was checked
            step_count(step, where)
            raise ValueError(
                f"{where} must be a 0-d int64 tensor on the CPU, got a tensor of shape "
                f"{tuple(step.shape)}, dtype {step.dtype} on {step.device}"
            )
        number = int(step)
        if not 0 <= number <= MAX_STEP:
            raise ValueError(f"{where} must be an integer in [0, 2**62], got {number}")


def check_result(
    param: Tensor,
    old: Mapping[str, Any],
    direction: Any,
    new: Mapping[str, Any],
    where: str,
) -> None:
    """Raise ``ValueError`` naming ``where`` unless a step's result can be written: the
    direction has the parameter's shape, and the new state has the keys of the ``old`` one,
    each tensor with its old shape and dtype."""
    if not isinstance(direction, Tensor) or direction.shape != param.shape:
        shape = tuple(direction.shape) if isinstance(direction, Tensor) else type(direction)
        raise ValueError(
            f"{where}: the rule's direction has shape {shape}, the parameter "
            f"{tuple(param.shape)} (was the parameter resized after its first step?)"
        )
    if set(new) != set(old):
        raise ValueError(
            f"{where}: the rule returned the state keys {_keys(new)}, the parameter's state has "
            f"{_keys(old)}"
        )
    for key, value in new.items():
        if key == STEP:
            continue
        before = old[key]
        if (
            not isinstance(value, Tensor)
            or value.shape != before.shape
            or value.dtype != before.dtype
        ):
            got = (tuple(value.shape), value.dtype) if isinstance(value, Tensor) else value
            raise ValueError(
                f"{where}: the rule's new state {key!r} ({got}) differs in shape or dtype from "
                f"the stored one ({tuple(before.shape)}, {before.dtype}) (was the parameter "
                "resized after its first step?)"
            )


def check_lr(lr: Any, what: str = "lr") -> None:
    """``ValueError`` unless ``lr`` is a finite number ``>= 0`` or, as torch.optim accepts, a
    1-element real tensor holding one (``what`` names it: ``weight_decay`` is checked so too)."""
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError(f"Tensor {what} must be 1-element")
        if lr.is_complex() or lr.dtype == torch.bool:
            raise ValueError(f"Invalid {what}: {lr!r} (expected a real number)")
        lr = lr.item()
    check_real(lr, what, 0.0)


def lr_of(default: Any) -> Any:
    """The ``lr`` of a param group that takes the optimizer's ``default`` after another group took
    it: a tensor copied (not shared: an LR scheduler writes each group's tensor in place, and
    would write one shared by two groups twice, ``ReduceLROnPlateau`` halving it twice, say,
    and a per-group schedule the last group's into both; torch.optim shares it), a number as
    it is."""
    return default.detach().clone() if isinstance(default, Tensor) else default


def separate_lrs(groups: Sequence[Dict[str, Any]]) -> None:
    """Give each param group of ``groups`` that shares its ``lr`` tensor with an earlier one a
    copy (see :func:`lr_of`): a state_dict saved by torch.optim, or before groups had their own,
    loads them shared."""
    seen = set()
    for group in groups:
        lr = group.get("lr")
        if isinstance(lr, Tensor):
            if id(lr) in seen:
                group["lr"] = lr = lr_of(lr)
            seen.add(id(lr))


def _number(value: Any, what: str, where: str) -> float:
    """A group's ``lr`` or ``weight_decay`` as a float ``>= 0`` (a 1-element tensor read once)."""
    if isinstance(value, Tensor) and value.numel() == 1:
        value = value.item()
    try:
        return check_real(value, what, 0.0)
    except ValueError:
        raise ValueError(
            f"Invalid {what}: {value!r} in {where} (expected a finite number >= 0)"
        ) from None


def group_entry(group: Mapping[str, Any], key: str, where: str) -> Any:
    """``group[key]``, or ``ValueError`` saying that ``where`` (a param group) has no ``key``
    (deleted from ``param_groups`` by hand, or missing from a saved one)."""
    if key not in group:
        raise ValueError(f"{where} has no {key!r}")
    return group[key]


def check_rates(
    group: Mapping[str, Any], dtypes: Collection[torch.dtype], where: str = "a param group"
) -> Tuple[float, float]:
    """A param group's learning rate and weight decay as floats, read as a step reads them (so a
    value set in ``param_groups`` after construction is checked too), refused (``ValueError``
    naming ``where``, e.g. the group's first parameter, and the value) unless ``lr`` and
    ``weight_decay`` are finite numbers ``>= 0``, as the constructor and ``load_state_dict``
    require, and ``lr``, ``lr·weight_decay`` and ``1 − lr·weight_decay`` are at most the largest
    value of each of ``dtypes`` (its parameters'): ``p.add_(d, alpha=-lr)`` raises for an ``lr``
    the parameter's dtype cannot hold, and would do so after other parameters were written.
    ``maximize``, where set, must be a bool (a truthy string, ``"no"``, would ascend), and
    ``skipped_steps`` an int ``>= 0``. Plain floats are checked on the host."""
    lr = _number(group_entry(group, "lr", where), "lr", where)
    decay = _number(group_entry(group, "weight_decay", where), "weight_decay", where)
    check_flag(group.get("maximize", False), f"maximize in {where}")
    skip_count(group.get("skipped_steps", 0), where)  # a skip adds to it after others are written
    for dtype in dtypes:
        largest = torch.finfo(dtype).max
        values = (lr, lr * decay, 1.0 - lr * decay)
        if not all(math.isfinite(v) and abs(v) <= largest for v in values):
            raise ValueError(
                f"Invalid lr: {lr!r} with weight_decay {decay!r} in {where} for {dtype} "
                f"parameters (lr and lr·weight_decay must be finite and at most {largest:g})"
            )
    return lr, decay


def check_batch(directions, grads, values, stored, keys, where: str) -> None:
    """``ValueError`` unless a bucket's stacked results have the shapes and dtypes of its stacked
    inputs (the batched form of :func:`check_result`)."""
    if not isinstance(directions, Tensor) or directions.shape != grads.shape:
        got: object = (
            tuple(directions.shape) if isinstance(directions, Tensor) else type(directions)
        )
        raise ValueError(
            f"{where} (and the parameters batched with it): the rule's directions have shape "
            f"{got}, expected {tuple(grads.shape)}"
        )
    if len(values) != len(stored):
        raise ValueError(
            f"{where} (and the parameters batched with it): the rule returned {len(values)} "
            f"state tensors, the state has {len(stored)}"
        )
    for key, value, before in zip(keys, values, stored):
        if not isinstance(value, Tensor) or (value.shape, value.dtype) != (
            before.shape,
            before.dtype,
        ):
            got = (tuple(value.shape), value.dtype) if isinstance(value, Tensor) else value
            raise ValueError(
                f"{where} (and the parameters batched with it): the rule's new state {key!r} "
                f"({got}) differs in shape or dtype from the stored one "
                f"({tuple(before.shape)}, {before.dtype})"
            )
