"""The parameters a FrozenOptimizer steps: checked as given (:func:`checked_params`), checked
again as a step finds them (:func:`check_stepping`, :func:`check_listed_once`: param groups may
be edited by hand, tensors resized or retyped in place), and named in messages
(:func:`names_of`). Each check raises naming the parameter, before anything is written."""

from typing import Any, List, Mapping, Optional, Sequence

import torch
from torch import Tensor

__all__ = [
    "SET_OF_PARAMS",
    "check_listed_once",
    "check_param",
    "check_stepping",
    "checked_params",
    "names_of",
]

#: torch.optim's refusal of a set of parameters.
SET_OF_PARAMS = (
    "optimizer parameters need to be organized in ordered collections, but the ordering of "
    "tensors in sets will change between runs. Please use a list instead."
)


def checked_params(params: Any) -> List[Any]:
    """A param group's ``params`` (a tensor, or an iterable of tensors or ``(name, tensor)``
    pairs) as a list, each a real floating-point tensor listed once, else ``TypeError`` or
    ``ValueError`` naming the parameter. A parameter listed twice would have its update applied
    twice but its state stepped once (torch.optim only warns of it)."""
    if isinstance(params, set):
        raise TypeError(SET_OF_PARAMS)
    if isinstance(params, Tensor):
        params = [params]
    else:
        try:
            params = list(params)
        except TypeError:
            raise TypeError(
                "a param group's params must be a tensor or an iterable of tensors, got "
                f"{type(params).__name__}"
            ) from None
    seen = set()
    for item in params:
        name, param = item if isinstance(item, tuple) and len(item) == 2 else (None, item)
        if not isinstance(param, Tensor):
            raise TypeError(f"FrozenOptimizer params must be tensors, got {type(param)}")
        label = repr(name) if name is not None else f"of shape {tuple(param.shape)}"
        check_param(param, f"parameter {label}")
        if id(param) in seen:
            raise ValueError(
                f"parameter {label} is listed more than once in a param group (each parameter "
                "steps once a step: list it once)"
            )
        seen.add(id(param))
    return params


def names_of(group: Mapping[str, Any]) -> List[Optional[str]]:
    """The name of each parameter of a param group, in order: its ``param_names``, ``None``
    for a parameter without one (an unnamed group, or a parameter appended to ``params`` by
    hand, which torch.optim allows)."""
    names = list(group.get("param_names") or ())
    count = len(group["params"])
    return names[:count] + [None] * (count - len(names))


#: Real floating-point dtypes that :func:`check_stepping` accepts at once (the others it checks).
COMMON_FLOATS = frozenset({torch.float32, torch.bfloat16, torch.float16, torch.float64})


def check_param(param: Tensor, label: str) -> None:
    """``ValueError`` naming ``label`` unless ``param`` is a real floating-point tensor whose
    elements do not share memory (an ``expand()``-ed tensor's do: an update cannot be written to
    them, and torch would raise while writing the parameters, after others were written)."""
    if param.is_complex() or not param.is_floating_point():
        raise ValueError(
            f"FrozenOptimizer supports real floating-point parameters; {label} has dtype "
            f"{param.dtype}"
        )
    if param.layout != torch.strided:
        raise ValueError(
            f"FrozenOptimizer supports dense parameters; {label} has layout {param.layout}"
        )
    if any(stride == 0 and size > 1 for stride, size in zip(param.stride(), param.shape)):
        raise ValueError(
            f"{label} has elements that share memory (shape {tuple(param.shape)}, strides "
            f"{tuple(param.stride())}: an expand()-ed tensor?), which no update can be written "
            "to: clone() it"
        )


def check_stepping(param: Tensor, label: str) -> None:
    """``param`` about to step, checked (as a param group edited by hand, a tensor resized or
    retyped in place since it was given, may hold anything): :func:`check_param`, and a dense
    gradient (else ``RuntimeError``) of its shape and device and of a real floating-point dtype
    (else ``ValueError`` naming ``label`` and the gradient)."""
    grad = param.grad
    assert grad is not None  # only a parameter with a gradient steps
    # Every step checks every parameter: the common case in one expression (about a microsecond),
    # anything else through the checks below, which give the verdict.
    if (
        param.dtype in COMMON_FLOATS
        and grad.dtype in COMMON_FLOATS
        and param.layout == torch.strided
        and grad.layout == torch.strided
        and 0 not in param.stride()
        and grad.shape == param.shape
        and grad.device == param.device
    ):
        return
    check_param(param, label)
    if grad.layout != torch.strided:
        raise RuntimeError(f"FrozenOptimizer does not support sparse gradients ({label})")
    if (
        grad.shape != param.shape
        or grad.device != param.device
        or grad.is_complex()
        or not grad.is_floating_point()
    ):
        raise ValueError(
            f"{label}: its gradient has shape {tuple(grad.shape)} and dtype {grad.dtype} on "
            f"{grad.device}, the parameter shape {tuple(param.shape)} on {param.device} (a "
            "gradient needs the parameter's shape and device and a real floating-point dtype)"
        )


def check_listed_once(params: Sequence[Tensor], labels: Sequence[str], distinct: int) -> None:
    """``ValueError`` naming the first parameter ``params`` (every parameter of the param groups,
    ``distinct`` of them distinct) lists twice: a param group edited by hand to list one twice,
    or in two groups, would have its one computed update applied twice."""
    if distinct == len(params):
        return
    seen = set()
    for param, label in zip(params, labels):
        if id(param) in seen:
            raise ValueError(
                f"{label} is listed more than once in the param groups (each parameter steps "
                "once a step: list it once)"
            )
        seen.add(id(param))
