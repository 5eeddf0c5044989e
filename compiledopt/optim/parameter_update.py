"""Gradients in, transformed updates out: ``torch.autograd.grad`` followed by transforms."""

from typing import Iterable, List, Optional, Tuple, Union, cast

import torch
from torch import Tensor, nn

from compiledopt.transforms.base import Transform
from compiledopt.transforms.binding import bind_transforms


class ParameterUpdate(nn.Module):
    """Computes gradients of a loss and returns each passed through its parameter's transform.

    Behaves like ``torch.autograd.grad`` but returns directions ``T(g)``, one per parameter, from
    transforms built at construction (one per parameter for a factory; shared for a transform
    module). Following the transform convention, *descent subtracts* them: apply them with
    ``DifferentiableSGD(lr)(module, updates)`` or ``update_module(module, [-lr * u ...])``.
    ``ParameterUpdate.parameters()`` are the transforms' weights.

    Each call is one step from the transforms' initial state (stateful transforms start afresh);
    carry state explicitly with the transforms' ``update`` where that matters.

    Args:
        parameters (iterable of Tensor or nn.Module): the parameters to build transforms for
            (a module stands for its ``parameters()``).
        transform (factory or nn.Module): a factory ``callable(param) -> nn.Module`` such as
            :class:`KroneckerTransform`, or one transform module shared by every parameter.

    Example:
        >>> model = torch.nn.Linear(784, 10)
        >>> get_update = ParameterUpdate(model.parameters(),
        ...                              KroneckerTransform(compiledopt.nn.KroneckerLinear))
        >>> opt = torch.optim.SGD(get_update.parameters(), lr=0.01)
        >>> sgd = DifferentiableSGD(lr=0.1)
        >>> for iteration in range(10):
        ...     opt.zero_grad()
        ...     learner = compiledopt.clone_module(model)
        ...     updates = get_update(loss(learner(X), y), learner.parameters(), create_graph=True)
        ...     sgd(learner, updates)            # descends: p <- p - 0.1 * T(g)
        ...     loss(learner(X_val), y_val).backward()
        ...     opt.step()                       # meta-update of the transforms
    """

    def __init__(self, parameters: Union[Iterable[Tensor], nn.Module], transform: object) -> None:
        super().__init__()
        named: List[Tuple[str, Tensor]]
        if isinstance(parameters, nn.Module):
            named = list(parameters.named_parameters())
        elif isinstance(parameters, Tensor):
            raise TypeError("ParameterUpdate expects an iterable of parameters, got one Tensor")
        else:
            named = [(f"parameters[{i}]", p) for i, p in enumerate(parameters)]
        for name, param in named:
            if not isinstance(param, Tensor):
                raise TypeError(f"ParameterUpdate: {name} is {type(param).__name__}, not a Tensor")
        if not named:
            raise ValueError("ParameterUpdate got no parameters")
        self.shapes = [tuple(p.shape) for _, p in named]
        self.transforms = nn.ModuleList(
            bind_transforms(transform, [p for _, p in named], [n for n, _ in named])
        )

    def forward(
        self,
        loss: Tensor,
        parameters: Iterable[Tensor],
        create_graph: bool = False,
        retain_graph: Optional[bool] = None,
        allow_unused: bool = False,
        allow_nograd: bool = False,
    ) -> List[Optional[Tensor]]:
        """Return the list of directions ``T_i(∂loss/∂p_i)``.

        Args:
            loss (Tensor): the loss to differentiate.
            parameters (iterable of Tensor): the tensors to differentiate with respect to, shaped
                like the constructor's parameters (e.g. a clone's parameters).
            create_graph (bool, optional): as in ``torch.autograd.grad``. (default: False)
            retain_graph (bool, optional): as in ``torch.autograd.grad``: ``None`` means
                ``create_graph``, which a differentiable inner loop needs. (default: None)
            allow_unused (bool, optional): as in ``torch.autograd.grad``; unused parameters get
                ``None``. (default: False)
            allow_nograd (bool, optional): skip parameters that don't require grad; their update is
                ``None``. (default: False)
        """
        params = list(parameters)
        if len(params) != len(self.transforms):
            raise ValueError(
                f"ParameterUpdate was built for {len(self.transforms)} parameters, "
                f"got {len(params)}"
            )
        for index, (param, shape) in enumerate(zip(params, self.shapes)):
            if tuple(param.shape) != shape:
                raise ValueError(
                    f"parameter {index} has shape {tuple(param.shape)}, "
                    f"but ParameterUpdate was built for shape {shape}"
                )
        wanted = [i for i, p in enumerate(params) if p.requires_grad or not allow_nograd]
        grads = torch.autograd.grad(
            loss,
            [params[i] for i in wanted],
            create_graph=create_graph,
            retain_graph=retain_graph,
            allow_unused=allow_unused,
        )
        updates: List[Optional[Tensor]] = [None] * len(params)
        for i, grad in zip(wanted, grads):
            if grad is None:
                continue
            transform = cast(Transform, self.transforms[i])
            step = torch.zeros((), dtype=torch.int64, device=grad.device)
            updates[i], _ = transform.update(grad, params[i], transform.init_state(params[i]), step)
        return updates
