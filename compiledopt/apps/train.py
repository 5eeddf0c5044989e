"""Meta-training a learned optimizer on a built-in task family (``compiledopt train``).

:func:`meta_train` checks every setting (:mod:`compiledopt.apps.train_settings`) before any work,
then meta-trains with :class:`~compiledopt.meta.MetaLoop` and the estimator the settings name
(truncated back-propagation ``"tbptt"``, or evolution strategies ``"pes"``, ``"es"``), in one
process or several (:func:`compiledopt.meta.launch.run_meta`), writes a checkpoint that a
resumed run (``resume=True``) continues exactly, optionally exports it as an artifact
(:func:`compiledopt.export.export_shape_agnostic`), and returns a :class:`TrainResult`.
"""

import dataclasses
import json
import math
import os
import time
from typing import Any, Dict, List, Optional, Tuple

from compiledopt.apps.export import RANKS
from compiledopt.apps.requirements import require_task_family
from compiledopt.apps.train_settings import (
    TrainSettings,
    build_config,
    check_settings,
    default_checkpoint,
    recorded_settings,
    requested_settings,
    resumable,
)

__all__ = ["EXPORT_RANKS", "FIXED_ON_RESUME", "TrainResult", "TrainSettings", "meta_train"]

#: Settings a resumed run cannot change, even when asked: they decide what the weights are and
#: which tasks the saved task slots hold.
FIXED_ON_RESUME = ("transform", "transform_kwargs", "family", "seed", "tasks_per_step", "processes")
#: The parameter ranks the artifact holds graphs for: all an artifact can hold.
EXPORT_RANKS = RANKS


@dataclasses.dataclass
class TrainResult:
    """What :func:`meta_train` did.

    Attributes:
        settings: the run's settings, defaults filled in (``output``: the checkpoint).
        history: the meta-loss (tbptt) or the objective (pes, es) of every step.
        evaluations: ``(step, final held-out loss)`` of every evaluation.
        steps: the steps that ran, in words.
        inner_lr: the inner learning rate.
        seconds: the meta-training's wall time.
        changes: the settings a resumed run changed, ``{"setting", "from", "to"}`` each.
        artifact: the exported artifact's path, or ``None``.
        export_seconds: the export's wall time.
        stopped_by: the signal that ended the run early (``"SIGTERM"``), checkpointed at a
            meta-step boundary for ``resume`` (nothing exported), or ``None``.
    """

    settings: TrainSettings
    history: List[float]
    evaluations: List[Tuple[int, float]]
    steps: str
    inner_lr: float
    seconds: float
    changes: List[Dict[str, Any]]
    artifact: Optional[str] = None
    export_seconds: float = 0.0
    stopped_by: Optional[str] = None

    @property
    def exit_status(self) -> int:
        """0, or for a run a signal ended early ``128 +`` its number (as a shell reports a
        process the signal ended; 143 for ``SIGTERM``, 130 for ``SIGINT``, 1 if unnamed)."""
        import signal

        if self.stopped_by is None:
            return 0
        known = self.stopped_by in signal.Signals.__members__
        return 128 + int(signal.Signals[self.stopped_by]) if known else 1

    def summary(self) -> List[Tuple[str, str]]:
        """The summary's ``(name, value)`` rows."""
        from compiledopt.meta.resume import RESUMABLE_CHANGES

        s = self.settings
        finite = [h for h in self.history if math.isfinite(h)]
        first, last = (finite[0], finite[-1]) if finite else (math.nan, math.nan)
        rows = [
            ("transform", f"{s.transform} {json.dumps(s.transform_kwargs)}"),
            ("task family", f"{s.family} (seed {s.seed}, device {s.device})"),
            ("estimator", s.estimator),
            ("meta-steps", f"{self.steps} (inner lr {self.inner_lr:g})"),
            ("meta-loss", f"{first:.4g} -> {last:.4g}"),
            ("time", f"{self.seconds:.1f} s"),
            ("checkpoint", str(s.output)),
        ]
        for change in self.changes:
            if change["setting"] not in RESUMABLE_CHANGES:
                rows.append(("changed", f"{change['setting']}: {change['from']} -> {change['to']}"))
        if self.artifact is not None:
            rows.append(("artifact", str(s.export)))
        if self.stopped_by is not None:
            rows.append(("stopped", f"by {self.stopped_by}; --resume continues the run"))
        return rows


@dataclasses.dataclass
class _Plan:
    """What :func:`meta_train` checked and built before any work."""

    inner_lr: float
    config: Any
    changes: List[Dict[str, Any]]


def _check_resume(
    state: Dict[str, Any], settings: TrainSettings, config: Any
) -> List[Dict[str, Any]]:
    """The checkpoint's settings against this run's (see
    :func:`compiledopt.meta.resume.check_resume`)."""
    from compiledopt.meta.resume import check_resume

    resumable(state, str(settings.output))
    written = state.get("estimator")
    if written != settings.estimator:
        raise ValueError(
            f"--resume {settings.output}: written by --estimator {written}, "
            f"not by --estimator {settings.estimator}"
        )
    recorded = recorded_settings(state)
    requested = requested_settings(settings.values(), config)
    return check_resume(recorded, requested, settings.allow_changes, FIXED_ON_RESUME)


def _prepare(settings: TrainSettings) -> _Plan:
    """Build the transform, the family and the config once, and read a checkpoint to resume,
    so that bad settings fail before any work."""
    from compiledopt.learned.catalog import CATALOG, LEARNED, build_transform
    from compiledopt.meta.inner import check_routes, check_rules
    from compiledopt.meta.launch import make_family
    from compiledopt.meta.resume import load_checkpoint

    s = settings
    if s.transform not in LEARNED:
        raise ValueError(f"Invalid transform: {s.transform!r} (one of {list(LEARNED)})")
    inner_lr = s.inner_lr or CATALOG[s.transform].inner_lr
    try:
        built = build_transform(s.transform, s.transform_kwargs)
    except TypeError as error:
        raise ValueError(f"--transform-kwargs {json.dumps(s.transform_kwargs)}: {error}") from None
    check_rules(built, check_routes(s.routes, "--routes"), "--routes")
    make_family(s.family, s.seed, s.device, s.family_kwargs)
    config = build_config(s.values(), inner_lr=inner_lr)
    changes: List[Dict[str, Any]] = []
    if s.resume:
        state = load_checkpoint(str(s.output), "--resume")
        changes = _check_resume(state, s, config)
    return _Plan(inner_lr, config, changes)


def _train(
    s: TrainSettings, plan: _Plan
) -> Tuple[List[float], List[Tuple[int, float]], str, Optional[str]]:
    """Meta-train (in ``s.processes`` processes): ``(meta-losses, evaluations, steps text, the
    signal that stopped it early or None)``."""
    import torch

    from compiledopt.meta.launch import run_meta

    config = plan.config
    if s.processes > config.tasks_per_step:  # the ranks past the slots would only idle
        raise ValueError(
            f"--processes {s.processes}: more than the {config.tasks_per_step} task slots "
            "(--tasks-per-step) to spread over them; a rank without a slot would be an idle "
            "process"
        )
    fields = {f.name for f in dataclasses.fields(config)}
    run_settings = {
        "transform": s.transform,
        "transform_kwargs": s.transform_kwargs,
        "family": s.family,
        "family_kwargs": s.family_kwargs,
        "device": s.device,
        "config": dataclasses.asdict(config),
        "output": s.output,
        "resume": bool(s.resume),
        "allow_changes": [key for key in s.allow_changes if key in fields],
        "changes": [c for c in plan.changes if c["setting"] not in fields],
        "processes": s.processes,
        "config_file": os.path.basename(s.config_file) if s.config_file else None,
    }
    run_meta(run_settings, progress=s.progress)
    saved = torch.load(str(s.output), map_location="cpu", weights_only=True)
    history = [r["loss"] for r in saved["history"]]
    evaluations = [(int(r["step"]), r["final_loss"]) for r in saved["evaluations"]]
    steps = f"{saved['meta_step']} x {config.tasks_per_step} tasks x unroll {config.unroll}"
    if config.pairs is not None:
        steps += f" x {config.pairs} pairs, tasks of {config.min_horizon}-{config.horizon} steps"
    stopped = saved.get("metadata", {}).get("training", {}).get("stopped_by")
    if stopped is not None:
        steps = f"{saved['meta_step']} of {config.meta_steps} meta-steps, then stopped: {steps}"
    return history, evaluations, steps, stopped


def _export(s: TrainSettings) -> str:
    """Export the checkpoint just written to ``s.export``, as ``compiledopt export`` does
    (:func:`~compiledopt.apps.export.export_checkpoint`, with ``export_lr``), replacing an
    existing artifact only with ``overwrite``; returns the artifact's path."""
    from compiledopt.apps.export import export_checkpoint
    from compiledopt.apps.paths import check_output_directory

    check_output_directory(str(s.export), "--export", s.overwrite)
    path = export_checkpoint(
        str(s.output),
        str(s.export),
        s.export_backends,
        EXPORT_RANKS,
        s.export_lr,
        overwrite=s.overwrite,
    )
    return str(path)


def meta_train(settings: TrainSettings) -> TrainResult:
    """Check every setting, then meta-train, checkpoint to ``settings.output`` and optionally
    export to ``settings.export``.

    Raises:
        ValueError: a bad setting (the message names its option, e.g. ``--meta-steps``), before
            any work; a resumed run whose settings differ from the checkpoint's where they may
            not (see :mod:`compiledopt.meta.resume`).
        compiledopt.apps.requirements.MissingDependencyError: the family needs a package that is
            not installed.
    """
    if settings.output is None:
        settings = dataclasses.replace(settings, output=default_checkpoint())
    require_task_family(settings.family)
    check_settings(settings)
    plan = _prepare(settings)
    os.makedirs(os.path.dirname(os.path.abspath(str(settings.output))), exist_ok=True)
    start = time.perf_counter()
    history, evaluations, steps, stopped = _train(settings, plan)
    seconds = time.perf_counter() - start
    result = TrainResult(
        settings,
        history,
        evaluations,
        steps,
        plan.inner_lr,
        seconds,
        plan.changes,
        stopped_by=stopped,
    )
    if settings.export is not None and stopped is None:
        start = time.perf_counter()
        result.artifact = _export(settings)
        result.export_seconds = time.perf_counter() - start
    return result
