"""The contract of a meta-gradient estimator, the one config of a meta-training run, and the
registry of estimators.

A run (:class:`~compiledopt.meta.loop.MetaLoop`) keeps ``tasks_per_step`` task *slots*, each
training one task from a family for ``horizon`` inner steps, and on every meta-step asks its
:class:`Estimator` for the gradient of a meta-objective with respect to the transform's weights.
The loop owns everything the estimators share: the slots and their split over
``torch.distributed`` ranks, sampling a slot's next task, the meta-optimizer (Adam, with the
gradient's norm clipped), evaluation cadence, checkpoints and resuming. An estimator owns how the
gradient is estimated, what one slot's task needs beside its parameters and states, and how the
transform is evaluated on held-out tasks.

Adding an estimator is one file: a subclass of :class:`Estimator` decorated with
:func:`register_estimator`, imported by ``compiledopt/meta/__init__.py``. Its ``DEFAULTS`` name the
settings of :class:`MetaConfig` it reads beyond the shared ones, with their default values.
"""

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Dict, List, Optional, Sequence, Type

from torch import Tensor

from compiledopt._validation import check_fields
from compiledopt.meta.inner import Params, States, check_routes
from compiledopt.tasks.base import Task, TaskFamily
from compiledopt.transforms.base import Transform

POSITIVE_INTS = (
    "meta_steps",
    "unroll",
    "horizon",
    "min_horizon",
    "tasks_per_step",
    "eval_tasks",
    "eval_steps",
    "pairs",
)

__all__ = ["ESTIMATORS", "Estimate", "Estimator", "MetaConfig", "Slot", "register_estimator"]

#: Estimator name -> class (:func:`register_estimator` adds to it).
ESTIMATORS: Dict[str, Type["Estimator"]] = {}


@dataclass
class MetaConfig:
    """Settings of a meta-training run, with one set of names for every estimator (those of
    ``compiledopt train``'s options and ``--config`` keys). A setting left ``None`` takes the
    estimator's default (its :attr:`Estimator.DEFAULTS`); one the estimator does not read must
    stay ``None``. :meth:`validate` fills the defaults in and checks every value.

    Attributes:
        estimator: the meta-gradient estimator (a key of :data:`ESTIMATORS`: ``"tbptt"``,
            ``"pes"``, ``"es"``).
        meta_steps: meta-updates of the transform's weights.
        unroll: inner steps per truncation (one meta-step advances every slot by this many).
        horizon: inner steps a task runs before its slot gets a new one (pes, es: the longest).
        min_horizon: pes, es: the shortest task; lengths are drawn log-uniformly in
            ``[min_horizon, horizon]`` and rounded to a multiple of ``unroll``.
        tasks_per_step: task slots whose estimates are averaged per meta-update.
        inner_lr: the inner learning rate (pes, es: the peak of a warm-up + cosine schedule).
        meta_lr: Adam's learning rate on the transform's weights.
        clip_norm: the meta-gradient's norm is clipped to this.
        eval_every: evaluate on held-out tasks every this many meta-steps (0: never).
        eval_tasks, eval_steps: held-out tasks per evaluation and their inner steps.
        checkpoint_every: save a checkpoint every this many meta-steps (0: only at the end).
        routes: the rule of each parameter role (roles left out: ``"artifact"``), or ``None``:
            every parameter gets the transform as configured.
        seed: seeds the estimator's random draws (perturbations, task lengths).
        second_order: tbptt: differentiate through the inner gradients too.
        pairs, antithetic, sigma, objective, warmup_fraction: pes, es (see
            :mod:`compiledopt.meta.es`).
    """

    estimator: str = "tbptt"
    meta_steps: Optional[int] = None
    unroll: Optional[int] = None
    horizon: Optional[int] = None
    min_horizon: Optional[int] = None
    tasks_per_step: int = 4
    inner_lr: Optional[float] = None
    meta_lr: float = 3e-3
    clip_norm: float = 1.0
    eval_every: Optional[int] = None
    eval_tasks: int = 4
    eval_steps: Optional[int] = None
    checkpoint_every: Optional[int] = None
    routes: Optional[Dict[str, str]] = None
    seed: int = 0
    second_order: Optional[bool] = None
    pairs: Optional[int] = None
    antithetic: Optional[bool] = None
    sigma: Optional[float] = None
    objective: Optional[str] = None
    warmup_fraction: Optional[float] = None

    def validate(self) -> "MetaConfig":
        """Fill in the estimator's defaults and check every setting (each error names it)."""
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"Invalid estimator: {self.estimator!r} (one of {list(ESTIMATORS)})")
        estimator = ESTIMATORS[self.estimator]
        for name, default in estimator.DEFAULTS.items():
            if getattr(self, name) is None:
                setattr(self, name, default)
        for name in OPTIONAL:
            value = getattr(self, name)
            if name not in estimator.DEFAULTS and value is not None:
                readers = [n for n, e in ESTIMATORS.items() if name in e.DEFAULTS]
                raise ValueError(
                    f"Invalid {name}: {value!r} (read by the {', '.join(readers)} estimator "
                    f"only, not by {self.estimator!r}; leave it unset)"
                )
        used = lambda names: tuple(n for n in names if getattr(self, n) is not None)  # noqa: E731
        check_fields(
            self,
            positive_ints=used(POSITIVE_INTS),
            non_negative_ints=("eval_every", "checkpoint_every", "seed"),
            positive_numbers=used(("inner_lr", "meta_lr", "clip_norm", "sigma")),
        )
        for name in ("second_order", "antithetic"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), bool):
                raise ValueError(f"Invalid {name}: {getattr(self, name)!r} (True or False)")
        self.routes = check_routes(self.routes)
        estimator.check(self)
        return self

    @classmethod
    def from_dict(cls, values: Dict[str, Any]) -> "MetaConfig":
        """Build and validate from a dict, refusing unknown keys (naming them)."""
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"Unknown meta-training settings: {unknown} (known: {known})")
        return cls(**values).validate()


#: The settings whose default depends on the estimator (``None`` in a fresh :class:`MetaConfig`).
OPTIONAL = tuple(
    f.name for f in dataclasses.fields(MetaConfig) if f.default is None and f.name != "routes"
)


@dataclass
class Slot:
    """One task being trained across meta-steps.

    Attributes:
        slot_id: the slot's index in ``range(tasks_per_step)``.
        generation: how many tasks the slot has started, less one; its task is sample
            ``generation * tasks_per_step + slot_id`` of the family's training tasks.
        inner_step: inner steps the task has run.
        horizon: inner steps the task runs in all.
        task: the task (``None``: start a new one before the next meta-step).
        params, states: the task's parameters and the transform's states, as the estimator
            keeps them (saved in checkpoints).
        memory: tensors the estimator carries across meta-steps (saved in checkpoints).
        context: what the estimator builds for the task (rebuilt on resume, never saved).
    """

    slot_id: int
    generation: int = -1
    inner_step: int = 0
    horizon: int = 0
    task: Optional[Task] = None
    params: Params = field(default_factory=dict)
    states: States = field(default_factory=dict)
    memory: Dict[str, Tensor] = field(default_factory=dict)
    context: Any = None


@dataclass
class Estimate:
    """What one call of :meth:`Estimator.estimate` found, summed over processes.

    Attributes:
        loss: the sum over finished slots of their meta-objective.
        tasks: slots that finished (their meta-objective was finite).
        skipped: slots of this process whose meta-objective was not finite (their task is
            dropped and the slot starts a new one).
    """

    loss: float
    tasks: int
    skipped: int


class Estimator:
    """Estimates the meta-gradient of the transform's weights from the task slots.

    Subclasses set ``DEFAULTS`` and implement :meth:`start`, :meth:`estimate` and
    :meth:`evaluate`; the other methods have defaults.

    Args:
        transform (Transform): the shape-agnostic transform being meta-trained.
        family (TaskFamily): where the held-out tasks for :meth:`evaluate` come from.
        config (MetaConfig): the run's validated settings.
    """

    #: Setting -> default of the settings this estimator reads beyond the shared ones.
    DEFAULTS: ClassVar[Dict[str, Any]] = {}

    def __init__(self, transform: Transform, family: TaskFamily, config: MetaConfig) -> None:
        self.transform = transform
        self.family = family
        self.config = config

    @classmethod
    def check(cls, config: MetaConfig) -> None:
        """Check how the settings relate (each is already checked on its own)."""

    @property
    def weights(self) -> List[Tensor]:
        """The tensors the meta-optimizer updates (their ``.grad`` holds the estimate)."""
        return list(self.transform.parameters())

    def horizon(self, slot: Slot) -> int:
        """How many inner steps the slot's new task runs (default: ``config.horizon``)."""
        assert self.config.horizon is not None
        return self.config.horizon

    def start(self, slot: Slot, fresh: bool) -> None:
        """Build ``slot.context`` for ``slot.task``; when ``fresh`` (not resumed) also the task's
        initial ``params``, ``states`` and ``memory``."""
        raise NotImplementedError

    def estimate(self, slots: Sequence[Slot]) -> Estimate:
        """Advance every slot by one truncation and put the meta-gradient estimate, summed over
        processes, into the ``.grad`` of :attr:`weights` (zeroed by the caller)."""
        raise NotImplementedError

    def evaluate(self) -> Dict[str, float]:
        """Held-out metrics of the current weights; ``"final_loss"`` among them."""
        raise NotImplementedError

    def write_weights(self) -> None:
        """Copy :attr:`weights` into the transform, if they are not its own parameters."""

    def read_weights(self) -> None:
        """Copy the transform's parameters into :attr:`weights` (after a checkpoint loads)."""


def register_estimator(*names: str) -> Callable[[Type[Estimator]], Type[Estimator]]:
    """Class decorator: register an :class:`Estimator` under ``names``."""

    def register(cls: Type[Estimator]) -> Type[Estimator]:
        for name in names:
            if name in ESTIMATORS:
                raise ValueError(f"an estimator named {name!r} is already registered")
            ESTIMATORS[name] = cls
        return cls

    return register
