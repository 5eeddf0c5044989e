"""A step's outcome before anything is written: what a strategy computed, what must be found
finite, and the state writes held back for the optimizer's decision."""

from typing import Any, Callable, Container, Dict, List, NamedTuple, Tuple

from torch import Tensor

from compiledopt.runtime.state import STEP

__all__ = ["Computed", "Result", "State"]

State = Dict[str, Tensor]


class Result(NamedTuple):
    """One parameter's outcome of a step: its direction (in the compute dtype) and its new state
    (every entry of ``optimizer.state[param]``, ``step`` advanced)."""

    direction: Tensor
    state: State


class Computed(NamedTuple):
    """A step's outcome before anything is written: each active parameter's checked
    :class:`Result` by index, what the optimizer must find finite before it writes:
    ``(tensor, members, what)`` entries, ``tensor`` holding one slice per member along its first
    dimension (a single parameter's tensor is its own slice; a boolean tensor holds the flags
    themselves, ``what`` then the ``(tensor, name)`` pairs they were taken on, see
    :func:`~compiledopt.runtime.skips.groups_to_skip`), and the writes of batched states
    (``(members, write)``: ``write(rows)`` stores the new state of ``members[j]`` for each ``j``
    of ``rows``), left to :meth:`commit` once the optimizer has decided. A batched member's
    :class:`Result` state is the store's own tensors, whose values change at the commit."""

    results: Dict[int, Result]
    checks: List[Tuple[Tensor, Tuple[int, ...], Any]]
    commits: List[Tuple[Tuple[int, ...], Callable[[List[int]], None]]]

    def commit(self, written: Container[int]) -> None:
        """Write the new states held back for the optimizer's decision (a bucket's, see
        :class:`~compiledopt.runtime.bucket_store.BucketStore`) of the parameters ``written``."""
        for members, write in self.commits:
            rows = [j for j, i in enumerate(members) if i in written]
            if rows:
                write(rows)

    def extend(self, other: "Computed") -> None:
        self.results.update(other.results)
        self.checks.extend(other.checks)
        self.commits.extend(other.commits)

    def add(self, tensor: Tensor, members: Tuple[int, ...], what: Any) -> None:
        self.checks.append((tensor, tuple(members), what))

    def add_state(self, members: Tuple[int, ...], state: State) -> None:
        for key, value in state.items():
            if key != STEP and value.is_floating_point():
                self.add(value, members, f"new state {key!r}")
