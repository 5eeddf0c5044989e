"""An exported graph run on a large tensor a slice of rows at a time, where its rule is pointwise.

An exported graph (TorchScript, ONNX, AOTInductor) computes a whole tensor in one call, so its
temporaries are the tensor's size: onnxruntime's, for the Adam-like rule on a 10M-element vector,
came to twice the optimizer state on top of the outputs. Where the transform says its rule is
pointwise at the tensor's rank (:meth:`Transform.pointwise
<compiledopt.transforms.Transform.pointwise>`), rows ``a:b`` of the update are the update of rows
``a:b``, so :class:`RowSlices` calls the graph on slices of at most :data:`SLICE_ELEMENTS`
elements and writes each result into whole-tensor outputs: the graph's temporaries are a slice's
size and the results are the same values (each coordinate is computed by the same graph from the
same inputs).

The same property lets many small parameters of one shape share one call, stacked into one flat
vector for the rank-1 graph (the exported backends' buckets, see
:class:`~compiledopt.runtime.strategies.TensorStrategy`), so a model's many biases and norm gains
cost one graph call instead of one each.
"""

from typing import Callable, List, Optional, Tuple

from torch import Tensor

from compiledopt.transforms.base import Transform

__all__ = ["SLICE_ELEMENTS", "RowSlices"]

#: The most elements of one slice: 1 MiB of float32, so a slice's inputs, outputs and
#: temporaries together stay a few MiB.
SLICE_ELEMENTS = 1 << 18


class RowSlices:
    """``rule(grad, param, state, step) -> (direction, new_state)`` computed on slices of rows of
    a large tensor where ``transform`` is pointwise at its rank (and every state tensor has the
    parameter's shape); any other call goes to ``rule`` whole.

    Args:
        rule (callable): an exported graph's runner, with :meth:`Transform.update`'s signature.
        transform (Transform): the transform the graph was exported from.
        elements (int, optional): the most elements of one slice. (default:
            :data:`SLICE_ELEMENTS`)
    """

    def __init__(
        self, rule: Callable, transform: Transform, elements: int = SLICE_ELEMENTS
    ) -> None:
        self.rule = rule
        self.transform = transform
        self.elements = elements

    def __call__(
        self, grad: Tensor, param: Tensor, state: List[Tensor], step: Tensor
    ) -> Tuple[Tensor, List[Tensor]]:
        rows = self._rows(grad, param, state)
        if rows is None:
            return self.rule(grad, param, state, step)
        direction: Optional[Tensor] = None
        new_state: List[Tensor] = []
        length = grad.shape[0]
        for start in range(0, length, rows):
            end = min(start + rows, length)
            part, part_state = self.rule(
                grad[start:end], param[start:end], [s[start:end] for s in state], step
            )
            if direction is None:  # the outputs take the graph's dtypes
                direction = part.new_empty(grad.shape)
                new_state = [s.new_empty(grad.shape) for s in part_state]
            _write(direction, start, end, part, "direction")
            if len(part_state) != len(new_state):
                raise RuntimeError(
                    f"the rule returned {len(part_state)} state tensors for rows {start}:{end}, "
                    f"{len(new_state)} for the first rows"
                )
            for k, (whole, value) in enumerate(zip(new_state, part_state)):
                _write(whole, start, end, value, f"state tensor {k}")
        assert direction is not None  # length > 0: a large tensor has rows
        return direction, new_state

    def _rows(self, grad: Tensor, param: Tensor, state: List[Tensor]) -> Optional[int]:
        """Rows per slice, or ``None`` to compute the tensor whole: a small tensor, a scalar, a
        rank the transform is not pointwise at, or a state tensor not of the parameter's
        shape."""
        numel = grad.numel()
        if numel <= self.elements or grad.dim() == 0 or not self.transform.pointwise(grad.dim()):
            return None
        if param.shape != grad.shape or any(s.shape != grad.shape for s in state):
            return None
        per_row = numel // grad.shape[0]
        return max(1, self.elements // per_row)


def _write(whole: Tensor, start: int, end: int, value: Tensor, what: str) -> None:
    """``whole[start:end] = value``, refusing a value of another shape (``copy_`` would
    broadcast it silently)."""
    target = whole[start:end]
    if value.shape != target.shape:
        raise RuntimeError(
            f"the rule returned a {what} of shape {tuple(value.shape)} for rows {start}:{end} of "
            f"a tensor of shape {tuple(whole.shape)} (expected {tuple(target.shape)}): it is not "
            "pointwise as its transform says"
        )
    target.copy_(value)
