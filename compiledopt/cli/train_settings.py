"""The options of ``compiledopt train`` and its ``--config`` files: each option's type, and the
settings of a run (:class:`compiledopt.apps.train_settings.TrainSettings`), command line over
``--config`` over the built-in defaults. The checks that need more than an option's text are
the application's (:mod:`compiledopt.apps.train_settings`).

A setting is known by its option's name with underscores (``meta_steps`` for ``--meta-steps``),
which is also its key in a ``--config`` file and its name in the messages of a refused resume.
"""

import argparse
from typing import Any, Callable, Dict

from compiledopt.apps.config import layered, read_config
from compiledopt.apps.train_settings import DEFAULTS, TrainSettings
from compiledopt.cli.arguments import (
    names_of,
    non_negative_int,
    positive_float,
    positive_int,
    random_seed,
)

__all__ = ["TYPES", "fraction", "routes_option", "settings"]


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


def _config_value(key: str, value: Any, source: str) -> Any:
    """A --config value checked as its option's argparse type checks the command line."""
    from compiledopt.meta.resume import show

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


def settings(args: argparse.Namespace) -> TrainSettings:
    """The run's settings, command line over --config over the built-in defaults
    (:func:`~compiledopt.apps.config.layered`); ``given`` names those set explicitly (on the
    command line or in the file)."""
    config = {} if args.config is None else read_config(args.config, DEFAULTS, _config_value)
    values, given = layered(DEFAULTS, config, vars(args))
    if isinstance(values["export_backends"], str):
        values["export_backends"] = _backends(values["export_backends"])
    return TrainSettings(
        **values,
        resume=args.resume,
        allow_changes=args.allow_changes,
        progress=not args.no_progress,
        config_file=args.config,
        given=given,
    )


def _backends(text: str) -> Any:
    """The backends of ``--export-backends`` (e.g. ``torchscript,onnx``), checked."""
    from compiledopt.export import BACKENDS

    try:
        return names_of(BACKENDS, "backend")(text)
    except argparse.ArgumentTypeError as error:
        raise ValueError(f"--export-backends {text!r}: {error}") from None
