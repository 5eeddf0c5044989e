"""The one meta-training loop: task slots, the meta-optimizer, evaluation cadence, checkpoints.

:class:`MetaLoop` meta-trains a shape-agnostic transform on tasks from a family with the
estimator its :class:`~compiledopt.meta.estimator.MetaConfig` names (truncated back-propagation,
PES or ES; :data:`~compiledopt.meta.estimator.ESTIMATORS`). Every meta-step it starts a new task
in each slot whose task finished (or diverged), asks the estimator for the meta-gradient, clips
its norm to ``clip_norm`` and applies it with Adam. A step in which no slot finished, or whose
gradient is not finite, leaves the weights untouched (counted in ``skipped_steps``); a slot whose
meta-objective is not finite is counted in ``skipped_tasks`` and starts a new task.

Under ``torch.distributed`` the slots are split across ranks (slot ``i`` on rank
``i % world``), the weights start from rank 0's and the estimates are summed, so N processes make
exactly the updates of one process running every slot. Checkpoints hold everything a resumed run
needs to continue exactly, as tensors, numbers and strings (loaded with ``weights_only=True``).
"""

import dataclasses
import math
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, TypeVar

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from compiledopt.meta.estimator import ESTIMATORS, Estimate, MetaConfig, Slot
from compiledopt.meta.inner import check_rules, check_shape_agnostic
from compiledopt.meta.processes import distributed
from compiledopt.meta.resume import RESUMABLE_CHANGES
from compiledopt.tasks.base import TaskFamily
from compiledopt.transforms.base import Transform

__all__ = ["CHECKPOINT_FORMAT", "MetaLoop", "MetaResult"]

#: Format 2: one checkpoint layout for every estimator, settings under :class:`MetaConfig` names.
CHECKPOINT_FORMAT = 2
T = TypeVar("T")


@dataclass
class MetaResult:
    """What a run produced.

    Attributes:
        history: one record per meta-step: ``step``, ``loss`` (the mean meta-objective of the
            slots that finished; ``nan`` if none did), ``grad_norm`` (before clipping), ``applied``
            (1.0 if the weights were updated) and ``skipped_tasks`` (so far).
        evaluations: one record per evaluation: ``step`` and the estimator's metrics
            (``final_loss`` among them).
        skipped_tasks, skipped_steps: non-finite tasks and meta-steps, over the whole run.
        meta_step: meta-steps done.
        elapsed: seconds spent training and evaluating, summed over resumed runs.
        stopped: whether the run stopped early, when ``train``'s ``stop`` asked.
    """

    history: List[Dict[str, float]]
    evaluations: List[Dict[str, float]]
    skipped_tasks: int
    skipped_steps: int
    meta_step: int
    elapsed: float
    stopped: bool = False


class MetaLoop:
    """Meta-trains ``transform`` on tasks from ``family`` (see the module docstring).

    Args:
        transform (Transform): a shape-agnostic transform (``shape_agnostic = True``); it holds
            the trained weights after :meth:`train`.
        family (TaskFamily): where training and held-out tasks come from.
        config (MetaConfig, optional): the run's settings. (default: ``MetaConfig()``: tbptt)
        metadata (dict, optional): saved with every checkpoint, e.g. the transform's catalog spec
            ``{"name": ..., "kwargs": ...}`` (numbers, strings, lists and dicts only).

    Example:
        >>> loop = MetaLoop(CoordinateMLP(), RegressionFamily(seed=0),
        ...                 MetaConfig(estimator="pes", meta_steps=100))
        >>> result = loop.train(checkpoint="run.pt")
    """

    def __init__(
        self,
        transform: Transform,
        family: TaskFamily,
        config: Optional[MetaConfig] = None,
        metadata: Optional[Dict[str, Any]] = None,
    ) -> None:
        self.transform = check_shape_agnostic(transform, "MetaLoop")
        if not isinstance(family, TaskFamily):
            raise TypeError(f"MetaLoop expects a TaskFamily, got {type(family).__name__}")
        self.family = family
        self.config = (config or MetaConfig()).validate()
        self.metadata = dict(metadata or {})
        check_rules(self.transform, self.config.routes, "routes")
        self.transform.to(family.device)
        self.rank, self.world = (
            (dist.get_rank(), dist.get_world_size()) if distributed() else (0, 1)
        )
        if distributed():
            for weight in self.transform.parameters():
                dist.broadcast(weight.data, src=0)
        self.estimator = ESTIMATORS[self.config.estimator](self.transform, family, self.config)
        self.meta_optimizer = torch.optim.Adam(self.estimator.weights, lr=self.config.meta_lr)
        self.slots = [Slot(i) for i in range(self.rank, self.config.tasks_per_step, self.world)]
        self.meta_step = 0
        self.history: List[Dict[str, float]] = []
        self.evaluations: List[Dict[str, float]] = []
        self.skipped_tasks = 0
        self.skipped_steps = 0
        self.elapsed = 0.0

    # -- the meta-step ------------------------------------------------------------------------

    def _start(self, slot: Slot, fresh: bool = True) -> None:
        """Give ``slot`` its next task (``fresh=False``: rebuild the task it had, on resume)."""
        if fresh:
            slot.generation += 1
            slot.inner_step = 0
        index = slot.generation * self.config.tasks_per_step + slot.slot_id
        slot.task = self.family.sample(index, "train")
        slot.horizon = self.estimator.horizon(slot)
        self.estimator.start(slot, fresh)

    def estimate(self) -> Estimate:
        """Advance every slot by one truncation and leave the meta-gradient estimate in the
        ``.grad`` of ``estimator.weights``; the weights are not changed."""
        self.meta_optimizer.zero_grad(set_to_none=False)
        for slot in self.slots:
            if slot.task is None or slot.inner_step >= slot.horizon:
                self._start(slot)
        estimate = self.estimator.estimate(self.slots)
        self.skipped_tasks += estimate.skipped
        return estimate

    def step(self) -> Dict[str, float]:
        """One meta-update; returns its record (see :class:`MetaResult`)."""
        estimate = self.estimate()
        record = {"step": self.meta_step + 1, "loss": math.nan, "grad_norm": math.nan}
        applied = False
        if estimate.tasks:
            norm = torch.nn.utils.clip_grad_norm_(self.estimator.weights, self.config.clip_norm)
            applied = bool(torch.isfinite(norm))
            record.update(loss=estimate.loss / estimate.tasks, grad_norm=float(norm))
        if applied:
            self.meta_optimizer.step()
        else:
            self.skipped_steps += 1
        self.meta_step += 1
        record.update(applied=float(applied), skipped_tasks=float(self.skipped_tasks))
        self.history.append(record)
        return record

    def evaluate(self) -> Dict[str, float]:
        """The estimator's held-out metrics of the current weights, recorded with the step."""
        record = {"step": self.meta_step, **self.estimator.evaluate()}
        self.evaluations.append(record)
        return record

    # -- the run --------------------------------------------------------------------------------

    def _timed(self, work: Callable[[], T]) -> T:
        started = time.perf_counter()
        try:
            return work()
        finally:
            self.elapsed += time.perf_counter() - started

    def train(
        self,
        checkpoint: Optional[str] = None,
        progress: bool = True,
        stop: Optional[Callable[[], bool]] = None,
    ) -> MetaResult:
        """Run until ``config.meta_steps`` meta-steps are done (a resumed run counts those done),
        evaluating at the start and every ``eval_every`` steps and saving to ``checkpoint`` every
        ``checkpoint_every`` steps and at the end; the transform then holds the trained weights.

        ``stop`` (e.g. a :class:`~compiledopt.meta.stopping.StopRequest`) is asked after every
        meta-step; once it answers ``True`` the run ends there, checkpointed, as if that were
        its last step (``stopped`` in the result). Under ``torch.distributed`` the ranks agree
        (any rank's request stops all at the same step), so every rank must pass one."""
        cfg = self.config
        stopped = False
        assert cfg.meta_steps is not None
        bar = tqdm(
            total=cfg.meta_steps,
            initial=self.meta_step,
            desc=f"meta-train ({cfg.estimator})",
            disable=not progress or self.rank != 0,
        )
        with bar:
            if cfg.eval_every and self.meta_step == 0 and not self.evaluations:
                self._timed(self.evaluate)  # the starting point of the held-out curve
            while self.meta_step < cfg.meta_steps:
                record = self._timed(self.step)
                bar.update(1)
                postfix = {"loss": f"{record['loss']:.4g}"}
                if cfg.eval_every and self.meta_step % cfg.eval_every == 0:
                    postfix["heldout"] = f"{self._timed(self.evaluate)['final_loss']:.4g}"
                bar.set_postfix(postfix)
                if checkpoint and cfg.checkpoint_every:
                    if self.meta_step % cfg.checkpoint_every == 0:
                        self.save(checkpoint)
                if stop is not None and self._agreed(stop()):
                    stopped = self.meta_step < cfg.meta_steps
                    break
        self.estimator.write_weights()
        if checkpoint:
            self.save(checkpoint)
        return MetaResult(
            self.history,
            self.evaluations,
            self.skipped_tasks,
            self.skipped_steps,
            self.meta_step,
            self.elapsed,
            stopped,
        )

    def _agreed(self, request: bool) -> bool:
        """``request``, or any rank's under ``torch.distributed``."""
        if self.world == 1:
            return bool(request)
        flag = torch.tensor([1.0 if request else 0.0], device=self.family.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)

    # -- checkpoints ----------------------------------------------------------------------------

    def state_dict(self) -> Dict[str, Any]:
        """Everything needed to resume exactly (tensors, numbers and strings). ``"transform"``
        holds the transform's state dict at the current weights (what ``compiledopt export``
        reads)."""
        self.estimator.write_weights()
        return {
            "format": CHECKPOINT_FORMAT,
            "estimator": self.config.estimator,
            "config": dataclasses.asdict(self.config),
            "family": {"name": self.family.name, "seed": self.family.seed},
            "transform_class": type(self.transform).__name__,
            "metadata": self.metadata,
            "transform": self.transform.state_dict(),
            "meta_optimizer": self.meta_optimizer.state_dict(),
            "meta_step": self.meta_step,
            "skipped_tasks": self.skipped_tasks,
            "skipped_steps": self.skipped_steps,
            "elapsed": self.elapsed,
            "history": self.history,
            "evaluations": self.evaluations,
            "world": self.world,
            "slots": [
                {
                    "slot_id": s.slot_id,
                    "generation": s.generation,
                    "inner_step": s.inner_step,
                    "active": s.task is not None,
                    "params": s.params,
                    "states": s.states,
                    "memory": s.memory,
                }
                for s in self.slots
            ],
        }

    def _check_compatible(self, state: Dict[str, Any]) -> None:
        """Refuse a checkpoint of another format, estimator, family, transform or slot layout."""
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(
                f"unknown checkpoint format {state.get('format')!r} (expected "
                f"{CHECKPOINT_FORMAT}; a checkpoint of an older compiledopt can be exported but "
                "not resumed)"
            )
        mine = {
            "estimator": self.config.estimator,
            "family": {"name": self.family.name, "seed": self.family.seed},
            "transform_class": type(self.transform).__name__,
            "world": self.world,
        }
        for key, value in mine.items():
            if state.get(key) != value:
                raise ValueError(
                    f"checkpoint {key} {state.get(key)!r} differs from this run's {value!r}"
                )
        if [s["slot_id"] for s in state["slots"]] != [s.slot_id for s in self.slots]:
            raise ValueError("checkpoint was written with a different task-slot layout")

    def load_state_dict(self, state: Dict[str, Any], allow_changes: Sequence[str] = ()) -> None:
        """Resume from :meth:`state_dict`. Refuses a run of another estimator, family, transform
        or slot layout, and one whose config differs from the checkpoint's in a setting that is
        neither in :data:`~compiledopt.meta.resume.RESUMABLE_CHANGES` nor in ``allow_changes``
        (the message names each such setting with both values). The changes accepted are
        appended to ``metadata["config_changes"]``, so the checkpoint records what ran."""
        self._check_compatible(state)
        changes = self._config_changes(state["config"], allow_changes)
        self.transform.load_state_dict(state["transform"])
        self.estimator.read_weights()
        self.meta_optimizer.load_state_dict(state["meta_optimizer"])
        for group in self.meta_optimizer.param_groups:  # the lr of this run, not the saved one
            group["lr"] = self.config.meta_lr
        self.meta_step = int(state["meta_step"])
        history = list((state.get("metadata") or {}).get("config_changes", []))
        if history or changes:
            self.metadata["config_changes"] = history + [
                {"meta_step": self.meta_step, **change} for change in changes
            ]
        self.skipped_tasks = int(state["skipped_tasks"])
        self.skipped_steps = int(state["skipped_steps"])
        self.elapsed = float(state["elapsed"])
        self.history = list(state["history"])
        self.evaluations = list(state["evaluations"])
        device = self.family.device
        for slot, saved in zip(self.slots, state["slots"]):
            slot.generation = int(saved["generation"])
            slot.inner_step = int(saved["inner_step"])
            slot.task = None
            if saved["active"]:
                self._start(slot, fresh=False)
                slot.params = {n: v.to(device) for n, v in saved["params"].items()}
                slot.states = {n: [s.to(device) for s in v] for n, v in saved["states"].items()}
                slot.memory = dict(saved["memory"])

    def _config_changes(
        self, saved: Dict[str, Any], allow_changes: Sequence[str]
    ) -> List[Dict[str, Any]]:
        mine = dataclasses.asdict(self.config)
        unknown = sorted(set(allow_changes) - set(mine))
        if unknown:
            raise ValueError(f"allow_changes: unknown config fields {unknown}")
        changes = [
            {"setting": name, "from": value, "to": mine[name]}
            for name, value in saved.items()
            if name in mine and value != mine[name]
        ]
        allowed = set(RESUMABLE_CHANGES) | set(allow_changes)
        refused = [c for c in changes if c["setting"] not in allowed]
        if refused:
            raise ValueError(
                "checkpoint config differs from this run's: "
                + "; ".join(f"{c['setting']} {c['from']!r} -> {c['to']!r}" for c in refused)
                + " (allow_changes names the settings a resumed run may change)"
            )
        return changes

    def save(self, path: str) -> str:
        """Write a checkpoint atomically. Under torch.distributed every rank writes its own
        ``path.rank<r>`` (its slots; what :meth:`load` resumes from) and rank 0 also writes
        ``path`` (the weights for ``compiledopt export``); returns the first path written."""
        state = self.state_dict()
        targets = [path] if self.world == 1 else [f"{path}.rank{self.rank}"]
        if self.world > 1 and self.rank == 0:
            targets.append(path)
        for target in targets:
            tmp = f"{target}.tmp"
            torch.save(state, tmp)
            os.replace(tmp, target)
        return targets[0]

    def load(self, path: str, allow_changes: Sequence[str] = ()) -> None:
        """Resume from :meth:`save`'s file (never unpickles arbitrary objects); ``allow_changes``
        as in :meth:`load_state_dict`."""
        source = path if self.world == 1 else f"{path}.rank{self.rank}"
        state = torch.load(source, map_location="cpu", weights_only=True)
        self.load_state_dict(state, allow_changes)
