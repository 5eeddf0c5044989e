"""A population of perturbed copies of a transform training copies of one task, vectorized.

Evolution-strategies meta-training runs the same task with ``M`` different weight vectors of the
transform (``θ + ε_m``). :class:`Population` holds the ``M`` copies' task parameters and transform
states stacked along a leading dimension and advances all of them with one call per inner step:
``torch.func.vmap`` over the members of ``grad(task.loss)`` and of the transform's ``update``
called through ``torch.func.functional_call`` with each member's weights. :func:`loop_step` is the
same step written as a plain loop over members (the reference the vectorized one is tested
against).

With ``routes`` (a mapping of parameter roles to rules of the transform, see
:meth:`Transform.routed <compiledopt.transforms.Transform.routed>`) each parameter is updated by
the rule of its role (:meth:`Task.roles <compiledopt.tasks.Task.roles>`): every rule's variant
shares the transform's weights, so the members' weights reach all of them. Rules whose maths
depends on the shape (NormalizedMLP's Newton–Schulz picks the Gram side from the matrix's
shape) see each member's own shape under ``vmap``, and their matrix products become batched
ones.

The weights are handled as one flat vector (:func:`flat_weights` / :func:`unflatten`), so a
perturbation is a vector and a meta-gradient estimate is ``Σ ξ·L``.
"""

from typing import Dict, List, Mapping, Optional, Tuple

import torch
from torch import Tensor
from torch.func import functional_call, grad_and_value, vmap

from compiledopt.meta.inner import parameter_rules
from compiledopt.tasks.base import Batch, Task
from compiledopt.transforms.base import Transform, UpdateFunction

Params = Dict[str, Tensor]
States = Dict[str, List[Tensor]]


def flat_weights(transform: Transform) -> Tensor:
    """The transform's weights as one detached float32 vector (``named_parameters`` order)."""
    return torch.cat([w.detach().reshape(-1).float() for w in transform.parameters()])


def unflatten(transform: Transform, flat: Tensor) -> Dict[str, Tensor]:
    """``flat`` (``(D,)`` or ``(M, D)``) split into the transform's named weights."""
    named, offset = {}, 0
    lead = flat.shape[:-1]
    for name, weight in transform.named_parameters():
        size = weight.numel()
        piece = flat[..., offset : offset + size].reshape((*lead, *weight.shape))
        named[name] = piece.to(weight.dtype)
        offset += size
    if offset != flat.shape[-1]:
        raise ValueError(f"a weight vector of {flat.shape[-1]} entries for {offset} weights")
    return named


def set_weights(transform: Transform, flat: Tensor) -> None:
    """Copy ``flat`` into the transform's weights."""
    named = unflatten(transform, flat)
    with torch.no_grad():
        for name, weight in transform.named_parameters():
            weight.copy_(named[name])


class Population:
    """``M`` members optimizing one task, each with its own transform weights.

    Args:
        transform (Transform): the shape-agnostic transform (its weights are not used: each call
            passes the members' weights).
        task (Task): the task every member trains.
        members (int): ``M``.
        routes (mapping of str to str, optional): the rule of each parameter role (roles left
            out: ``"artifact"``); ``None``: every parameter gets ``transform`` as configured.
            (default: None)
    """

    def __init__(
        self,
        transform: Transform,
        task: Task,
        members: int,
        routes: Optional[Mapping[str, str]] = None,
    ) -> None:
        self.transform = transform
        self.task = task
        self.members = members
        self._update = UpdateFunction(transform)
        #: The rule of each parameter by name (``None`` without routes).
        self.rules = parameter_rules(task, routes)
        self._updates: Dict[str, UpdateFunction] = {}
        if self.rules is not None:
            for rule in sorted(set(self.rules.values())):
                self._updates[rule] = UpdateFunction(transform.routed(rule))
        self._vstep = vmap(self._member_step, in_dims=(0, 0, 0, None, None, None))
        self._vloss = vmap(self._member_loss, in_dims=(0, None))

    def init(self) -> Tuple[Params, States]:
        """Every member at the task's initial parameters with a fresh transform state."""
        params = self.task.init_params()
        with torch.no_grad():
            states = {n: self._update_of(n).transform.init_state(p) for n, p in params.items()}
        stack = lambda t: t.unsqueeze(0).expand(self.members, *t.shape).clone()  # noqa: E731
        return (
            {n: stack(p) for n, p in params.items()},
            {n: [stack(s) for s in state] for n, state in states.items()},
        )

    def _update_of(self, name: str) -> UpdateFunction:
        return self._update if self.rules is None else self._updates[self.rules[name]]

    def _member_loss(self, params: Params, batch: Batch) -> Tensor:
        return self.task.loss(params, batch)

    def _member_step(
        self,
        weights: Dict[str, Tensor],
        params: Params,
        states: States,
        batch: Batch,
        step: Tensor,
        lr: Tensor,
    ) -> Tuple[Tensor, Params, States]:
        grads, loss = grad_and_value(self._member_loss)(params, batch)
        new_params: Params = {}
        new_states: States = {}
        for name, value in params.items():
            direction, new_states[name] = functional_call(
                self._update_of(name), weights, (grads[name], value, states[name], step)
            )
            new_params[name] = value - lr * direction
        return loss, new_params, new_states

    @torch.no_grad()
    def step(
        self, weights: Tensor, params: Params, states: States, step: int, lr: float
    ) -> Tuple[Tensor, Params, States]:
        """One inner step of every member on the task's batch ``step``.

        Args:
            weights: ``(M, D)`` flat transform weights, one row per member.
            params, states: the members' stacked parameters and transform states.
            step: the inner step (selects the batch; the transform's ``step``).
            lr: the inner learning rate of this step.

        Returns:
            ``(losses, params, states)``: ``losses`` is ``(M,)``, the training loss of each member
            at its parameters *before* the step, on batch ``step``.
        """
        named = {f"transform.{n}": w for n, w in unflatten(self.transform, weights).items()}
        device = next(iter(params.values())).device
        step_tensor = torch.tensor(step, dtype=torch.int64, device=device)
        lr_tensor = torch.tensor(lr, dtype=torch.float32, device=device)
        return self._vstep(named, params, states, self.task.batch(step), step_tensor, lr_tensor)

    @torch.no_grad()
    def loss(self, params: Params, batch: Batch) -> Tensor:
        """``(M,)`` losses of the members' parameters on ``batch``."""
        return self._vloss(params, batch)


@torch.no_grad()
def loop_step(
    transform: Transform,
    task: Task,
    weights: Tensor,
    params: Params,
    states: States,
    step: int,
    lr: float,
) -> Tuple[Tensor, Params, States]:
    """:meth:`Population.step` as a plain loop over members with autograd (the reference)."""
    batch = task.batch(step)
    step_tensor = torch.tensor(step, dtype=torch.int64)
    losses, out_params, out_states = [], [], []
    original = flat_weights(transform)
    try:
        for m in range(weights.shape[0]):
            set_weights(transform, weights[m])
            member = {n: p[m].clone().requires_grad_() for n, p in params.items()}
            with torch.enable_grad():
                loss = task.loss(member, batch)
                grads = torch.autograd.grad(loss, list(member.values()))
            new_p, new_s = {}, {}
            for (name, value), grad in zip(member.items(), grads):
                state = [s[m] for s in states[name]]
                direction, new_s[name] = transform.update(grad, value.detach(), state, step_tensor)
                new_p[name] = value.detach() - lr * direction
            losses.append(loss.detach())
            out_params.append(new_p)
            out_states.append(new_s)
    finally:
        set_weights(transform, original)
    stacked_params = {n: torch.stack([p[n] for p in out_params]) for n in params}
    stacked_states = {
        n: [torch.stack([s[n][i] for s in out_states]) for i in range(len(states[n]))]
        for n in states
    }
    return torch.stack(losses), stacked_params, stacked_states
