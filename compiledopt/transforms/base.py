"""The transform contract that every part of compiledopt derives from.

A transform maps a gradient (and optionally the parameter, the transform's own state for that
parameter and the step count) to an update *direction*; the caller applies
``p <- p - lr * direction``.
State is explicit, a ``List[Tensor]``, so one signature serves TorchScript, ``torch.compile``,
``torch.export`` and ONNX alike::

    init_state(param) -> List[Tensor]
    update(grad, param, state, step) -> (direction, new_state)
    forward(grad) -> direction          # the single-argument call of the seed API

Do not add ``from __future__ import annotations`` here: TorchScript needs real annotations.
"""

from typing import List, Tuple

import torch
from torch import Tensor, nn


def check_grad_shape(grad: Tensor, expected: List[int]) -> None:
    """Raise ``ValueError`` naming both shapes unless ``grad`` has the ``expected`` shape."""
    if list(grad.shape) != expected:
        raise ValueError(
            f"gradient of shape {list(grad.shape)} given to a transform bound to shape {expected}"
        )


class Transform(nn.Module):
    """Base class of every gradient transform.

    Subclasses implement :meth:`update` (decorated with ``@torch.jit.export``) and, when they carry
    state, :meth:`init_state` and :meth:`state_names`. Learnable weights are ``nn.Parameter`` s, so
    ``transform.parameters()`` is the meta-parameter set.

    Attributes:
        reads_param (bool): whether :meth:`update` reads ``param``. Callers that only have a
            gradient (the seed's ``transform(grad)``) may then pass the gradient in its place.
        shape_agnostic (bool): whether one instance serves parameters of any shape (shared
            across a model and transferable to other models), as meta-training requires.
            Shape-bound transforms are built per parameter by a factory.
        view_invariant (bool): whether the update of a parameter equals the update of its
            canonical view — ``(numel,)`` for rank 0 and 1, ``(shape[0], prod(shape[1:]))`` for
            rank ≥ 2 — with the state tensors of the parameter's shape viewed alike (true of
            elementwise rules and of Adafactor-style row/column statistics). Compiled backends
            then need one graph per view rank instead of one per parameter rank.
    """

    reads_param: bool = False
    shape_agnostic: bool = False
    view_invariant: bool = False

    @torch.jit.export
    def init_state(self, param: Tensor) -> List[Tensor]:
        """Return the initial state for ``param`` (``[]`` for stateless transforms)."""
        return []

    @torch.jit.export
    def update(
        self, grad: Tensor, param: Tensor, state: List[Tensor], step: Tensor
    ) -> Tuple[Tensor, List[Tensor]]:
        """Map ``grad`` to ``(direction, new_state)``; descent applies ``p - lr * direction``.

        Args:
            grad (Tensor): the gradient of the loss with respect to ``param``.
            param (Tensor): the parameter's current value.
            state (List[Tensor]): this transform's state for ``param``, as made by
                :meth:`init_state` or returned by the previous call.
            step (Tensor): 0-d integer tensor, the number of updates applied before this one.
        """
        raise NotImplementedError(f"{type(self).__name__} does not implement update()")

    def forward(self, grad: Tensor) -> Tensor:
        """The seed's call ``update = transform(grad)``: one step from the initial state."""
        step = torch.zeros((), dtype=torch.int64, device=grad.device)
        direction, _ = self.update(grad, grad, self.init_state(grad), step)
        return direction

    def state_names(self) -> List[str]:
        """Names of the state tensors, in the order of :meth:`init_state` (the state schema)."""
        return []


class UpdateFunction(nn.Module):
    """Exposes ``transform.update`` as ``forward``.

    ``torch.export`` and ``torch.func.functional_call`` call ``forward``; this adapter lets them
    reach the explicit-state step without a second implementation of it.
    """

    def __init__(self, transform: Transform) -> None:
        super().__init__()
        self.transform = transform

    def forward(
        self, grad: Tensor, param: Tensor, state: List[Tensor], step: Tensor
    ) -> Tuple[Tensor, List[Tensor]]:
        return self.transform.update(grad, param, state, step)
