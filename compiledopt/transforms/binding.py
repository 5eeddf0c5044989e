"""Binding a transform specification to a list of parameters."""

from typing import List, Sequence

from torch import Tensor, nn

from compiledopt.transforms.base import Transform
from compiledopt.transforms.dictionary import TransformDictionary
from compiledopt.transforms.module import ReshapedTransform


def _as_transform(made: object, maker: object, name: str, param: Tensor) -> Transform:
    if isinstance(made, Transform):
        return made
    if isinstance(made, nn.Module):
        # A plain module maps a gradient to an update of the same shape.
        return ReshapedTransform(made, shape=param.shape, param_shape=param.shape)
    raise TypeError(
        f"the transform factory {maker!r} returned {type(made).__name__} for parameter "
        f"{name!r} of shape {tuple(param.shape)}; expected an nn.Module"
    )


def bind_transforms(
    transform: object, params: Sequence[Tensor], names: Sequence[str]
) -> List[Transform]:
    """One :class:`Transform` per parameter, from ``transform``.

    ``transform`` is either a transform module shared by every parameter (shape-agnostic
    transforms), a factory called once per parameter (``ModuleTransform``, ``KroneckerTransform``,
    ``MetaCurvatureTransform``, any ``callable(param) -> nn.Module``), or a
    :class:`TransformDictionary`. A plain ``nn.Module`` (not a :class:`Transform`) is used as a
    stateless map from the gradient to the direction.
    """
    bound: List[Transform] = []
    for name, param in zip(names, params):
        if isinstance(transform, TransformDictionary):
            spec = transform.lookup(param)
            made = spec if isinstance(spec, nn.Module) else spec(param)
        elif isinstance(transform, nn.Module):
            made = transform
        elif callable(transform):
            made = transform(param)
        else:
            raise TypeError(
                f"transform must be an nn.Module or a factory callable(param) -> nn.Module, "
                f"got {type(transform).__name__}"
            )
        bound.append(_as_transform(made, transform, name, param))
    return bound
