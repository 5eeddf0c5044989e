"""The settings of ``compiledopt train``: defaults, ``--config`` files, and every check that
runs before any work (so a bad run stops in a second, with one line naming the option).

A setting is known by its option's name with underscores (``meta_steps`` for ``--meta-steps``),
which is also its key in a ``--config`` file and its name in the messages of a refused resume.
"""

import argparse
import json
import os
from typing import Any, Callable, Dict, List, Set, Tuple

from compiledopt.apps.paths import check_output_directory, check_output_file
from compiledopt.cli.arguments import (
    names_of,
    non_negative_int,
    positive_float,
    positive_int,
    random_seed,
)
from compiledopt.cli.checkpoints import show

__all__ = [
    "DEFAULTS",
    "DEFAULT_CHECKPOINT",
    "ESTIMATORS",
    "ES_FIELDS",
    "ES_ONLY",
    "TBPTT_FIELDS",
    "TYPES",
    "build_config",
    "check_device",
    "check_settings",
    "default_checkpoint",
    "fraction",
    "option",
    "routes_option",
    "settings",
]

ESTIMATORS = ("tbptt", "pes", "es")
#: The checkpoint's file name under ``<output root>/train`` when no ``--output`` is given.
DEFAULT_CHECKPOINT = "learned.pt"
# Built-in defaults of the options that --config may set (None: the estimator's own default).
DEFAULTS: Dict[str, Any] = {
    "transform": "coordinate-mlp",
    "transform_kwargs": {},
    "family": "regression",
    "family_kwargs": {},
    "estimator": "tbptt",
    "meta_steps": None,
    "unroll": None,
    "horizon": None,
    "min_horizon": None,
    "tasks_per_step": None,
    "inner_lr": None,
    "meta_lr": None,
    "clip_norm": None,
    "eval_every": None,
    "eval_tasks": None,
    "eval_steps": None,
    "checkpoint_every": None,
    "pairs": None,
    "sigma": None,
    "objective": None,
    "warmup_fraction": None,
    "routes": None,
    "seed": 0,
    "device": "cpu",
    "output": None,  # <output root>/train/learned.pt (see default_checkpoint)
    "processes": 1,
    "export": None,
    "export_backends": "torchscript,onnx",
    "export_lr": None,
}
# Option -> field of the evolution-strategies config (ESConfig) and of MetaTrainConfig.
ES_FIELDS = {
    "meta_steps": "outer_steps",
    "unroll": "truncation",
    "horizon": "max_unroll",
    "min_horizon": "min_unroll",
    "tasks_per_step": "tasks_per_step",
    "inner_lr": "inner_lr",
    "meta_lr": "meta_lr",
    "clip_norm": "clip_norm",
    "eval_every": "eval_every",
    "eval_tasks": "eval_tasks",
    "eval_steps": "eval_steps",
    "checkpoint_every": "checkpoint_every",
    "pairs": "pairs",
    "sigma": "sigma",
    "objective": "objective",
    "warmup_fraction": "warmup_fraction",
    "routes": "routes",
}
TBPTT_FIELDS = {
    "meta_steps": "meta_steps",
    "unroll": "unroll_length",
    "horizon": "horizon",
    "tasks_per_step": "tasks_per_step",
    "inner_lr": "inner_lr",
    "meta_lr": "meta_lr",
    "clip_norm": "clip_norm",
    "eval_every": "eval_every",
    "eval_tasks": "eval_tasks",
    "eval_steps": "eval_steps",
    "checkpoint_every": "checkpoint_every",
    "routes": "routes",
}
#: Options that only the evolution-strategies estimators use (tbptt would ignore them).
ES_ONLY = tuple(sorted(set(ES_FIELDS) - set(TBPTT_FIELDS)))


def fraction(text: str) -> float:
    """argparse type: a number in ``[0, 1)``."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1), got {text!r}") from None
    if not 0 <= value < 1:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1), got {text}")
    return value


def routes_option(text: str) -> Dict[str, str]:
    """argparse type: ``role=rule[,role=rule...]`` (e.g. ``matrix=orthogonal,vector=adam``) as a
    dict; each role named once. Roles and rules are checked against the transform later."""
    routes: Dict[str, str] = {}
    for piece in text.split(","):
        role, equals, rule = piece.strip().partition("=")
        role, rule = role.strip(), rule.strip()
        if not equals or not role or not rule:
            raise argparse.ArgumentTypeError(
                f"expected role=rule[,role=rule...] (e.g. matrix=orthogonal), got {piece!r}"
            )
        if role in routes:
            raise argparse.ArgumentTypeError(f"role {role!r} is routed twice")
        routes[role] = rule
    return routes


#: The argparse type of each numeric option, also applied to the values of a --config file.
TYPES: Dict[str, Callable[[str], Any]] = {
    "meta_steps": positive_int,
    "unroll": positive_int,
    "horizon": positive_int,
    "min_horizon": positive_int,
    "tasks_per_step": positive_int,
    "eval_every": non_negative_int,
    "eval_tasks": positive_int,
    "eval_steps": positive_int,
    "checkpoint_every": non_negative_int,
    "pairs": positive_int,
    "processes": positive_int,
    "seed": random_seed,
    "inner_lr": positive_float,
    "meta_lr": positive_float,
    "clip_norm": positive_float,
    "sigma": positive_float,
    "export_lr": positive_float,
    "warmup_fraction": fraction,
}
_OBJECTS = ("transform_kwargs", "family_kwargs")
_FLOATS = ("inner_lr", "meta_lr", "clip_norm", "sigma", "export_lr", "warmup_fraction")


def option(name: str) -> str:
    """The command-line option of a setting: ``meta_steps`` -> ``--meta-steps``."""
    return "--" + name.replace("_", "-")


def _config_value(key: str, value: Any, source: str) -> Any:
    """A --config value checked as its option's argparse type checks the command line."""
    if value is None and DEFAULTS[key] is None:
        return None
    if key in TYPES:
        numeric = isinstance(value, (int, float)) if key in _FLOATS else isinstance(value, int)
        if isinstance(value, bool) or not numeric:
            kind = "a number" if key in _FLOATS else "an integer"
            raise ValueError(f"{source}: {key} must be {kind}, got {show(value)}")
        try:
            return TYPES[key](repr(value))
        except argparse.ArgumentTypeError as error:
            raise ValueError(f"{source}: {key} {error}") from None
    if key == "routes":
        if isinstance(value, str):
            try:
                return routes_option(value)
            except argparse.ArgumentTypeError as error:
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


def _read_config(path: str) -> Dict[str, Any]:
    source = f"--config {path}"
    try:
        with open(path, encoding="utf-8") as handle:
            loaded = json.load(handle)
    except FileNotFoundError:
        raise ValueError(f"--config {path}: No such file or directory") from None
    except IsADirectoryError:
        raise ValueError(f"{source}: is a directory, not a JSON file") from None
    except UnicodeDecodeError:
        raise ValueError(f"{source}: not JSON (not UTF-8 text)") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{source}: not JSON ({error})") from None
    if not isinstance(loaded, dict):
        raise ValueError(f"{source}: expected a JSON object, got {type(loaded).__name__}")
    unknown = sorted(set(loaded) - set(DEFAULTS) - {"comment"})
    if unknown:
        raise ValueError(f"{source}: unknown keys {unknown} (known: {', '.join(DEFAULTS)})")
    return {k: _config_value(k, v, source) for k, v in loaded.items() if k != "comment"}


def settings(args: argparse.Namespace) -> Tuple[Dict[str, Any], Set[str]]:
    """The run's settings, command line over --config over the built-in defaults, and the
    names of those set explicitly (on the command line or in the file)."""
    values = dict(DEFAULTS)
    given: Set[str] = set()
    if args.config is not None:
        loaded = _read_config(args.config)
        values.update(loaded)
        given.update(k for k, v in loaded.items() if v is not None)
    for key in DEFAULTS:
        value = getattr(args, key, None)
        if value is not None:
            values[key] = value
            given.add(key)
    if values["estimator"] not in ESTIMATORS:
        raise ValueError(f"Invalid estimator: {values['estimator']!r} (one of {ESTIMATORS})")
    if values["output"] is None:
        values["output"] = default_checkpoint()
    return values, given


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


def check_settings(values: Dict[str, Any], given: Set[str], args: argparse.Namespace) -> None:
    """Everything that can be checked without building anything: options the estimator would
    ignore, the device, the checkpoint path, the export folder and backends."""
    from compiledopt.export import BACKENDS

    if values["estimator"] == "tbptt":
        ignored = [key for key in ES_ONLY if key in given]
        if ignored:
            key = ignored[0]
            raise ValueError(
                f"{option(key)} {show(values[key])}: only --estimator pes or es uses it "
                "(this run: tbptt)"
            )
        if values["processes"] != 1:
            raise ValueError(
                f"--processes {values['processes']}: only --estimator pes or es runs in "
                "several processes"
            )
        if args.allow_changes and not args.resume:
            raise ValueError("--allow-changes: only a resumed run (--resume) changes settings")
    elif args.allow_changes:
        raise ValueError(
            f"--allow-changes: only --estimator tbptt can change settings on resume "
            f"(this run: {values['estimator']})"
        )
    check_device(values["device"])
    output = check_output_file(values["output"], "--output")
    if args.resume and not os.path.exists(output):
        raise ValueError(f"--resume: no checkpoint at {output}")
    export_backends = values["export_backends"]
    try:
        names_of(BACKENDS, "backend")(export_backends)
    except argparse.ArgumentTypeError as error:
        raise ValueError(f"--export-backends {export_backends!r}: {error}") from None
    if values["export"] is None:
        unused = [key for key in ("export_backends", "export_lr") if key in given]
        if unused:
            raise ValueError(f"{option(unused[0])}: needs --export (the artifact's folder)")
    else:
        check_output_directory(values["export"], "--export", overwrite=True)
        if os.path.abspath(values["export"]) == os.path.abspath(output):
            raise ValueError(f"--export {values['export']}: the same path as --output")


def _in_option_names(message: str, fields: Dict[str, str]) -> str:
    """``message`` with the config's field names replaced by the options that set them."""
    import re

    names = {field: option(key) for key, field in fields.items()}
    pattern = r"\b(" + "|".join(sorted(map(re.escape, names), key=len, reverse=True)) + r")\b"
    return re.sub(pattern, lambda match: names[match.group(1)], message)


def build_config(values: Dict[str, Any], fields: Dict[str, str], cls: type, **extra: Any) -> Any:
    """The trainer's config (``MetaTrainConfig`` or ``ESConfig``) from the settings, validated;
    an invalid combination is refused with the options' names (``--horizon`` for
    ``max_unroll``)."""
    import dataclasses

    known = {f.name for f in dataclasses.fields(cls)}
    kwargs = {field: values[key] for key, field in fields.items() if values[key] is not None}
    kwargs.update(extra)
    try:
        return cls(**{k: v for k, v in kwargs.items() if k in known}).validate()
    except ValueError as error:
        raise ValueError(_in_option_names(str(error), fields)) from None


def recorded_settings(state: Dict[str, Any], fields: Dict[str, str]) -> Dict[str, Any]:
    """The settings a checkpoint records, by option name (those it lacks are left out)."""
    config = state.get("config") if isinstance(state.get("config"), dict) else {}
    metadata = state.get("metadata") if isinstance(state.get("metadata"), dict) else {}
    spec = (
        metadata.get("transform_spec") if isinstance(metadata.get("transform_spec"), dict) else {}
    )
    family = state.get("family") if isinstance(state.get("family"), dict) else {}
    training = metadata.get("training") if isinstance(metadata.get("training"), dict) else {}
    recorded: Dict[str, Any] = {}
    if "name" in spec:
        recorded["transform"] = spec["name"]
        recorded["transform_kwargs"] = spec.get("kwargs") or {}
    if "name" in family:
        recorded["family"] = family["name"]
    if "family_kwargs" in metadata:
        recorded["family_kwargs"] = metadata["family_kwargs"]
    elif "family_kwargs" in training:
        recorded["family_kwargs"] = training["family_kwargs"]
    if "seed" in state:
        recorded["seed"] = state["seed"]
    elif "seed" in family:
        recorded["seed"] = family["seed"]
    if "world" in state:
        recorded["processes"] = state["world"]
    by_field = {field: key for key, field in fields.items()}
    for field, value in config.items():
        recorded[by_field.get(field, field)] = value
    return recorded


def requested_settings(
    values: Dict[str, Any], config: Any, fields: Dict[str, str], processes: bool
) -> Dict[str, Any]:
    """The settings this run asks for, by option name (the trainer's config field by field)."""
    import dataclasses

    by_field = {field: key for key, field in fields.items()}
    requested = {
        key: values[key]
        for key in ("transform", "transform_kwargs", "family", "family_kwargs", "seed")
    }
    if processes:
        requested["processes"] = values["processes"]
    for field, value in dataclasses.asdict(config).items():
        requested[by_field.get(field, field)] = value
    return requested


def resumable(state: Dict[str, Any], path: str) -> List[str]:
    """Refuse a checkpoint that lacks what a resume reads; returns its top-level keys."""
    for key, kind in (("config", dict), ("family", dict), ("slots", list)):
        if not isinstance(state.get(key), kind):
            raise ValueError(
                f"--resume {path}: not a checkpoint written by `compiledopt train` (no {key})"
            )
    return sorted(state)
