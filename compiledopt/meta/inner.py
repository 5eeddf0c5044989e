"""The inner loop: a transform optimizing a task's parameters, functionally and differentiably."""

from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
from torch import Tensor

from compiledopt.roles import ROLES
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


def check_routes(routes: Any, where: str = "routes") -> Optional[Dict[str, str]]:
    """``routes`` of a meta-training config checked: ``None`` (no routing: every parameter gets
    the transform as configured) or a mapping of roles (:data:`ROLES`) to rule names; a role it
    leaves out gets ``"artifact"``. ``ValueError`` names the offending entry. Whether the
    transform has those rules is checked by :func:`check_rules`."""
    if routes is None:
        return None
    if not isinstance(routes, Mapping):
        raise ValueError(f"Invalid {where}: {routes!r} (a mapping of roles to rules)")
    for role, rule in routes.items():
        if role not in ROLES:
            raise ValueError(f"Invalid {where}: unknown role {role!r} (roles are {ROLES})")
        if not isinstance(rule, str) or not rule:
            raise ValueError(f"Invalid {where}: role {role!r} has rule {rule!r} (a rule name)")
    return dict(routes)


def check_rules(transform: Transform, routes: Optional[Mapping[str, str]], where: str) -> None:
    """Refuse ``routes`` naming a rule ``transform`` lacks (the message names role and rule)."""
    rules = transform.rules()
    for role, rule in (routes or {}).items():
        if rule not in rules:
            raise ValueError(
                f"Invalid {where}: role {role!r} has rule {rule!r} "
                f"({type(transform).__name__} has the rules {rules})"
            )


def parameter_rules(task: Task, routes: Optional[Mapping[str, str]]) -> Optional[Dict[str, str]]:
    """The rule of each of ``task``'s parameters (by name) under ``routes``: the rule of the
    parameter's role (:meth:`Task.roles`), ``"artifact"`` for a role ``routes`` leaves out;
    ``None`` without routes."""
    if routes is None:
        return None
    return {name: routes.get(role, "artifact") for name, role in task.roles().items()}


def routed_transforms(
    transform: Transform, task: Task, routes: Optional[Mapping[str, str]]
) -> Optional[Dict[str, Transform]]:
    """The transform each parameter of ``task`` is updated by under ``routes``
    (``transform.routed(rule)``, sharing its weights); ``None`` without routes."""
    rules = parameter_rules(task, routes)
    if rules is None:
        return None
    variants = {rule: transform.routed(rule) for rule in sorted(set(rules.values()))}
    return {name: variants[rule] for name, rule in rules.items()}


def init_states(
    transform: Transform,
    params: Params,
    transforms: Optional[Mapping[str, Transform]] = None,
) -> States:
    """Fresh states: each parameter's from its own transform in ``transforms`` when given."""
    with torch.no_grad():
        if transforms is None:
            return {name: transform.init_state(value) for name, value in params.items()}
        return {name: transforms[name].init_state(value) for name, value in params.items()}


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
    transforms: Optional[Mapping[str, Transform]] = None,
) -> Tuple[Params, States]:
    """One inner step ``p <- p - lr · direction`` for every parameter, with state carried; with
    ``transforms`` (see :func:`routed_transforms`) each parameter's direction comes from its
    own transform, else every parameter's from ``transform``."""
    step_tensor = torch.tensor(step, dtype=torch.int64, device=next(iter(params.values())).device)
    new_params: Params = {}
    new_states: States = {}
    for name, value in params.items():
        rule = transform if transforms is None else transforms[name]
        direction, new_states[name] = rule.update(grads[name], value, states[name], step_tensor)
        new_params[name] = value - lr * direction
    return new_params, new_states


def detach(params: Params, states: States) -> Tuple[Params, States]:
    return (
        {n: v.detach() for n, v in params.items()},
        {n: [s.detach() for s in state] for n, state in states.items()},
    )


@torch.no_grad()
def evaluate_curve(
    transform: Transform,
    task: Task,
    steps: int,
    lr: float,
    routes: Optional[Mapping[str, str]] = None,
) -> Tensor:
    """Losses on the task's evaluation batch before and after each of ``steps`` inner steps
    (each parameter updated by the rule of its role under ``routes``, when given).

    Returns:
        Tensor: ``(steps + 1,)`` float64 losses; entries after a non-finite loss are ``nan``.
    """
    params = task.init_params()
    transforms = routed_transforms(transform, task, routes)
    states = init_states(transform, params, transforms)
    evaluation = task.evaluation_batch()
    curve = torch.full((steps + 1,), float("nan"), dtype=torch.float64)
    for k in range(steps + 1):
        curve[k] = task.loss(params, evaluation).double().cpu()
        if k == steps or not torch.isfinite(curve[k]):
            break
        with torch.enable_grad():
            live = {n: v.requires_grad_() for n, v in params.items()}
            grads = task_gradients(task, task.loss(live, task.batch(k)), live, False)
        params, states = apply_transform(transform, params, grads, states, k, lr, transforms)
        params, states = detach(params, states)
    return curve
