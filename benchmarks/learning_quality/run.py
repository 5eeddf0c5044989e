"""One run: a task trained by one optimizer at one lr, its validation curve and divergence; the
stress check; and the short timing runs behind the up-front estimate.

A run evaluates the validation loss before the first step and every ~2% of the steps
(:func:`evaluation_steps`). It stops at the first divergence (:func:`~benchmarks.learning_quality.
metrics.is_diverged`): a training loss that is non-finite or above 10× the first minibatch's, or a
validation loss above 10× the initial one.
"""

import math
import time
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from benchmarks.learning_quality import metrics, optimizers, tasks
from benchmarks.learning_quality.base import Task

#: Validation-loss evaluations: every ``EVAL_FRACTION`` of the steps.
EVAL_FRACTION = 0.02
#: Stress check: the loss multiplier, and the largest gradient entry after rescaling.
STRESS_LOSS_SCALE = 1e6
STRESS_GRAD_MAX = 1e38
STRESS_TASKS = ("regression", "cnn", "char-lm")


def init_worker(threads: int) -> None:
    """A pool worker's set-up: torch's intra-op threads."""
    torch.set_num_threads(threads)


def evaluation_steps(steps: int, fraction: float = EVAL_FRACTION) -> List[int]:
    """The steps after which the validation loss is measured: 0, every ``fraction`` of
    ``steps``, and ``steps``."""
    every = max(1, round(fraction * steps))
    points = list(range(0, steps + 1, every))
    return points if points[-1] == steps else [*points, steps]


def validation_loss(task: Task, model: nn.Module) -> float:
    inputs, target = task.validation()
    with torch.no_grad():
        return float(task.loss(model(inputs), target))


def train(task: Task, model: nn.Module, optimizer: Any, steps: int) -> Dict[str, Any]:
    """``steps`` steps of ``optimizer`` under the shared schedule; the curve and the flags."""
    scheduler = optimizers.schedule(optimizer, steps)
    points = set(evaluation_steps(steps))
    initial = validation_loss(task, model)
    eval_steps, val_loss, train_loss = [0], [initial], []
    window: List[float] = []
    first_train: Optional[float] = None
    diverged_step: Optional[int] = None
    step_seconds = eval_seconds = 0.0
    for step in range(steps):
        begin = time.perf_counter()
        inputs, target = task.batch(step)
        optimizer.zero_grad(set_to_none=True)
        loss = task.loss(model(inputs), target)
        value = loss.item()
        first_train = value if first_train is None else first_train
        if metrics.is_diverged(value, first_train):
            diverged_step = step
            break
        loss.backward()
        optimizer.step()
        scheduler.step()
        step_seconds += time.perf_counter() - begin
        window.append(value)
        if step + 1 in points:
            begin = time.perf_counter()
            current = validation_loss(task, model)
            eval_seconds += time.perf_counter() - begin
            eval_steps.append(step + 1)
            val_loss.append(current)
            train_loss.append(metrics.mean(window))
            window = []
            if metrics.is_diverged(current, initial):
                diverged_step = step + 1
                break
    diverged = diverged_step is not None
    done = diverged_step if diverged else steps
    return {
        "eval_steps": eval_steps,
        "val_loss": val_loss,
        "train_loss": train_loss,
        "initial_val_loss": initial,
        "final_val_loss": val_loss[-1],
        "counted_final_val_loss": metrics.counted_final(val_loss[-1], initial, diverged),
        "min_val_loss": min((v for v in val_loss if math.isfinite(v)), default=math.nan),
        "first_train_loss": first_train,
        "diverged": diverged,
        "diverged_step": diverged_step,
        "steps_done": done,
        "ms_per_step": 1000 * step_seconds / max(1, done),
        "eval_seconds": eval_seconds,
    }


def run_job(job: Dict[str, Any]) -> Dict[str, Any]:
    """Run one job (``task``, ``seed``, ``steps``, ``optimizer``, ``lr``, ``paths``,
    ``backends``) and return its record: the job's identity and :func:`train`'s result."""
    begin = time.perf_counter()
    task = tasks.make(job["task"], job["seed"], job["steps"])
    model = task.model()
    optimizer = optimizers.build(
        job["optimizer"], model.parameters(), job["lr"], job["paths"], job["backends"]
    )
    record = train(task, model, optimizer, job["steps"])
    identity = {key: job[key] for key in ("task", "seed", "steps", "optimizer", "lr")}
    return {**identity, **record, "seconds": time.perf_counter() - begin}


def time_job(job: Dict[str, Any], reps: int = 3) -> Tuple[float, float, float]:
    """Seconds of ``job``'s set-up (model, optimizer and first step), per later step (the
    fastest of ``reps``) and per validation: the basis of the up-front estimate."""
    begin = time.perf_counter()
    task = tasks.make(job["task"], job["seed"], job["steps"])
    model = task.model()
    optimizer = optimizers.build(
        job["optimizer"], model.parameters(), job["lr"], job["paths"], job["backends"]
    )
    times = []
    for step in range(reps + 1):
        inputs, target = task.batch(step)
        optimizer.zero_grad(set_to_none=True)
        task.loss(model(inputs), target).backward()
        optimizer.step()
        times.append(time.perf_counter() - begin)
        begin = time.perf_counter()
    validation_loss(task, model)
    return times[0], min(times[1:]), time.perf_counter() - begin


def _all_finite(tensors: List[torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def stress(
    kind: str,
    task_name: str,
    lr: float,
    paths: Dict[str, str],
    backends: Dict[str, str],
    steps: int,
    seed: int = 0,
) -> Dict[str, Any]:
    """The stress check of optimizer ``kind`` on ``task_name``: ``steps`` steps at a constant
    ``lr`` with the loss scaled by 1e6, and ``steps`` steps with every gradient rescaled so that
    the largest entry is 1e38 (finite in float32; its square is not). Passes when every parameter
    stays finite after every step and no step is skipped."""
    result: Dict[str, Any] = {"task": task_name, "steps": steps, "lr": lr}
    for check in ("loss_x1e6", "grad_1e38"):
        task = tasks.make(task_name, seed, steps)
        model = task.model()
        params = list(model.parameters())
        optimizer = optimizers.build(kind, params, lr, paths, backends)
        bad_step: Optional[int] = None
        for step in range(steps):
            inputs, target = task.batch(step)
            optimizer.zero_grad(set_to_none=True)
            loss = task.loss(model(inputs), target)
            if check == "loss_x1e6":
                (loss * STRESS_LOSS_SCALE).backward()
            else:
                loss.backward()
                largest = max(float(p.grad.abs().max()) for p in params) or 1.0
                for p in params:  # normalise first: 1e38 / largest may not fit in float32
                    p.grad.div_(largest).mul_(STRESS_GRAD_MAX)
            optimizer.step()
            if not _all_finite(params):
                bad_step = step
                break
        skipped = getattr(optimizer, "skipped_steps", 0)
        state = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
        result[check] = {
            "pass": bad_step is None and skipped == 0,
            "first_nonfinite_step": bad_step,
            "skipped_steps": skipped,
            "state_finite": _all_finite(state),
            "max_abs_param": max(float(p.detach().abs().max()) for p in params),
        }
    result["pass"] = all(result[c]["pass"] for c in ("loss_x1e6", "grad_1e38"))
    return result
