"""One run: a task trained by one optimizer at one lr, its validation curve and divergence; the
stress check; and the short timing runs behind the up-front estimate.

A run evaluates the validation loss before the first step and every ~2% of the steps
(:func:`evaluation_steps`). It stops at the first divergence (:func:`~benchmarks.learning_quality.
metrics.is_diverged`): a training loss that is non-finite or above 10× the first minibatch's, or a
validation loss above 10× the initial one.
"""

import math
import statistics
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


class Recorder:
    """The bookkeeping of one run, shared by the suite's loop (:func:`train`) and a task's own
    (:meth:`~benchmarks.learning_quality.base.Task.fit`): the validation curve at
    :func:`evaluation_steps`, the mean training loss between evaluations, the divergence rule,
    the time of the steps and of the optimizer's steps alone.

    A loop calls :meth:`loss` with each step's training loss before its backward pass (``True``:
    the run diverged, stop without stepping) and :meth:`stepped` after the optimizer and the
    scheduler stepped (``True``: stop).
    """

    def __init__(self, task: Task, model: nn.Module, steps: int) -> None:
        self.task, self.model, self.steps = task, model, int(steps)
        self.points = set(evaluation_steps(self.steps))
        self.initial = validation_loss(task, model)
        self.eval_steps, self.val_loss = [0], [self.initial]
        self.train_loss: List[float] = []
        self.window: List[float] = []
        self.first_train: Optional[float] = None
        self.diverged_step: Optional[int] = None
        self.step_seconds = self.eval_seconds = 0.0
        self.optimizer_seconds: List[float] = []
        self._began = 0.0

    def watch(self, optimizer: Any) -> List[Any]:
        """Time every ``optimizer.step()`` alone (step pre- and post-hooks); the hooks' handles."""

        def before(*_: Any) -> None:
            self._began = time.perf_counter()

        def after(*_: Any) -> None:
            self.optimizer_seconds.append(time.perf_counter() - self._began)

        return [optimizer.register_step_pre_hook(before), optimizer.register_step_post_hook(after)]

    def loss(self, step: int, value: float) -> bool:
        """Record the training loss of ``step``; ``True`` when it marks divergence."""
        self.first_train = value if self.first_train is None else self.first_train
        if metrics.is_diverged(value, self.first_train):
            self.diverged_step = step
            return True
        self.window.append(value)
        return False

    def stepped(self, step: int, seconds: float) -> bool:
        """Step ``step`` (0-based) is done and took ``seconds``: measure the validation loss where
        due; ``True`` when it diverged."""
        self.step_seconds += seconds
        if step + 1 not in self.points:
            return False
        begin = time.perf_counter()
        current = validation_loss(self.task, self.model)
        self.eval_seconds += time.perf_counter() - begin
        self.eval_steps.append(step + 1)
        self.val_loss.append(current)
        self.train_loss.append(metrics.mean(self.window))
        self.window = []
        if metrics.is_diverged(current, self.initial):
            self.diverged_step = step + 1
            return True
        return False

    def result(self, optimizer: Any) -> Dict[str, Any]:
        """The run's record (see :func:`train`)."""
        diverged = self.diverged_step is not None
        done = self.diverged_step if diverged else self.steps
        val_loss = self.val_loss
        return {
            "eval_steps": self.eval_steps,
            "val_loss": val_loss,
            "train_loss": self.train_loss,
            "initial_val_loss": self.initial,
            "final_val_loss": val_loss[-1],
            "counted_final_val_loss": metrics.counted_final(val_loss[-1], self.initial, diverged),
            "min_val_loss": min((v for v in val_loss if math.isfinite(v)), default=math.nan),
            "first_train_loss": self.first_train,
            "diverged": diverged,
            "diverged_step": self.diverged_step,
            "steps_done": done,
            "ms_per_step": 1000 * self.step_seconds / max(1, done),
            "optimizer_ms_median": (
                1000 * statistics.median(self.optimizer_seconds) if self.optimizer_seconds else None
            ),
            "state_bytes_per_param": state_bytes_per_param(optimizer),
            "eval_seconds": self.eval_seconds,
        }


def state_bytes_per_param(optimizer: Any) -> float:
    """Bytes of the optimizer's state tensors over the number of parameter elements."""
    params = {id(p): p for group in optimizer.param_groups for p in group["params"]}
    elements = sum(p.numel() for p in params.values())
    stored = sum(
        t.numel() * t.element_size()
        for state in optimizer.state.values()
        for t in state.values()
        if torch.is_tensor(t)
    )
    return stored / max(1, elements)


def train(task: Task, model: nn.Module, optimizer: Any, steps: int) -> Dict[str, Any]:
    """``steps`` steps of ``optimizer`` under the shared schedule, through the suite's loop or
    the task's own (:attr:`~benchmarks.learning_quality.base.Task.custom_loop`); the curve, the
    flags and the costs (:class:`Recorder`)."""
    scheduler = optimizers.schedule(optimizer, steps)
    recorder = Recorder(task, model, steps)
    handles = recorder.watch(optimizer)
    try:
        if task.custom_loop:
            task.fit(model, optimizer, scheduler, recorder)
        else:
            for step in range(steps):
                begin = time.perf_counter()
                inputs, target = task.batch(step)
                optimizer.zero_grad(set_to_none=True)
                loss = task.loss(model(inputs), target)
                if recorder.loss(step, loss.item()):
                    break
                loss.backward()
                optimizer.step()
                scheduler.step()
                if recorder.stepped(step, time.perf_counter() - begin):
                    break
    finally:
        for handle in handles:
            handle.remove()
    return recorder.result(optimizer)


def _optimizer(job: Dict[str, Any], model: nn.Module) -> Any:
    return optimizers.build(
        job["optimizer"],
        model,
        job["lr"],
        job["paths"],
        job["backends"],
        roles=job.get("roles", optimizers.DEFAULT_ROLES),
        weight_decay=job.get("weight_decay", 0.0),
        matrix_scale=job.get("matrix_scale", "none"),
    )


def prepare_task(name: str, seed: int, steps: int) -> str:
    """A task's one-off work (:meth:`~benchmarks.learning_quality.base.Task.prepare`) in this
    process; the task's name (for a pool's results)."""
    tasks.make(name, seed, steps).prepare()
    return name


def run_job(job: Dict[str, Any]) -> Dict[str, Any]:
    """Run one job (``task``, ``seed``, ``steps``, ``optimizer``, ``lr``, ``paths``,
    ``backends``, optionally ``roles`` and ``weight_decay``) and return its record: the job's
    identity (with its weight decay) and :func:`train`'s result. ``seconds`` counts from the
    model's construction (a task's :meth:`~benchmarks.learning_quality.base.Task.prepare` is not
    in it)."""
    task = tasks.make(job["task"], job["seed"], job["steps"])
    task.prepare()  # loads what the runner prepared (pre-training) before the clock starts
    begin = time.perf_counter()
    model = task.model()
    optimizer = _optimizer(job, model)
    record = train(task, model, optimizer, job["steps"])
    identity = {key: job[key] for key in ("task", "seed", "steps", "optimizer", "lr")}
    identity["weight_decay"] = job.get("weight_decay", 0.0)
    return {**identity, **record, "seconds": time.perf_counter() - begin}


def time_job(job: Dict[str, Any], reps: int = 3) -> Tuple[float, float, float]:
    """Seconds of ``job``'s set-up (model, optimizer and first step), per later step (the
    fastest of ``reps``) and per validation: the basis of the up-front estimate. Timed on the
    task's :meth:`~benchmarks.learning_quality.base.Task.timing_model` in the suite's loop (no
    pre-training; a task with its own loop is timed in this one too)."""
    task = tasks.make(job["task"], job["seed"], job["steps"])
    begin = time.perf_counter()
    model = task.timing_model()
    optimizer = _optimizer(job, model)
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
    roles: str = optimizers.DEFAULT_ROLES,
    weight_decay: float = 0.0,
    matrix_scale: str = "none",
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
        optimizer = optimizers.build(
            kind,
            model,
            lr,
            paths,
            backends,
            roles=roles,
            weight_decay=weight_decay,
            matrix_scale=matrix_scale,
        )
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
