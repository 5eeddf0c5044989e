"""Meta-training shape-agnostic transforms by truncated back-propagation through unrolls.

Each meta-step runs, for every task slot, ``unroll_length`` inner steps of the transform on the
slot's task, carrying on from where the previous meta-step left that task, and back-propagates the
**meta-loss** — the mean inner training loss at the parameters reached after each of the unroll's
steps, ``(1/K) Σ_{k=1..K} L(θ_k; batch_k)`` — to the transform's weights. Parameters and transform
state are detached between unrolls (truncation), and a slot's task is resampled once it has run
``horizon`` inner steps. By default the gradients fed to the transform are treated as constants
(``second_order=False``: no Hessian-vector products, as in Andrychowicz et al. 2016).

With ``routes`` (parameter role -> rule of the transform) each parameter is updated by the rule
of its role, a variant of the transform sharing its weights, so the meta-gradient reaches the
weights through every rule.

Meta-gradients are averaged over ``tasks_per_step`` tasks, clipped to ``clip_norm``, and applied
with Adam. A non-finite meta-loss skips that task (its slot gets a fresh task) and a non-finite
meta-gradient skips the whole meta-step: both are counted, and the weights are never touched by a
non-finite value. Under ``torch.distributed`` the task slots are split across ranks and the
meta-gradients are summed with an all-reduce, so N processes compute exactly the meta-gradient of
one process running all the slots.
"""

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor
from tqdm.auto import tqdm

from compiledopt._validation import check_fields
from compiledopt.meta.inner import (
    Params,
    States,
    apply_transform,
    check_routes,
    check_rules,
    check_shape_agnostic,
    detach,
    evaluate_curve,
    init_states,
    routed_transforms,
    task_gradients,
)
from compiledopt.meta.processes import distributed
from compiledopt.meta.resume import TBPTT_FIELDS, resumable_fields
from compiledopt.tasks.base import Task, TaskFamily
from compiledopt.transforms.base import Transform

CHECKPOINT_FORMAT = 1
#: The config fields a resumed run may change: how long it runs and how it is monitored
#: (:data:`compiledopt.meta.resume.RESUMABLE_CHANGES`).
RESUMABLE_CHANGES = resumable_fields(TBPTT_FIELDS)


@dataclass
class MetaTrainConfig:
    """Settings of a meta-training run (all validated by :meth:`validate`).

    Attributes:
        meta_steps: number of meta-updates.
        unroll_length: inner steps per truncated unroll (``K``).
        horizon: inner steps a task runs before its slot gets a new task.
        tasks_per_step: tasks whose meta-gradients are averaged per meta-update.
        inner_lr: the lr multiplying the transform's direction in the inner loop.
        meta_lr: Adam's learning rate on the transform's weights.
        clip_norm: the meta-gradient's global norm is clipped to this.
        second_order: differentiate through the inner gradients too (Hessian-vector products).
        eval_every: evaluate on held-out tasks every this many meta-steps (0: never).
        eval_tasks: number of held-out tasks per evaluation.
        eval_steps: inner steps per evaluation task.
        checkpoint_every: save a checkpoint every this many meta-steps (0: only at the end).
        routes: the rule of each parameter role (roles left out: ``"artifact"``), or ``None``:
            every parameter gets the transform as configured.
    """

    meta_steps: int = 200
    unroll_length: int = 10
    horizon: int = 100
    tasks_per_step: int = 4
    inner_lr: float = 1.0
    meta_lr: float = 3e-3
    clip_norm: float = 1.0
    second_order: bool = False
    eval_every: int = 50
    eval_tasks: int = 4
    eval_steps: int = 50
    checkpoint_every: int = 0
    routes: Optional[Dict[str, str]] = None

    def validate(self) -> "MetaTrainConfig":
        check_fields(
            self,
            positive_ints=(
                "meta_steps",
                "unroll_length",
                "horizon",
                "tasks_per_step",
                "eval_tasks",
                "eval_steps",
            ),
            non_negative_ints=("eval_every", "checkpoint_every"),
            positive_numbers=("inner_lr", "meta_lr", "clip_norm"),
        )
        if self.horizon % self.unroll_length:
            raise ValueError(
                f"Invalid horizon: {self.horizon} "
                f"(a multiple of unroll_length={self.unroll_length})"
            )
        self.routes = check_routes(self.routes)
        return self


@dataclass
class _Slot:
    """One task being optimized across meta-steps."""

    slot_id: int
    generation: int = -1
    inner_step: int = 0
    task: Optional[Task] = None
    params: Params = field(default_factory=dict)
    states: States = field(default_factory=dict)
    transforms: Optional[Mapping[str, Transform]] = None  # each parameter's, under routes


@dataclass
class MetaTrainResult:
    """What a run produced: per-step history, evaluations and skip counts."""

    history: List[Dict[str, float]]
    evaluations: List[Dict[str, float]]
    skipped_tasks: int
    skipped_steps: int
    meta_step: int


class MetaTrainer:
    """Meta-trains ``transform`` on tasks from ``family`` (see the module docstring).

    Args:
        transform (Transform): a shape-agnostic transform (``shape_agnostic = True``).
        family (TaskFamily): where training and held-out tasks come from.
        config (MetaTrainConfig, optional): the run's settings. (default: ``MetaTrainConfig()``)
        metadata (dict, optional): saved with every checkpoint, e.g. the transform's catalog spec
            ``{"name": ..., "kwargs": ...}`` (numbers, strings, lists and dicts only).
            (default: None)

    Example:
        >>> trainer = MetaTrainer(CoordinateMLP(), RegressionFamily(seed=0),
        ...                       MetaTrainConfig(meta_steps=100))
        >>> result = trainer.train(checkpoint="run.pt")
    """

    def __init__(
        self,
        transform: Transform,
        family: TaskFamily,
        config: Optional[MetaTrainConfig] = None,
        metadata: Optional[Dict[str, Any]] = None,
    ) -> None:
        self.transform = check_shape_agnostic(transform, "MetaTrainer")
        if not isinstance(family, TaskFamily):
            raise TypeError(f"MetaTrainer expects a TaskFamily, got {type(family).__name__}")
        self.family = family
        self.config = (config or MetaTrainConfig()).validate()
        self.metadata = dict(metadata or {})
        check_rules(self.transform, self.config.routes, "routes")
        self.transform.to(family.device)
        self.rank, self.world = (
            (dist.get_rank(), dist.get_world_size()) if distributed() else (0, 1)
        )
        if distributed():
            for weight in self.transform.parameters():
                dist.broadcast(weight.data, src=0)
        self.meta_optimizer = torch.optim.Adam(self.transform.parameters(), lr=self.config.meta_lr)
        slots = range(self.rank, self.config.tasks_per_step, self.world)
        self.slots = [_Slot(slot_id) for slot_id in slots]
        self.meta_step = 0
        self.history: List[Dict[str, float]] = []
        self.evaluations: List[Dict[str, float]] = []
        self.skipped_tasks = 0
        self.skipped_steps = 0

    # -- the meta-step ------------------------------------------------------------------------

    def _renew(self, slot: _Slot) -> None:
        slot.generation += 1
        index = slot.generation * self.config.tasks_per_step + slot.slot_id
        slot.task = self.family.sample(index, "train")
        slot.inner_step = 0
        slot.params = slot.task.init_params()
        slot.transforms = routed_transforms(self.transform, slot.task, self.config.routes)
        slot.states = init_states(self.transform, slot.params, slot.transforms)

    def _unroll(self, slot: _Slot) -> Optional[Tensor]:
        """Run one truncated unroll; return the meta-loss (or ``None`` if it was non-finite)."""
        cfg = self.config
        if slot.task is None or slot.inner_step >= cfg.horizon:
            self._renew(slot)
        task = slot.task
        assert task is not None
        params = {n: v.detach().requires_grad_() for n, v in slot.params.items()}
        states = slot.states
        losses = []
        for k in range(cfg.unroll_length + 1):
            step = slot.inner_step + k
            loss = task.loss(params, task.batch(step))
            if k > 0:
                losses.append(loss)
            if k == cfg.unroll_length:
                break
            grads = task_gradients(task, loss, params, cfg.second_order)
            if not cfg.second_order:
                grads = {n: g.detach() for n, g in grads.items()}
            params, states = apply_transform(
                self.transform, params, grads, states, step, cfg.inner_lr, slot.transforms
            )
        meta_loss = torch.stack(losses).mean()
        if not torch.isfinite(meta_loss):
            self.skipped_tasks += 1
            slot.task = None  # the task diverged: start a fresh one next time
            return None
        (meta_loss / cfg.tasks_per_step).backward()
        slot.params, slot.states = detach(params, states)
        slot.inner_step += cfg.unroll_length
        return meta_loss.detach()

    def step(self) -> Dict[str, float]:
        """One meta-update; returns its record (meta-loss, gradient norm, skips)."""
        self.meta_optimizer.zero_grad(set_to_none=False)
        total = torch.zeros((), dtype=torch.float64)
        finite = torch.zeros((), dtype=torch.float64)
        for slot in self.slots:
            meta_loss = self._unroll(slot)
            if meta_loss is not None:
                total += meta_loss.double().cpu()
                finite += 1
        weights = list(self.transform.parameters())
        if distributed():
            for weight in weights:
                dist.all_reduce(weight.grad)
            sums = torch.stack([total, finite])
            dist.all_reduce(sums)
            total, finite = sums[0], sums[1]
        norm = torch.nn.utils.clip_grad_norm_(weights, self.config.clip_norm)
        applied = bool(torch.isfinite(norm))
        if applied:
            self.meta_optimizer.step()
        else:
            self.skipped_steps += 1
        self.meta_step += 1
        record = {
            "meta_step": self.meta_step,
            "meta_loss": float(total / finite) if finite > 0 else math.nan,
            "grad_norm": float(norm),
            "applied": float(applied),
        }
        self.history.append(record)
        return record

    # -- evaluation -----------------------------------------------------------------------------

    def evaluate(self) -> Dict[str, float]:
        """Mean final and mean-over-steps loss on the held-out tasks."""
        curves = torch.stack(
            [
                evaluate_curve(
                    self.transform,
                    self.family.sample(i, "heldout"),
                    self.config.eval_steps,
                    self.config.inner_lr,
                    self.config.routes,
                )
                for i in range(self.config.eval_tasks)
            ]
        )
        record = {
            "meta_step": self.meta_step,
            "final_loss": float(curves[:, -1].mean()),
            "mean_loss": float(curves.mean()),
        }
        self.evaluations.append(record)
        return record

    # -- the run --------------------------------------------------------------------------------

    def train(self, checkpoint: Optional[str] = None, progress: bool = True) -> MetaTrainResult:
        """Run until ``config.meta_steps`` meta-steps are done (resuming counts those done)."""
        cfg = self.config
        bar = tqdm(
            total=cfg.meta_steps,
            initial=self.meta_step,
            desc="meta-train",
            disable=not progress or self.rank != 0,
        )
        with bar:
            while self.meta_step < cfg.meta_steps:
                record = self.step()
                bar.update(1)
                postfix = {"meta_loss": f"{record['meta_loss']:.4g}"}
                if cfg.eval_every and self.meta_step % cfg.eval_every == 0:
                    postfix["heldout"] = f"{self.evaluate()['final_loss']:.4g}"
                bar.set_postfix(postfix)
                if (
                    checkpoint
                    and cfg.checkpoint_every
                    and self.meta_step % cfg.checkpoint_every == 0
                ):
                    self.save(checkpoint)
        if checkpoint:
            self.save(checkpoint)
        return MetaTrainResult(
            self.history, self.evaluations, self.skipped_tasks, self.skipped_steps, self.meta_step
        )

    # -- checkpoints ----------------------------------------------------------------------------

    def state_dict(self) -> Dict[str, Any]:
        """Everything needed to resume exactly (tensors, numbers and strings only)."""
        return {
            "format": CHECKPOINT_FORMAT,
            "config": dataclasses.asdict(self.config),
            "family": {"name": self.family.name, "seed": self.family.seed},
            "transform_class": type(self.transform).__name__,
            "metadata": self.metadata,
            "transform": self.transform.state_dict(),
            "meta_optimizer": self.meta_optimizer.state_dict(),
            "meta_step": self.meta_step,
            "skipped_tasks": self.skipped_tasks,
            "skipped_steps": self.skipped_steps,
            "history": self.history,
            "evaluations": self.evaluations,
            "slots": [
                {
                    "slot_id": s.slot_id,
                    "generation": s.generation,
                    "inner_step": s.inner_step,
                    "active": s.task is not None,
                    "params": s.params,
                    "states": s.states,
                }
                for s in self.slots
            ],
        }

    def load_state_dict(self, state: Dict[str, Any], allow_changes: Sequence[str] = ()) -> None:
        """Resume from :meth:`state_dict`. Refuses a run of another family, transform or slot
        layout, and one whose config differs from the checkpoint's in a field that is neither
        in :data:`RESUMABLE_CHANGES` nor in ``allow_changes`` (the message names each such field
        with both values). The changes accepted are appended to ``metadata["config_changes"]``
        (with the history the checkpoint carried), so the checkpoint records what ran."""
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(
                f"unknown checkpoint format {state.get('format')!r} (expected {CHECKPOINT_FORMAT})"
            )
        if state.get("trainer", "tbptt") != "tbptt":
            raise ValueError(
                f"a {state.get('trainer')!r} checkpoint, not one of truncated back-propagation"
            )
        if state["family"] != {"name": self.family.name, "seed": self.family.seed}:
            raise ValueError(
                f"checkpoint was trained on {state['family']}, not on "
                f"{{'name': {self.family.name!r}, 'seed': {self.family.seed}}}"
            )
        if state["transform_class"] != type(self.transform).__name__:
            raise ValueError(
                f"checkpoint holds a {state['transform_class']}, "
                f"not a {type(self.transform).__name__}"
            )
        if [s["slot_id"] for s in state["slots"]] != [s.slot_id for s in self.slots]:
            raise ValueError("checkpoint was written with a different task-slot layout")
        changes = self._config_changes(state["config"], allow_changes)
        self.transform.load_state_dict(state["transform"])
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
        self.history = list(state["history"])
        self.evaluations = list(state["evaluations"])
        device = self.family.device
        for slot, saved in zip(self.slots, state["slots"]):
            slot.generation = int(saved["generation"])
            slot.inner_step = int(saved["inner_step"])
            if saved["active"]:
                index = slot.generation * self.config.tasks_per_step + slot.slot_id
                slot.task = self.family.sample(index, "train")
                slot.transforms = routed_transforms(self.transform, slot.task, self.config.routes)
                slot.params = {n: v.to(device) for n, v in saved["params"].items()}
                slot.states = {n: [s.to(device) for s in v] for n, v in saved["states"].items()}
            else:
                slot.task = None

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
        refused = [
            c
            for c in changes
            if c["setting"] not in RESUMABLE_CHANGES and c["setting"] not in allow_changes
        ]
        if refused:
            raise ValueError(
                "checkpoint config differs from this run's: "
                + "; ".join(f"{c['setting']} {c['from']!r} -> {c['to']!r}" for c in refused)
                + " (allow_changes names the fields a resumed run may change)"
            )
        return changes

    def save(self, path: str) -> str:
        """Write a checkpoint (one file per rank under torch.distributed); returns the path."""
        target = path if self.world == 1 else f"{path}.rank{self.rank}"
        tmp = f"{target}.tmp"
        torch.save(self.state_dict(), tmp)
        os.replace(tmp, target)
        return target

    def load(self, path: str, allow_changes: Sequence[str] = ()) -> None:
        """Resume from a checkpoint written by :meth:`save` (never unpickles arbitrary objects);
        ``allow_changes`` as in :meth:`load_state_dict`."""
        source = path if self.world == 1 else f"{path}.rank{self.rank}"
        state = torch.load(source, map_location="cpu", weights_only=True)
        self.load_state_dict(state, allow_changes)
