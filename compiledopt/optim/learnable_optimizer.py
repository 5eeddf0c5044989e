"""Meta-descent: an optimizer whose update rule is a learnable transform."""

import weakref
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, cast

import torch
from torch import Tensor, nn

from compiledopt._identity import unique_by_identity
from compiledopt._validation import check_lr
from compiledopt.transforms.base import Transform, UpdateFunction
from compiledopt.transforms.binding import bind_transforms


class _StepRecord(NamedTuple):
    """What one parameter's update was computed from, to recompute it differentiably later."""

    grad: Tensor
    param: Tensor
    state: List[Tensor]
    step: Tensor


class LearnableOptimizer(nn.Module):
    r"""Optimizes a model with a learnable transform, and meta-learns the transform online.

    ``step()`` applies ``θ_{t+1} = θ_t − lr · T_φ(g_t)`` to every parameter of ``model`` that has a
    gradient. The next ``backward()`` of a loss at ``θ_{t+1}`` then also leaves in each transform
    weight's ``.grad`` the exact one-step meta-gradient

    .. math:: \nabla_φ L_{t+1}(θ_t − lr · T_φ(g_t)) = −lr · (∂T_φ(g_t)/∂φ)ᵀ \, ∇_θ L_{t+1},

    so any torch optimizer over ``metaopt.parameters()`` (the transforms' weights) meta-learns the
    update rule (meta-descent; Sutton 1992, Baydin et al. 2017, Majumder et al. 2019,
    Jacobsen et al. 2019).

    How, without disturbing the model: the update is applied in place under ``no_grad``, so the
    model's parameters stay leaf ``nn.Parameter`` s (``state_dict``, ``.to()``, other optimizers,
    DDP and ``torch.save`` keep working). ``step()`` keeps the gradient, the transform state and a
    copy of the transform's weights it used; a gradient hook on each parameter recomputes
    ``T_φ(g_t)`` from that copy during the next backward and accumulates the vector-Jacobian
    product into the weights' ``.grad``. Because it uses the copy, ``opt.step()`` on the
    transform may run before or after ``metaopt.step()``. Each backward contributes its own share
    (gradient accumulation over several backwards works as it does for ``p.grad``), until the
    next ``step()`` replaces the record. Memory: one copy of the gradients and of the transform
    weights.

    Transform state (e.g. a Kronecker RNN's hidden state) is carried from step to step; the
    meta-gradient is truncated to one step (the state is treated as a constant).

    Args:
        model (nn.Module): the module to optimize.
        transform (factory or nn.Module): a factory ``callable(param) -> nn.Module``
            (``ModuleTransform``, ``KroneckerTransform``, ``MetaCurvatureTransform``,
            ``TransformDictionary``) or one transform module shared by every parameter.
        lr (float, optional): the learning rate. (default: 1.0)

    Example:
        >>> linear = torch.nn.Linear(784, 10)
        >>> transform = compiledopt.optim.KroneckerTransform(compiledopt.nn.KroneckerLinear)
        >>> metaopt = compiledopt.optim.LearnableOptimizer(linear, transform, lr=0.01)
        >>> opt = torch.optim.SGD(metaopt.parameters(), lr=0.001)
        >>> metaopt.zero_grad()
        >>> opt.zero_grad()
        >>> error = loss(linear(X), y)
        >>> error.backward()
        >>> opt.step()  # update metaopt
        >>> metaopt.step()  # update linear
    """

    # Plain attributes (set through __dict__), typed for the type checker.
    model: nn.Module
    params: List[Tensor]

    def __init__(self, model: nn.Module, transform: object, lr: float = 1.0) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"LearnableOptimizer expects an nn.Module model, got {type(model).__name__}"
            )
        self.lr = check_lr(lr, "LearnableOptimizer")
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("LearnableOptimizer: the model has no parameters that require grad")
        # Plain attributes, not submodules: the model's weights are not meta-parameters.
        self.__dict__["model"] = model
        self.__dict__["params"] = [p for _, p in named]
        self.param_names = [n for n, _ in named]
        self.transforms = nn.ModuleList(bind_transforms(transform, self.params, self.param_names))
        # Parameters sharing one transform share one weight snapshot per step.
        self._unique, self._owner = unique_by_identity(self.transforms)
        with torch.no_grad():
            self._state = [t.init_state(p) for t, p in zip(self._bound(), self.params)]
        self._step = torch.zeros((), dtype=torch.int64, device=self.params[0].device)
        self._records: List[Optional[_StepRecord]] = [None] * len(self.params)
        self._snapshots: List[Dict[str, Tensor]] = []
        self_ref = weakref.ref(self)
        self._hook_handles = [
            p.register_hook(_MetaGradientHook(self_ref, i)) for i, p in enumerate(self.params)
        ]

    def step(self, closure: Optional[Callable[[], Tensor]] = None) -> Optional[Tensor]:
        """Apply ``θ ← θ − lr · T_φ(g)`` to every parameter with a gradient.

        Args:
            closure (callable, optional): re-evaluates the model and returns the loss.
                (default: None)

        Returns:
            The closure's loss, or ``None``.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with torch.no_grad():
            snapshots = [
                {name: w.detach().clone() for name, w in t.named_parameters()} for t in self._unique
            ]
            step = self._step
            records: List[Optional[_StepRecord]] = []
            for i, (param, transform) in enumerate(zip(self.params, self._bound())):
                if param.grad is None:
                    records.append(None)
                    continue
                grad = param.grad.detach().clone()
                value = param.detach().clone() if transform.reads_param else grad
                state = self._state[i]
                direction, new_state = transform.update(grad, value, state, step)
                param.add_(direction, alpha=-self.lr)
                self._state[i] = new_state
                records.append(_StepRecord(grad, value, state, step))
            self._step = step + 1
            self._records = records
            self._snapshots = snapshots
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Reset the gradients of the model's parameters (not of the transforms).

        Args:
            set_to_none (bool, optional): set ``.grad`` to ``None`` instead of zeroing it.
                (default: True)
        """
        for param in self.params:
            if param.grad is None:
                continue
            if set_to_none:
                param.grad = None
            else:
                param.grad.detach_()
                param.grad.zero_()

    def _accumulate_meta_gradient(self, index: int, grad_next: Tensor) -> None:
        record = self._records[index]
        if record is None:
            return
        transform = self._bound()[index]
        snapshot = self._snapshots[self._owner[index]]
        with torch.enable_grad():
            weights = {f"transform.{n}": w.detach().requires_grad_() for n, w in snapshot.items()}
            direction, _ = torch.func.functional_call(
                UpdateFunction(transform),
                weights,
                (record.grad, record.param, record.state, record.step),
            )
            if not direction.requires_grad:
                return
            meta_grads = torch.autograd.grad(
                direction, list(weights.values()), grad_next.detach() * -self.lr, allow_unused=True
            )
        for weight, meta_grad in zip(transform.parameters(), meta_grads):
            if meta_grad is None:
                continue
            if weight.grad is None:
                weight.grad = meta_grad.detach()
            else:
                weight.grad.add_(meta_grad)

    def _bound(self) -> Sequence[Transform]:
        """The transforms, one per parameter (``bind_transforms`` made each a ``Transform``)."""
        return cast(Sequence[Transform], self.transforms)

    def remove_hooks(self) -> None:
        """Detach this optimizer from the model's parameters (no more meta-gradients)."""
        for handle in self._hook_handles:
            handle.remove()
        self._hook_handles = []

    def extra_repr(self) -> str:
        return f"lr={self.lr}, parameters={len(self.params)}"


class _MetaGradientHook:
    """Gradient hook of one model parameter; holds the optimizer weakly."""

    def __init__(self, optimizer: "weakref.ReferenceType[LearnableOptimizer]", index: int) -> None:
        self.optimizer = optimizer
        self.index = index

    def __call__(self, grad: Tensor) -> None:
        optimizer = self.optimizer()
        if optimizer is not None:
            optimizer._accumulate_meta_gradient(self.index, grad)
