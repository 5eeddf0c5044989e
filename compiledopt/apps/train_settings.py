"""The settings of meta-training (:func:`compiledopt.apps.train.meta_train`, ``compiledopt
train``): their defaults, and every check that runs before any work (so a bad run stops in a
second, with one line naming the option).

A setting is known by its option's name with underscores (``meta_steps`` for ``--meta-steps``),
which is also its key in a ``--config`` file, its name in the messages of a refused resume and,
for the meta-training settings, its field of :class:`~compiledopt.meta.MetaConfig`.
"""

import dataclasses
import os
from typing import Any, Callable, Dict, FrozenSet, List, Optional, Sequence

import compiledopt.apps.values as parse
from compiledopt.apps.paths import check_output_directory, check_output_file

__all__ = [
    "DEFAULTS",
    "DEFAULT_CHECKPOINT",
    "MAX_INNER_STEPS",
    "MAX_META_STEPS",
    "MAX_TASKS",
    "PARSERS",
    "TrainSettings",
    "build_config",
    "check_device",
    "check_settings",
    "config_value",
    "default_checkpoint",
    "option",
    "recorded_settings",
    "requested_settings",
    "resumable",
]

#: The checkpoint's file name under ``<output root>/train`` when no ``output`` is given.
DEFAULT_CHECKPOINT = "learned.pt"


@dataclasses.dataclass
class TrainSettings:
    """One meta-training run. The settings up to ``export_lr`` are ``compiledopt train``'s
    options (``None``: the estimator's own default, or the catalog's inner lr); the rest say
    how the run goes.

    ``given`` names the settings set explicitly (``compiledopt train``: on the command line or
    in its ``--config`` file); ``None``: those that differ from their defaults. A setting that
    only another estimator reads, or an export setting without ``export``, is refused when given.
    ``overwrite`` lets the run replace an existing checkpoint at ``output`` (which ``resume``
    continues instead) and an existing artifact folder at ``export`` (only a compiledopt
    artifact: :func:`~compiledopt.apps.paths.check_output_directory`); without it either is
    refused before any work.
    """

    transform: str = "coordinate-mlp"
    transform_kwargs: Dict[str, Any] = dataclasses.field(default_factory=dict)
    family: str = "regression"
    family_kwargs: Dict[str, Any] = dataclasses.field(default_factory=dict)
    estimator: str = "tbptt"
    meta_steps: Optional[int] = None
    unroll: Optional[int] = None
    horizon: Optional[int] = None
    min_horizon: Optional[int] = None
    tasks_per_step: Optional[int] = None
    inner_lr: Optional[float] = None
    meta_lr: Optional[float] = None
    clip_norm: Optional[float] = None
    eval_every: Optional[int] = None
    eval_tasks: Optional[int] = None
    eval_steps: Optional[int] = None
    checkpoint_every: Optional[int] = None
    pairs: Optional[int] = None
    sigma: Optional[float] = None
    objective: Optional[str] = None
    warmup_fraction: Optional[float] = None
    routes: Optional[Dict[str, str]] = None
    seed: int = 0
    device: str = "cpu"
    output: Optional[str] = None  # <output root>/train/learned.pt (see default_checkpoint)
    processes: int = 1
    export: Optional[str] = None
    export_backends: Sequence[str] = ("torchscript", "onnx")
    export_lr: Optional[float] = None
    resume: bool = False
    overwrite: bool = False
    allow_changes: Sequence[str] = ()
    progress: bool = True
    config_file: Optional[str] = None  # recorded in an evolution-strategies run's metadata
    given: Optional[FrozenSet[str]] = None

    def values(self) -> Dict[str, Any]:
        """The settings ``DEFAULTS`` names, by name."""
        return {key: getattr(self, key) for key in DEFAULTS}

    def explicit(self) -> FrozenSet[str]:
        """``given``, or the settings that differ from their defaults."""
        if self.given is not None:
            return frozenset(self.given)
        values = {**self.values(), "export_backends": tuple(self.export_backends)}
        return frozenset(k for k, v in values.items() if v != DEFAULTS[k])


def _default(field: "dataclasses.Field[Any]") -> Any:
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


#: The defaults of the settings that ``compiledopt train``'s options and ``--config`` file set
#: (None: the estimator's own default).
DEFAULTS: Dict[str, Any] = {
    field.name: _default(field)
    for field in dataclasses.fields(TrainSettings)
    if field.name
    not in ("resume", "overwrite", "allow_changes", "progress", "config_file", "given")
}


#: The most meta-steps a run takes: a run of more would not finish.
MAX_META_STEPS = 10_000_000
#: The most inner steps (``unroll``, ``horizon``, ``min_horizon``, ``eval_steps``): an evaluation
#: keeps a curve of ``eval_steps + 1`` losses per task, allocated before its first step.
MAX_INNER_STEPS = 1_000_000
#: The most tasks (``tasks_per_step``, ``eval_tasks``), antithetic ``pairs`` and ``processes``:
#: each task slot holds a model, all built before the first step.
MAX_TASKS = 10_000

_steps = parse.positive_int_up_to(MAX_INNER_STEPS)
_tasks = parse.positive_int_up_to(MAX_TASKS)

#: The parser of each numeric setting's text (:mod:`compiledopt.apps.values`): the type of its
#: command-line option, also applied to the values of a ``--config`` file.
PARSERS: Dict[str, Callable[[str], Any]] = {
    "meta_steps": parse.positive_int_up_to(MAX_META_STEPS),
    "unroll": _steps,
    "horizon": _steps,
    "min_horizon": _steps,
    "tasks_per_step": _tasks,
    "eval_every": parse.non_negative_int,
    "eval_tasks": _tasks,
    "eval_steps": _steps,
    "checkpoint_every": parse.non_negative_int,
    "pairs": _tasks,
    "processes": _tasks,
    "seed": parse.random_seed,
    "inner_lr": parse.positive_float,
    "meta_lr": parse.positive_float,
    "clip_norm": parse.positive_float,
    "sigma": parse.positive_float,
    "export_lr": parse.positive_float,
    "warmup_fraction": parse.fraction,
}
_OBJECTS = ("transform_kwargs", "family_kwargs")
_FLOATS = ("inner_lr", "meta_lr", "clip_norm", "sigma", "export_lr", "warmup_fraction")


def config_value(key: str, value: Any, source: str) -> Any:
    """A ``--config`` file's value of setting ``key``, checked as its option checks the command
    line; ``ValueError`` naming ``source``, the key and the value."""
    from compiledopt.meta.resume import show

    if value is None and DEFAULTS[key] is None:
        return None
    if key in PARSERS:
        numeric = isinstance(value, (int, float)) if key in _FLOATS else isinstance(value, int)
        if isinstance(value, bool) or not numeric:
            kind = "a number" if key in _FLOATS else "an integer"
            raise ValueError(f"{source}: {key} must be {kind}, got {show(value)}")
        try:
            return PARSERS[key](repr(value))
        except ValueError as error:
            raise ValueError(f"{source}: {key} {error}") from None
    if key == "routes":
        if isinstance(value, str):
            try:
                return parse.routes(value)
            except ValueError as error:
                raise ValueError(f"{source}: routes {error}") from None
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            raise ValueError(
                f"{source}: routes must be a JSON object of roles to rule names, got {show(value)}"
            )
        return value
    if key in _OBJECTS:
        if not isinstance(value, dict):
            raise ValueError(f"{source}: {key} must be a JSON object, got {show(value)}")
        return value
    if not isinstance(value, str):
        raise ValueError(f"{source}: {key} must be a string, got {show(value)}")
    return value


def option(name: str) -> str:
    """The command-line option of a setting: ``meta_steps`` -> ``--meta-steps``."""
    return "--" + name.replace("_", "-")


def default_checkpoint() -> str:
    """Where ``train`` writes its checkpoint when neither ``--output`` nor ``--config`` names
    one: ``<output root>/train/learned.pt`` (see :mod:`compiledopt.apps.paths`), never the
    current folder. The folder is checked here, before any work, and created only once every
    other setting has been accepted."""
    from compiledopt.apps.paths import default_output

    return str(default_output("train", "--output") / DEFAULT_CHECKPOINT)


def check_device(text: str) -> None:
    """Refuse a device that is not one, or that this machine does not have."""
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {text!r}: not a device (e.g. cpu, cuda, cuda:1)") from None
    if device.type == "cpu":
        return
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {text}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            count = torch.cuda.device_count()
            raise ValueError(f"--device {text}: this machine has {count} CUDA device(s)")
        return
    if device.type == "mps" and torch.backends.mps.is_available():
        return
    raise ValueError(f"--device {text}: not available here (use cpu, or cuda where it exists)")


def _check_estimator_options(settings: TrainSettings, given: FrozenSet[str]) -> None:
    """Refuse an estimator that is not registered, and the options the estimator would
    ignore."""
    from compiledopt.meta import ESTIMATORS
    from compiledopt.meta.estimator import OPTIONAL
    from compiledopt.meta.resume import show

    if settings.estimator not in ESTIMATORS:
        raise ValueError(f"Invalid estimator: {settings.estimator!r} (one of {list(ESTIMATORS)})")
    reads = ESTIMATORS[settings.estimator].DEFAULTS
    for key in OPTIONAL:
        if key in given and key in DEFAULTS and key not in reads:
            readers = " or ".join(n for n, e in ESTIMATORS.items() if key in e.DEFAULTS)
            raise ValueError(
                f"{option(key)} {show(getattr(settings, key))}: only --estimator {readers} "
                f"uses it (this run: {settings.estimator})"
            )
    if settings.allow_changes and not settings.resume:
        raise ValueError("--allow-changes: only a resumed run (--resume) changes settings")


def check_settings(settings: TrainSettings) -> None:
    """Everything that can be checked without building anything: options the estimator would
    ignore, the device, the checkpoint path, the export folder and backends."""
    from compiledopt.export import BACKENDS

    given = settings.explicit()
    _check_estimator_options(settings, given)
    check_device(settings.device)
    hint = "pass --resume to continue it, or --overwrite to replace it"
    replace = settings.resume or settings.overwrite
    output = check_output_file(str(settings.output), "--output", replace, hint)
    if settings.resume and not os.path.exists(output):
        raise ValueError(f"--resume: no checkpoint at {output}")
    unknown = [name for name in settings.export_backends if name not in BACKENDS]
    if unknown or not settings.export_backends:
        raise ValueError(
            f"export_backends {list(settings.export_backends)!r}: needs backends out of "
            f"{', '.join(BACKENDS)}"
        )
    if settings.export is None:
        unused = [key for key in ("export_backends", "export_lr") if key in given]
        if unused:
            raise ValueError(f"{option(unused[0])}: needs --export (the artifact's folder)")
    else:
        check_output_directory(settings.export, "--export", settings.overwrite)
        export, checkpoint = os.path.abspath(settings.export), os.path.abspath(output)
        if export == checkpoint:
            raise ValueError(f"--export {settings.export}: the same path as --output")
        if checkpoint.startswith(os.path.join(export, "")):  # the export would replace it
            raise ValueError(f"--export {settings.export}: holds the --output checkpoint {output}")


def _in_option_names(message: str) -> str:
    """``message`` with the settings' names replaced by their options (``--horizon``)."""
    import re

    pattern = r"\b(" + "|".join(sorted(map(re.escape, DEFAULTS), key=len, reverse=True)) + r")\b"
    return re.sub(pattern, lambda match: option(match.group(1)), message)


def build_config(values: Dict[str, Any], **extra: Any) -> Any:
    """The run's :class:`~compiledopt.meta.MetaConfig` from the settings (those left ``None``
    take the estimator's defaults), validated; an invalid value is refused with its option's
    name."""
    from compiledopt.meta import MetaConfig

    known = {f.name for f in dataclasses.fields(MetaConfig)}
    kwargs = {key: value for key, value in values.items() if key in known and value is not None}
    kwargs.update(extra)
    try:
        return MetaConfig(**kwargs).validate()
    except ValueError as error:
        raise ValueError(_in_option_names(str(error))) from None


def _dict(holder: Any, key: str) -> Dict[str, Any]:
    value = holder.get(key) if isinstance(holder, dict) else None
    return value if isinstance(value, dict) else {}


def recorded_settings(state: Dict[str, Any]) -> Dict[str, Any]:
    """The settings a checkpoint records, by name (those it lacks are left out)."""
    config, metadata, family = (
        _dict(state, "config"),
        _dict(state, "metadata"),
        _dict(state, "family"),
    )
    spec = _dict(metadata, "transform_spec")
    recorded: Dict[str, Any] = {}
    if "name" in spec:
        recorded["transform"] = spec["name"]
        recorded["transform_kwargs"] = spec.get("kwargs") or {}
    if "name" in family:
        recorded["family"] = family["name"]
    if "family_kwargs" in metadata:
        recorded["family_kwargs"] = metadata["family_kwargs"]
    if "world" in state:
        recorded["processes"] = state["world"]
    recorded.update(config)
    return recorded


def requested_settings(values: Dict[str, Any], config: Any) -> Dict[str, Any]:
    """The settings this run asks for, by name (the run's config setting by setting)."""
    requested = {
        key: values[key]
        for key in ("transform", "transform_kwargs", "family", "family_kwargs", "processes")
    }
    requested.update(dataclasses.asdict(config))
    return requested


def resumable(state: Dict[str, Any], path: str) -> List[str]:
    """Refuse a checkpoint that lacks what a resume reads; returns its top-level keys."""
    from compiledopt.meta.loop import CHECKPOINT_FORMAT

    if isinstance(state.get("slots"), list) and state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(
            f"--resume {path}: a checkpoint of an older compiledopt (format "
            f"{state.get('format')!r}); it can be exported, not resumed (start a new run)"
        )
    for key, kind in (("config", dict), ("family", dict), ("slots", list)):
        if not isinstance(state.get(key), kind):
            raise ValueError(
                f"--resume {path}: not a checkpoint written by `compiledopt train` (no {key})"
            )
    return sorted(state)
