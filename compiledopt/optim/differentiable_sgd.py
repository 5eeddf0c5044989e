"""Differentiable gradient descent on a module's parameters."""

from typing import Iterable, Optional

from torch import Tensor, nn

from compiledopt._validation import check_lr
from compiledopt.module_update import update_module


class DifferentiableSGD(nn.Module):
    r"""Applies ``p <- p - lr · g`` to every parameter of a module, differentiably.

    Equivalent to ``update_module(module, [-lr * g for g in gradients])``: the module is updated in
    place and its parameters become functions of the gradients, so a later loss can be
    back-propagated through the step (MAML inner loops, learned transforms producing ``g``).

    Args:
        lr (float): the learning rate, a positive finite number.

    Example:
        >>> sgd = DifferentiableSGD(0.1)
        >>> learner = compiledopt.clone_module(model)
        >>> gradients = torch.autograd.grad(loss(learner(X), y), learner.parameters(),
        ...                                 create_graph=True)
        >>> sgd(learner, gradients)  # learner is updated in place
    """

    def __init__(self, lr: float) -> None:
        super().__init__()
        self.lr = check_lr(lr, "DifferentiableSGD")

    def forward(
        self, module: nn.Module, gradients: Optional[Iterable[Optional[Tensor]]] = None
    ) -> nn.Module:
        """Update ``module`` in place and return it.

        Args:
            module (nn.Module): the module to update.
            gradients (list of Tensor, optional): one per ``module.parameters()`` entry, ``None``
                to skip a parameter. Defaults to the parameters' ``.grad``. (default: None)
        """
        if not isinstance(module, nn.Module):
            raise TypeError(f"DifferentiableSGD expects an nn.Module, got {type(module).__name__}")
        if gradients is None:
            gradients = [p.grad for p in module.parameters()]
        updates = [None if g is None else g * -self.lr for g in gradients]
        return update_module(module, updates)

    def extra_repr(self) -> str:
        return f"lr={self.lr}"
