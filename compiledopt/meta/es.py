r"""Meta-training by evolution strategies: persistent (PES) or truncated (ES), antithetic.

The transform's weights ``θ`` (one flat vector) are trained on tasks from a family. Each of
``tasks_per_step`` task *slots* trains one task for ``L`` inner steps, ``L`` drawn per task
log-uniformly in ``[min_horizon, horizon]`` (a multiple of ``unroll``), in truncations of
``K = unroll`` steps; every outer step advances each slot by one truncation and updates
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

import math
from typing import Any, ClassVar, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from compiledopt.meta.estimator import Estimate, Estimator, MetaConfig, Slot, register_estimator
from compiledopt.meta.population import Params, Population, flat_weights, set_weights
from compiledopt.meta.processes import distributed
from compiledopt.schedules import warmup_cosine
from compiledopt.tasks.base import TaskFamily
from compiledopt.transforms.base import Transform

OBJECTIVES = ("train", "validation")


def _generator(*keys: int) -> torch.Generator:
    seed = 0
    for key in keys:
        seed = (seed * 1_000_003 + int(key)) % (2**62)
    return torch.Generator().manual_seed(seed)


@register_estimator("pes", "es")
class EvolutionStrategies(Estimator):
    """PES (``estimator="pes"``) or truncated antithetic ES (``"es"``); see the module docstring.

    The transform's ``update`` must work under ``torch.func.vmap`` (no data-dependent Python
    control flow). The weights the meta-optimizer updates are one flat vector ``θ``
    (:attr:`theta`), copied into the transform by :meth:`write_weights`.
    """

    DEFAULTS: ClassVar[Dict[str, Any]] = {
        "meta_steps": 1000,
        "unroll": 20,
        "min_horizon": 100,
        "horizon": 300,
        "inner_lr": 1e-3,
        "eval_every": 100,
        "eval_steps": 200,
        "checkpoint_every": 50,
        "pairs": 4,
        "antithetic": True,
        "sigma": 0.01,
        "objective": "train",
        "warmup_fraction": 0.05,
    }

    def __init__(self, transform: Transform, family: TaskFamily, config: MetaConfig) -> None:
        super().__init__(transform, family, config)
        self.theta = flat_weights(transform).clone().requires_grad_()

    @classmethod
    def check(cls, config: MetaConfig) -> None:
        assert config.min_horizon is not None and config.horizon is not None
        assert config.unroll is not None and config.warmup_fraction is not None
        if config.objective not in OBJECTIVES:
            raise ValueError(f"Invalid objective: {config.objective!r} (one of {OBJECTIVES})")
        if isinstance(config.warmup_fraction, bool) or not 0 <= config.warmup_fraction < 1:
            raise ValueError(f"Invalid warmup_fraction: {config.warmup_fraction!r} (in [0, 1))")
        if config.min_horizon > config.horizon:
            raise ValueError(
                f"Invalid min_horizon: {config.min_horizon} (above horizon={config.horizon})"
            )
        if config.horizon < config.unroll:
            raise ValueError(f"Invalid horizon: {config.horizon} (below unroll={config.unroll})")

    @property
    def weights(self) -> List[Tensor]:
        return [self.theta]

    def write_weights(self) -> None:
        set_weights(self.transform, self.theta.detach())

    def read_weights(self) -> None:
        with torch.no_grad():
            self.theta.copy_(flat_weights(self.transform))

    @property
    def members(self) -> int:
        """Members per slot: ``2P`` antithetic (``P`` one-sided), one more for ``"es"``."""
        cfg = self.config
        assert cfg.pairs is not None
        return cfg.pairs * (2 if cfg.antithetic else 1) + (1 if cfg.estimator == "es" else 0)

    # -- tasks ----------------------------------------------------------------------------------

    def horizon(self, slot: Slot) -> int:
        cfg = self.config
        assert cfg.min_horizon is not None and cfg.horizon is not None and cfg.unroll is not None
        u = float(torch.rand((), generator=_generator(cfg.seed, 1, slot.slot_id, slot.generation)))
        length = math.exp(math.log(cfg.min_horizon) + u * math.log(cfg.horizon / cfg.min_horizon))
        return max(1, round(length / cfg.unroll)) * cfg.unroll

    def start(self, slot: Slot, fresh: bool) -> None:
        assert slot.task is not None and self.config.pairs is not None
        slot.context = Population(self.transform, slot.task, self.members, self.config.routes)
        if fresh:
            slot.params, slot.states = slot.context.init()
            slot.memory = {"xi": torch.zeros(self.config.pairs, self.theta.numel())}

    # -- one truncation -------------------------------------------------------------------------

    def _objective(self, slot: Slot, losses: Tensor, params: Params, step: int) -> Tensor:
        if self.config.objective == "train":
            return losses
        task = slot.task
        assert task is not None
        batch = task.validation_batch(step) if hasattr(task, "validation_batch") else None
        return slot.context.loss(params, batch if batch is not None else task.batch(step))

    def _truncation(self, slot: Slot) -> Optional[Tuple[Tensor, float]]:
        """Advance ``slot`` by one truncation; return ``(Σ ξ·(F₊−F₋)/2, mean objective)``
        (``Σ ξ·F`` without antithetic pairs), or ``None`` when a member's loss is not finite."""
        cfg = self.config
        assert cfg.pairs is not None and cfg.sigma is not None and cfg.unroll is not None
        assert cfg.inner_lr is not None and cfg.warmup_fraction is not None
        pairs, population = cfg.pairs, slot.context
        noise = torch.randn(
            pairs,
            self.theta.numel(),
            generator=_generator(cfg.seed, 2, slot.slot_id, slot.generation, slot.inner_step),
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
        for k in range(cfg.unroll):
            step = slot.inner_step + k
            lr = cfg.inner_lr * warmup_cosine(step, slot.horizon, cfg.warmup_fraction)
            losses, new_params, new_states = population.step(weights, params, states, step, lr)
            objective = self._objective(slot, losses, params, step)
            total += torch.log(objective.double())
            params, states = new_params, new_states
        if not bool(torch.isfinite(total).all()):
            slot.task = None
            return None
        slot.params, slot.states = params, states
        slot.inner_step += cfg.unroll
        mean = total / cfg.unroll
        if cfg.antithetic:
            signal = ((mean[:pairs] - mean[pairs : 2 * pairs]) / 2).float()
        else:
            signal = mean[:pairs].float()
        if cfg.estimator == "pes":
            slot.memory["xi"] = slot.memory["xi"] + eps
            direction = slot.memory["xi"]
        else:
            direction = eps
        return (signal @ direction).double(), float(mean.mean())

    def estimate(self, slots: Sequence[Slot]) -> Estimate:
        """``θ.grad = ĝ``, the estimate averaged over the slots that finished (module docstring);
        ``θ`` is not changed."""
        cfg = self.config
        assert cfg.pairs is not None and cfg.sigma is not None
        numerator = torch.zeros(self.theta.numel(), dtype=torch.float64)
        sums = torch.zeros(2, dtype=torch.float64)  # slots that finished, sum of objectives
        skipped = 0
        for slot in slots:
            result = self._truncation(slot)
            if result is None:
                skipped += 1
            else:
                numerator += result[0]
                sums += torch.tensor([1.0, result[1]], dtype=torch.float64)
        if distributed():
            dist.all_reduce(numerator)
            dist.all_reduce(sums)
        finite = int(sums[0])
        if finite:
            self.theta.grad = (numerator / (cfg.pairs * cfg.sigma**2 * finite)).float()
        return Estimate(float(sums[1]), finite, skipped)

    # -- evaluation -----------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> Dict[str, float]:
        """Mean (and mean log) final evaluation loss of ``θ`` on held-out tasks, with the
        schedule over ``eval_steps``."""
        cfg = self.config
        assert cfg.eval_steps is not None and cfg.inner_lr is not None
        assert cfg.warmup_fraction is not None
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
        return {
            "final_loss": sum(finals) / len(finals),
            "log_final_loss": sum(math.log(f) if f > 0 else math.nan for f in finals) / len(finals),
        }
