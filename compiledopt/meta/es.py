r"""Meta-training by evolution strategies: persistent (PES) or truncated (ES), antithetic.

The transform's weights ``θ`` (one flat vector) are trained on tasks from a family. Each of
``tasks_per_step`` task *slots* trains one task for an unroll of ``L`` inner steps, ``L`` drawn per
task log-uniformly in ``[min_unroll, max_unroll]`` (a multiple of ``truncation``), in truncations
of ``K = truncation`` steps; every outer step advances each slot by one truncation and updates
``θ`` once. The inner learning rate follows the warm-up + cosine schedule over the task's ``L``
steps (:func:`compiledopt.schedules.warmup_cosine`), as the optimizer is meant to be used.

**Meta-objective** of a truncation: the mean over its ``K`` steps of ``log`` of the inner loss
at the parameters before each step — the training loss on that step's batch (``objective=
"train"``) or the loss on a validation batch of the same task (``"validation"``, the task's
``validation_batch(step)``). The logarithm makes the objective invariant to the scale of a
task's loss (a loss scaled by ``s`` shifts every member's objective by ``log s``, which
antithetic differences cancel), so tasks of different loss scales weigh the same.

**Estimators**, with ``P`` antithetic pairs per slot, perturbations ``ε ~ N(0, σ²I)`` drawn per
pair and truncation (seeded by the run's seed, the slot, the task and the inner step), members
``θ + ε`` and ``θ − ε``:

* ``"pes"`` — Persistent ES (Vicol, Metz, Sohl-Dickstein 2021). Each member keeps its own inner
  trajectory across truncations and each pair accumulates ``ξ ← ξ + ε`` over the unroll so far
  (reset with the task). ``ĝ = Σ_pairs ξ·(F₊ − F₋) / (2Pσ²)`` is an unbiased estimate of the
  gradient of the smoothed objective of the *whole* unroll, without the truncation bias.
* ``"es"`` — truncated antithetic ES: both members of every pair start each truncation from the
  slot's shared state, ``ĝ = Σ_pairs ε·(F₊ − F₋) / (2Pσ²)``, and the shared state then advances
  with ``θ`` itself (an extra unperturbed member). Biased toward short-horizon behaviour, as
  truncated estimators are.

**Routes**: with ``routes`` (parameter role -> rule of the transform, e.g. ``{"matrix":
"orthogonal", "vector": "adam"}``) each parameter of a task is updated by the rule of its role,
in training and in evaluation alike, as the exported optimizer will apply it (see
:class:`~compiledopt.meta.population.Population`); without, every parameter gets the transform as
configured.

Estimates are averaged over slots, clipped to ``clip_norm`` and applied with Adam. A slot whose
members produce a non-finite loss contributes nothing to that step and restarts with a new task
(counted). Under ``torch.distributed`` the slots are split across ranks and the estimates summed
with one all-reduce; every random draw is seeded by ``(seed, slot, step)``, so any number of
processes computes the same update as one.
"""

import dataclasses
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist
from torch import Tensor
from tqdm.auto import tqdm

from compiledopt._validation import check_fields
from compiledopt.meta.inner import check_routes, check_rules, check_shape_agnostic
from compiledopt.meta.population import Params, Population, States, flat_weights, set_weights
from compiledopt.meta.processes import distributed
from compiledopt.meta.resume import ES_FIELDS, resumable_fields
from compiledopt.schedules import warmup_cosine
from compiledopt.tasks.base import Task, TaskFamily
from compiledopt.transforms.base import Transform

ESTIMATORS = ("pes", "es")
OBJECTIVES = ("train", "validation")
CHECKPOINT_FORMAT = 1
RESUMABLE_CHANGES = resumable_fields(ES_FIELDS)  # the fields a resumed run may change


@dataclass
class ESConfig:
    """Settings of an evolution-strategies run (validated by :meth:`validate`).

    Attributes:
        estimator: ``"pes"`` or ``"es"`` (see the module docstring).
        outer_steps: number of updates of ``θ``.
        truncation: inner steps per truncation (``K``).
        min_unroll, max_unroll: range of a task's unroll length ``L`` (log-uniform, rounded to a
            multiple of ``truncation``).
        pairs: perturbations per task slot (``P``).
        antithetic: evaluate ``θ − ε`` beside each ``θ + ε`` (``2P`` members, ``2P + 1`` for
            ``"es"``); without, ``ĝ = Σ ξ·F / (Pσ²)`` from ``P`` members (far noisier).
        tasks_per_step: task slots per update.
        sigma: standard deviation of the perturbations.
        inner_lr: peak inner learning rate (warm-up + cosine over each unroll).
        warmup_fraction: fraction of an unroll spent warming up.
        meta_lr: Adam's learning rate on ``θ``.
        clip_norm: the estimate's norm is clipped to this.
        objective: ``"train"`` or ``"validation"`` loss (see the module docstring).
        eval_every: evaluate on held-out tasks every this many steps (0: never).
        eval_tasks, eval_steps: held-out tasks per evaluation and their inner steps.
        checkpoint_every: save a checkpoint every this many steps (0: only at the end).
        routes: the rule of each parameter role (roles left out: ``"artifact"``), or ``None``:
            every parameter gets the transform as configured (see the module docstring).
    """

    estimator: str = "pes"
    outer_steps: int = 1000
    truncation: int = 20
    min_unroll: int = 100
    max_unroll: int = 300
    pairs: int = 4
    antithetic: bool = True
    tasks_per_step: int = 4
    sigma: float = 0.01
    inner_lr: float = 1e-3
    warmup_fraction: float = 0.05
    meta_lr: float = 3e-3
    clip_norm: float = 1.0
    objective: str = "train"
    eval_every: int = 100
    eval_tasks: int = 4
    eval_steps: int = 200
    checkpoint_every: int = 50
    routes: Optional[Dict[str, str]] = None

    def validate(self) -> "ESConfig":
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"Invalid estimator: {self.estimator!r} (one of {ESTIMATORS})")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"Invalid objective: {self.objective!r} (one of {OBJECTIVES})")
        check_fields(
            self,
            positive_ints=(
                "outer_steps",
                "truncation",
                "min_unroll",
                "max_unroll",
                "pairs",
                "tasks_per_step",
                "eval_tasks",
                "eval_steps",
            ),
            non_negative_ints=("eval_every", "checkpoint_every"),
            positive_numbers=("sigma", "inner_lr", "meta_lr", "clip_norm"),
        )
        if not isinstance(self.antithetic, bool):
            raise ValueError(f"Invalid antithetic: {self.antithetic!r} (True or False)")
        if isinstance(self.warmup_fraction, bool) or not 0 <= self.warmup_fraction < 1:
            raise ValueError(f"Invalid warmup_fraction: {self.warmup_fraction!r} (in [0, 1))")
        if self.min_unroll > self.max_unroll:
            raise ValueError(
                f"Invalid min_unroll: {self.min_unroll} (above max_unroll={self.max_unroll})"
            )
        if self.max_unroll < self.truncation:
            raise ValueError(
                f"Invalid max_unroll: {self.max_unroll} (below truncation={self.truncation})"
            )
        self.routes = check_routes(self.routes)
        return self

    @classmethod
    def from_dict(cls, values: Dict[str, Any]) -> "ESConfig":
        """Build from a dict, refusing unknown keys (naming them)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"Unknown ES settings: {unknown} (known: {sorted(known)})")
        return cls(**values).validate()


@dataclass
class _Slot:
    slot_id: int
    generation: int = -1
    inner_step: int = 0
    unroll: int = 0
    task: Optional[Task] = None
    population: Optional[Population] = None
    params: Params = field(default_factory=dict)
    states: States = field(default_factory=dict)
    xi: Optional[Tensor] = None


def _generator(*keys: int) -> torch.Generator:
    seed = 0
    for key in keys:
        seed = (seed * 1_000_003 + int(key)) % (2**62)
    return torch.Generator().manual_seed(seed)


class ESTrainer:
    """Meta-trains ``transform`` on ``family`` with PES or truncated ES (module docstring).

    Args:
        transform (Transform): a shape-agnostic transform whose ``update`` works under
            ``torch.func.vmap`` (no data-dependent Python control flow).
        family (TaskFamily): training and held-out tasks.
        config (ESConfig, optional): the run's settings. (default: ``ESConfig()``)
        seed (int, optional): seeds every perturbation and unroll length. (default: 0)
        metadata (dict, optional): saved with every checkpoint (JSON values only).
    """

    def __init__(
        self,
        transform: Transform,
        family: TaskFamily,
        config: Optional[ESConfig] = None,
        seed: int = 0,
        metadata: Optional[Dict[str, Any]] = None,
    ) -> None:
        self.transform = check_shape_agnostic(transform, "ESTrainer")
        if not isinstance(family, TaskFamily):
            raise TypeError(f"ESTrainer expects a TaskFamily, got {type(family).__name__}")
        self.family = family
        self.config = (config or ESConfig()).validate()
        self.seed = int(seed)
        self.metadata = dict(metadata or {})
        check_rules(self.transform, self.config.routes, "routes")
        self.transform.to(family.device)
        self.rank, self.world = (
            (dist.get_rank(), dist.get_world_size()) if distributed() else (0, 1)
        )
        theta = flat_weights(self.transform)
        if distributed():
            dist.broadcast(theta, src=0)
        self.theta = theta.clone().requires_grad_()
        self.meta_optimizer = torch.optim.Adam([self.theta], lr=self.config.meta_lr)
        self.slots = [_Slot(i) for i in range(self.rank, self.config.tasks_per_step, self.world)]
        self.outer_step = 0
        self.history: List[Dict[str, float]] = []
        self.evaluations: List[Dict[str, float]] = []
        self.skipped_tasks = 0
        self.elapsed = 0.0  # seconds spent in train(), summed over resumed runs

    @property
    def members(self) -> int:
        cfg = self.config
        return cfg.pairs * (2 if cfg.antithetic else 1) + (1 if cfg.estimator == "es" else 0)

    # -- tasks ----------------------------------------------------------------------------------

    def _unroll_length(self, slot: _Slot) -> int:
        cfg = self.config
        u = float(torch.rand((), generator=_generator(self.seed, 1, slot.slot_id, slot.generation)))
        length = math.exp(math.log(cfg.min_unroll) + u * math.log(cfg.max_unroll / cfg.min_unroll))
        return max(1, round(length / cfg.truncation)) * cfg.truncation

    def _start(self, slot: _Slot, restore: bool = False) -> None:
        if not restore:
            slot.generation += 1
            slot.inner_step = 0
        index = slot.generation * self.config.tasks_per_step + slot.slot_id
        slot.task = self.family.sample(index, "train")
        slot.unroll = self._unroll_length(slot)
        routes = self.config.routes
        slot.population = Population(self.transform, slot.task, self.members, routes)
        if not restore:
            slot.params, slot.states = slot.population.init()
            slot.xi = torch.zeros(self.config.pairs, self.theta.numel())

    # -- one truncation -------------------------------------------------------------------------

    def _objective(self, slot: _Slot, losses: Tensor, params: Params, step: int) -> Tensor:
        if self.config.objective == "train":
            return losses
        task = slot.task
        assert task is not None and slot.population is not None
        batch = task.validation_batch(step) if hasattr(task, "validation_batch") else None
        return slot.population.loss(params, batch if batch is not None else task.batch(step))

    def _truncation(self, slot: _Slot) -> Optional[Tensor]:
        """Advance ``slot`` by one truncation; its estimate's numerator ``Σ ξ·(F₊−F₋)/2``
        (``Σ ξ·F`` without antithetic pairs)."""
        cfg = self.config
        if slot.task is None or slot.inner_step >= slot.unroll:
            self._start(slot)
        assert slot.population is not None and slot.xi is not None
        pairs = cfg.pairs
        noise = torch.randn(
            pairs,
            self.theta.numel(),
            generator=_generator(self.seed, 2, slot.slot_id, slot.generation, slot.inner_step),
        )
        eps = noise * cfg.sigma
        theta = self.theta.detach()
        rows = [theta + eps, theta - eps] if cfg.antithetic else [theta + eps]
        if cfg.estimator == "es":
            rows.append(theta.unsqueeze(0))
            params = {n: p[-1:].expand_as(p).clone() for n, p in slot.params.items()}
            states = {n: [s[-1:].expand_as(s).clone() for s in v] for n, v in slot.states.items()}
        else:
            params, states = slot.params, slot.states
        weights = torch.cat(rows)
        total = torch.zeros(self.members, dtype=torch.float64)
        for k in range(cfg.truncation):
            step = slot.inner_step + k
            lr = cfg.inner_lr * warmup_cosine(step, slot.unroll, cfg.warmup_fraction)
            losses, new_params, new_states = slot.population.step(weights, params, states, step, lr)
            objective = self._objective(slot, losses, params, step)
            total += torch.log(objective.double())
            params, states = new_params, new_states
        if not bool(torch.isfinite(total).all()):
            self.skipped_tasks += 1
            slot.task = None
            return None
        slot.params, slot.states = params, states
        slot.inner_step += cfg.truncation
        mean = total / cfg.truncation
        if cfg.antithetic:
            signal = ((mean[:pairs] - mean[pairs : 2 * pairs]) / 2).float()
        else:
            signal = mean[:pairs].float()
        if cfg.estimator == "pes":
            slot.xi = slot.xi + eps
            direction = slot.xi
        else:
            direction = eps
        self._last_objective = float(mean.mean())
        return signal @ direction

    def estimate(self) -> Optional[Tensor]:
        """Advance every slot by one truncation and return the meta-gradient estimate ``ĝ``
        (summed over processes; ``None`` when every slot was skipped). ``θ`` is not changed."""
        cfg = self.config
        numerator = torch.zeros(self.theta.numel(), dtype=torch.float64)
        sums = torch.zeros(2, dtype=torch.float64)  # slots that finished, sum of objectives
        for slot in self.slots:
            estimate = self._truncation(slot)
            if estimate is not None:
                numerator += estimate.double()
                sums += torch.tensor([1.0, self._last_objective], dtype=torch.float64)
        if distributed():
            dist.all_reduce(numerator)
            dist.all_reduce(sums)
        finite = float(sums[0])
        self._last_sums = sums
        if finite == 0:
            return None
        return (numerator / (cfg.pairs * cfg.sigma**2 * finite)).float()

    def step(self) -> Dict[str, float]:
        """One update of ``θ`` with Adam on :meth:`estimate`; returns its record."""
        cfg = self.config
        gradient = self.estimate()
        sums = self._last_sums
        record = {"step": self.outer_step + 1, "objective": math.nan, "grad_norm": math.nan}
        if gradient is not None:
            finite = float(sums[0])
            self.theta.grad = gradient
            norm = torch.nn.utils.clip_grad_norm_([self.theta], cfg.clip_norm)
            self.meta_optimizer.step()
            self.meta_optimizer.zero_grad(set_to_none=True)
            record.update(objective=float(sums[1]) / finite, grad_norm=float(norm))
        self.outer_step += 1
        record["skipped_tasks"] = float(self.skipped_tasks)
        self.history.append(record)
        return record

    # -- evaluation -----------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> Dict[str, float]:
        """Mean log final evaluation loss of ``θ`` on held-out tasks (schedule over
        ``eval_steps``)."""
        cfg = self.config
        weights = self.theta.detach().unsqueeze(0)
        finals = []
        for i in range(cfg.eval_tasks):
            task = self.family.sample(i, "heldout")
            population = Population(self.transform, task, 1, cfg.routes)
            params, states = population.init()
            for step in range(cfg.eval_steps):
                lr = cfg.inner_lr * warmup_cosine(step, cfg.eval_steps, cfg.warmup_fraction)
                _, params, states = population.step(weights, params, states, step, lr)
            finals.append(float(population.loss(params, task.evaluation_batch())[0]))
        record = {
            "step": self.outer_step,
            "final_loss": sum(finals) / len(finals),
            "log_final_loss": sum(math.log(f) if f > 0 else math.nan for f in finals) / len(finals),
        }
        self.evaluations.append(record)
        return record

    # -- the run --------------------------------------------------------------------------------

    def train(self, checkpoint: Optional[str] = None, progress: bool = True) -> "ESTrainer":
        """Run until ``config.outer_steps`` updates are done (a resumed run counts those done);
        the final ``θ`` is copied into ``transform``."""
        cfg = self.config
        bar = tqdm(
            total=cfg.outer_steps,
            initial=self.outer_step,
            desc=f"meta-train ({cfg.estimator})",
            disable=not progress or self.rank != 0,
        )
        with bar:
            if cfg.eval_every and self.outer_step == 0 and not self.evaluations:
                self.evaluate()  # the starting point of the held-out curve
            while self.outer_step < cfg.outer_steps:
                started = time.perf_counter()
                record = self.step()
                self.elapsed += time.perf_counter() - started
                bar.update(1)
                postfix = {"objective": f"{record['objective']:.4g}"}
                if cfg.eval_every and self.outer_step % cfg.eval_every == 0:
                    started = time.perf_counter()
                    postfix["heldout"] = f"{self.evaluate()['final_loss']:.4g}"
                    self.elapsed += time.perf_counter() - started
                bar.set_postfix(postfix)
                if checkpoint and cfg.checkpoint_every and self.outer_step % cfg.checkpoint_every:
                    continue
                if checkpoint and cfg.checkpoint_every:
                    self.save(checkpoint)
        set_weights(self.transform, self.theta.detach())
        if checkpoint:
            self.save(checkpoint)
        return self

    # -- checkpoints ----------------------------------------------------------------------------

    def state_dict(self) -> Dict[str, Any]:
        """Everything needed to resume exactly (tensors, numbers, strings). ``"transform"`` holds
        the transform's state dict at the current ``θ`` (what ``compiledopt export`` reads)."""
        set_weights(self.transform, self.theta.detach())
        return {
            "format": CHECKPOINT_FORMAT,
            "trainer": "es",
            "config": dataclasses.asdict(self.config),
            "seed": self.seed,
            "family": {"name": self.family.name, "seed": self.family.seed},
            "transform_class": type(self.transform).__name__,
            "metadata": self.metadata,
            "theta": self.theta.detach().clone(),
            "transform": self.transform.state_dict(),
            "elapsed": self.elapsed,
            "meta_optimizer": self.meta_optimizer.state_dict(),
            "outer_step": self.outer_step,
            "skipped_tasks": self.skipped_tasks,
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
                    "xi": s.xi if s.xi is not None else torch.zeros(0),
                }
                for s in self.slots
            ],
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`; refuses a run with other settings, naming them."""
        if state.get("format") != CHECKPOINT_FORMAT or state.get("trainer") != "es":
            raise ValueError("not an evolution-strategies checkpoint of this format")
        mine = self.state_dict()
        for key in ("seed", "family", "transform_class", "world"):
            if state[key] != mine[key]:
                raise ValueError(
                    f"checkpoint {key} {state[key]!r} differs from this run's {mine[key]!r}"
                )
        for name, value in state["config"].items():  # a run may be extended or re-monitored
            if name not in RESUMABLE_CHANGES and value != mine["config"].get(name):
                raise ValueError(
                    f"checkpoint config {name}={value!r} differs from this run's "
                    f"{mine['config'].get(name)!r}"
                )
        with torch.no_grad():
            self.theta.copy_(state["theta"])
        self.meta_optimizer.load_state_dict(state["meta_optimizer"])
        self.outer_step = int(state["outer_step"])
        self.skipped_tasks = int(state["skipped_tasks"])
        self.elapsed = float(state["elapsed"])
        self.history = list(state["history"])
        self.evaluations = list(state["evaluations"])
        set_weights(self.transform, self.theta.detach())
        for slot, saved in zip(self.slots, state["slots"]):
            slot.generation = int(saved["generation"])
            slot.inner_step = int(saved["inner_step"])
            if saved["active"]:
                self._start(slot, restore=True)
                slot.params = dict(saved["params"])
                slot.states = {n: list(v) for n, v in saved["states"].items()}
                slot.xi = saved["xi"]
            else:
                slot.task = None

    def save(self, path: str) -> str:
        """Write a checkpoint atomically. Under torch.distributed every rank writes its own
        ``path.rank<r>`` (its slots; what :meth:`load` resumes from) and rank 0 also writes
        ``path`` (the weights for ``compiledopt export``)."""
        state = self.state_dict()
        targets = [path] if self.world == 1 else [f"{path}.rank{self.rank}"]
        if self.world > 1 and self.rank == 0:
            targets.append(path)
        for target in targets:
            tmp = f"{target}.tmp"
            torch.save(state, tmp)
            os.replace(tmp, target)
        return targets[0]

    def load(self, path: str) -> None:
        """Resume from :meth:`save`'s file (loaded with ``weights_only=True``)."""
        source = path if self.world == 1 else f"{path}.rank{self.rank}"
        self.load_state_dict(torch.load(source, map_location="cpu", weights_only=True))
