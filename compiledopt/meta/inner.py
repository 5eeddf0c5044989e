"""The inner loop: a transform optimizing a task's parameters, functionally and differentiably."""

from typing import Dict, List, Tuple

import torch
from torch import Tensor

from compiledopt.tasks.base import Task
from compiledopt.transforms.base import Transform

Params = Dict[str, Tensor]
States = Dict[str, List[Tensor]]


def check_shape_agnostic(transform: object, what: str) -> Transform:
    """Return ``transform`` if it is a shape-agnostic :class:`Transform`, else raise."""
    if not isinstance(transform, Transform):
        raise TypeError(
            f"{what} needs one shape-agnostic transform module shared by all parameters, got "
            f"{type(transform).__name__}; factories such as KroneckerTransform build shape-bound "
            "transforms for one model's parameters"
        )
    if not getattr(transform, "shape_agnostic", False):
        raise ValueError(
            f"{what} needs a shape-agnostic transform; {type(transform).__name__} is bound to one "
            "parameter shape (set `shape_agnostic = True` on transforms that accept any shape)"
        )
    return transform


def init_states(transform: Transform, params: Params) -> States:
    with torch.no_grad():
        return {name: transform.init_state(value) for name, value in params.items()}


def task_gradients(task: Task, loss: Tensor, params: Params, create_graph: bool) -> Params:
    """``∂loss/∂params``; a parameter the loss doesn't use raises ``ValueError`` naming it."""
    grads = torch.autograd.grad(
        loss, list(params.values()), create_graph=create_graph, retain_graph=True, allow_unused=True
    )
    for name, grad in zip(params, grads):
        if grad is None:
            raise ValueError(
                f"parameter {name!r} of task {type(task).__name__}(seed={task.seed}) gets no "
                "gradient from the task's loss"
            )
    return dict(zip(params, grads))


def apply_transform(
    transform: Transform,
    params: Params,
    grads: Params,
    states: States,
    step: int,
    lr: float,
) -> Tuple[Params, States]:
    """One inner step ``p <- p - lr · direction`` for every parameter, with state carried."""
    step_tensor = torch.tensor(step, dtype=torch.int64, device=next(iter(params.values())).device)
    new_params: Params = {}
    new_states: States = {}
    for name, value in params.items():
        direction, new_states[name] = transform.update(
            grads[name], value, states[name], step_tensor
        )
        new_params[name] = value - lr * direction
    return new_params, new_states


def detach(params: Params, states: States) -> Tuple[Params, States]:
    return (
        {n: v.detach() for n, v in params.items()},
        {n: [s.detach() for s in state] for n, state in states.items()},
    )


@torch.no_grad()
def evaluate_curve(transform: Transform, task: Task, steps: int, lr: float) -> Tensor:
    """Losses on the task's evaluation batch before and after each of ``steps`` inner steps.

    Returns:
        Tensor: ``(steps + 1,)`` float64 losses; entries after a non-finite loss are ``nan``.
    """
    params = task.init_params()
    states = init_states(transform, params)
    evaluation = task.evaluation_batch()
    curve = torch.full((steps + 1,), float("nan"), dtype=torch.float64)
    for k in range(steps + 1):
        curve[k] = task.loss(params, evaluation).double().cpu()
        if k == steps or not torch.isfinite(curve[k]):
            break
        with torch.enable_grad():
            live = {n: v.requires_grad_() for n, v in params.items()}
            grads = task_gradients(task, task.loss(live, task.batch(k)), live, False)
        params, states = apply_transform(transform, params, grads, states, k, lr)
        params, states = detach(params, states)
    return curve
