"""Differentiable, in-place updates of a module's parameters (the MAML inner-loop toolkit).

``clone_module`` makes a copy whose parameters are differentiable functions of the original's;
``update_module`` replaces each parameter ``p`` by ``p + u``. Together they run an inner loop whose
result can be back-propagated to the original parameters and to any learnable transform that
produced the updates::

    learner = clone_module(model)
    grads = torch.autograd.grad(loss(learner(x), y), learner.parameters(), create_graph=True)
    update_module(learner, [-0.1 * g for g in grads])   # one SGD step, differentiably

Sign convention: ``update_module`` *adds* the updates (p <- p + u).
"""

import copy
from typing import Dict, Iterable, Optional

from torch import Tensor, nn


def _refresh_derived(module: nn.Module) -> None:
    # Recurrent layers cache a flat list of their weights; point it at the new tensors.
    if isinstance(module, nn.RNNBase):
        module._init_flat_weights()


def update_module(module: nn.Module, updates: Iterable[Optional[Tensor]]) -> nn.Module:
    """Differentiably replace each parameter ``p`` of ``module`` with ``p + u``.

    Args:
        module (nn.Module): the module to update, in place. Usually a :func:`clone_module` copy:
            afterwards its parameters are non-leaf tensors that carry the graph of the update.
        updates (iterable of Tensor or None): one entry per tensor of ``module.parameters()``, in
            that order (shared parameters appear once); ``None`` leaves that parameter as it is.

    Returns:
        nn.Module: ``module`` itself.

    Raises:
        ValueError: if the number of updates or the shape of one does not match the parameters.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"update_module expects an nn.Module, got {type(module).__name__}")
    named = list(module.named_parameters())
    updates = list(updates)
    if len(updates) != len(named):
        raise ValueError(
            f"update_module got {len(updates)} updates for a module with {len(named)} parameters"
        )
    replaced: Dict[int, Tensor] = {}
    for (name, param), update in zip(named, updates):
        if update is None:
            continue
        if not isinstance(update, Tensor):
            raise TypeError(
                f"update for parameter {name!r} is {type(update).__name__}, not a Tensor"
            )
        if update.shape != param.shape:
            raise ValueError(
                f"update of shape {tuple(update.shape)} for parameter {name!r} of shape "
                f"{tuple(param.shape)}"
            )
        replaced[id(param)] = param + update
    for sub in module.modules():
        for key, current in sub._parameters.items():
            if current is not None and id(current) in replaced:
                # A differentiable update: a plain (non-leaf) Tensor takes the Parameter's place.
                sub._parameters[key] = replaced[id(current)]  # type: ignore[assignment]
        _refresh_derived(sub)
    return module


def clone_module(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose parameters and buffers are differentiable clones of the original.

    Gradients of anything computed with the copy flow back to the original parameters. Shared
    parameters and shared submodules stay shared in the copy. The copy's hook dictionaries are
    copies too, so hooks added to one module don't appear on the other.

    Args:
        module (nn.Module): the module to clone.

    Returns:
        nn.Module: the clone.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"clone_module expects an nn.Module, got {type(module).__name__}")
    return _clone(module, {}, {})


def _clone(
    module: nn.Module, tensors: Dict[int, Tensor], modules: Dict[int, nn.Module]
) -> nn.Module:
    if id(module) in modules:
        return modules[id(module)]
    clone = module.__class__.__new__(module.__class__)
    clone.__dict__ = module.__dict__.copy()
    modules[id(module)] = clone
    for key, value in clone.__dict__.items():
        if isinstance(value, dict):  # parameters, buffers, submodules and hook tables
            clone.__dict__[key] = copy.copy(value)

    def cloned(tensor: Optional[Tensor]) -> Optional[Tensor]:
        if tensor is None:
            return None
        if id(tensor) not in tensors:
            tensors[id(tensor)] = tensor.clone()
        return tensors[id(tensor)]

    for table in (clone._parameters, clone._buffers):
        for key in list(table):
            # The clone of a Parameter is a plain Tensor (differentiable through the clone).
            table[key] = cloned(table[key])  # type: ignore[assignment]
    for key, sub in list(clone._modules.items()):
        clone._modules[key] = None if sub is None else _clone(sub, tensors, modules)
    _refresh_derived(clone)
    return clone
