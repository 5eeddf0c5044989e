"""Per-parameter choice of transform."""

from typing import Callable, Mapping, Optional, Union

from torch import Tensor, nn

TransformSpec = Union[nn.Module, Callable[[Tensor], nn.Module]]


class TransformDictionary:
    """A transform factory that looks up, for each parameter, which transform to build.

    Values are either factories (called with the parameter, like :class:`KroneckerTransform`) or
    ready transform modules (used as they are, e.g. one shape-agnostic transform shared by several
    parameters). Keys are the parameter tensors themselves.

    Args:
        param_to_transform (mapping): parameter -> factory or transform.
        default (factory or transform, optional): used for parameters not in the mapping; without
            it such a parameter raises ``KeyError`` naming its shape. (default: None)

    Example:
        >>> model = torch.nn.Linear(4, 3)
        >>> transform = TransformDictionary(
        ...     {model.weight: KroneckerTransform(compiledopt.nn.KroneckerLinear)},
        ...     default=MetaCurvatureTransform,
        ... )
        >>> metaopt = compiledopt.optim.LearnableOptimizer(model, transform, lr=0.1)
    """

    def __init__(
        self,
        param_to_transform: Mapping[Tensor, TransformSpec],
        default: Optional[TransformSpec] = None,
    ) -> None:
        if not isinstance(param_to_transform, Mapping):
            raise TypeError(
                "TransformDictionary expects a mapping parameter -> transform, got "
                f"{type(param_to_transform).__name__}"
            )
        for key, value in param_to_transform.items():
            if not isinstance(key, Tensor):
                raise TypeError(f"TransformDictionary keys must be parameters, got {key!r}")
            if not callable(value):
                raise TypeError(
                    f"TransformDictionary value for shape {tuple(key.shape)} "
                    f"is not a transform or factory: {value!r}"
                )
        if default is not None and not callable(default):
            raise TypeError(
                f"TransformDictionary default is not a transform or factory: {default!r}"
            )
        # Tensors hash by identity, which is exactly the lookup wanted here.
        self.param_to_transform = dict(param_to_transform)
        self.default = default

    def lookup(self, param: Tensor) -> TransformSpec:
        """The factory or transform registered for ``param``."""
        spec = self.param_to_transform.get(param, self.default)
        if spec is None:
            raise KeyError(
                f"TransformDictionary has no transform for the parameter of shape "
                f"{tuple(param.shape)} and no default"
            )
        return spec

    def __call__(self, param: Tensor) -> nn.Module:
        spec = self.lookup(param)
        return spec if isinstance(spec, nn.Module) else spec(param)
