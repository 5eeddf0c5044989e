"""Distributed (``DTensor``) parameters in a FrozenOptimizer step."""

from torch import Tensor

__all__ = ["is_distributed"]


def is_distributed(tensor: Tensor) -> bool:
    """Whether ``tensor`` is a ``DTensor`` (a shard of a logical tensor spread over a mesh)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed support
        return False
    return isinstance(tensor, DTensor)
