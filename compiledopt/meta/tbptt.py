"""Truncated back-propagation through unrolls (``estimator="tbptt"``).

Each meta-step runs, for every task slot, ``unroll`` inner steps of the transform on the slot's
task, carrying on from where the previous meta-step left that task, and back-propagates the
**meta-loss** — the mean inner training loss at the parameters reached after each of the unroll's
steps, ``(1/K) Σ_{k=1..K} L(θ_k; batch_k)`` — to the transform's weights. Parameters and transform
state are detached between unrolls (truncation). By default the gradients fed to the transform are
treated as constants (``second_order=False``: no Hessian-vector products, as in Andrychowicz et
al. 2016). ``horizon`` must be a multiple of ``unroll``; the inner learning rate is constant.

With ``routes`` each parameter is updated by the rule of its role, a variant of the transform
sharing its weights, so the meta-gradient reaches the weights through every rule. Held-out
evaluation reports the final and the mean-over-steps loss of :func:`~compiledopt.meta.inner.
evaluate_curve`.
"""

from typing import Any, ClassVar, Dict, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from compiledopt.meta.estimator import Estimate, Estimator, MetaConfig, Slot, register_estimator
from compiledopt.meta.inner import (
    apply_transform,
    detach,
    evaluate_curve,
    init_states,
    routed_transforms,
    task_gradients,
)
from compiledopt.meta.processes import distributed


@register_estimator("tbptt")
class TruncatedBackprop(Estimator):
    """The meta-gradient of the truncation's mean training loss, by autograd (module docstring)."""

    DEFAULTS: ClassVar[Dict[str, Any]] = {
        "meta_steps": 200,
        "unroll": 10,
        "horizon": 100,
        "inner_lr": 1.0,
        "eval_every": 50,
        "eval_steps": 50,
        "checkpoint_every": 0,
        "second_order": False,
    }

    @classmethod
    def check(cls, config: MetaConfig) -> None:
        assert config.horizon is not None and config.unroll is not None
        if config.horizon % config.unroll:
            raise ValueError(
                f"Invalid horizon: {config.horizon} (a multiple of unroll={config.unroll})"
            )

    def start(self, slot: Slot, fresh: bool) -> None:
        assert slot.task is not None
        if fresh:
            slot.params = slot.task.init_params()
        slot.context = routed_transforms(self.transform, slot.task, self.config.routes)
        if fresh:
            slot.states = init_states(self.transform, slot.params, slot.context)

    def _unroll(self, slot: Slot) -> Optional[Tensor]:
        """Run one truncated unroll and back-propagate its meta-loss; return the meta-loss
        (``None`` if it was non-finite)."""
        cfg = self.config
        assert cfg.unroll is not None and cfg.inner_lr is not None
        task = slot.task
        assert task is not None
        params = {n: v.detach().requires_grad_() for n, v in slot.params.items()}
        states = slot.states
        losses = []
        for k in range(cfg.unroll + 1):
            step = slot.inner_step + k
            loss = task.loss(params, task.batch(step))
            if k > 0:
                losses.append(loss)
            if k == cfg.unroll:
                break
            grads = task_gradients(task, loss, params, bool(cfg.second_order))
            if not cfg.second_order:
                grads = {n: g.detach() for n, g in grads.items()}
            params, states = apply_transform(
                self.transform, params, grads, states, step, cfg.inner_lr, slot.context
            )
        meta_loss = torch.stack(losses).mean()
        if not torch.isfinite(meta_loss):
            slot.task = None  # the task diverged: start a fresh one next time
            return None
        (meta_loss / cfg.tasks_per_step).backward()
        slot.params, slot.states = detach(params, states)
        slot.inner_step += cfg.unroll
        return meta_loss.detach()

    def estimate(self, slots: Sequence[Slot]) -> Estimate:
        sums = torch.zeros(2, dtype=torch.float64)  # sum of meta-losses, slots that finished
        skipped = 0
        for slot in slots:
            meta_loss = self._unroll(slot)
            if meta_loss is None:
                skipped += 1
            else:
                sums += torch.stack([meta_loss.double().cpu(), torch.ones((), dtype=torch.float64)])
        if distributed():
            for weight in self.weights:
                dist.all_reduce(weight.grad)
            dist.all_reduce(sums)
        return Estimate(float(sums[0]), int(sums[1]), skipped)

    def evaluate(self) -> Dict[str, float]:
        cfg = self.config
        assert cfg.eval_steps is not None and cfg.inner_lr is not None
        curves = torch.stack(
            [
                evaluate_curve(
                    self.transform,
                    self.family.sample(i, "heldout"),
                    cfg.eval_steps,
                    cfg.inner_lr,
                    cfg.routes,
                )
                for i in range(cfg.eval_tasks)
            ]
        )
        return {"final_loss": float(curves[:, -1].mean()), "mean_loss": float(curves.mean())}
