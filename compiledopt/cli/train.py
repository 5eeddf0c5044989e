"""The ``compiledopt train`` command: meta-train a learned optimizer on a built-in task family.

Every option can also come from a JSON file (``--config``) whose keys are the options' names
with underscores (``"meta_steps"``, ``"transform_kwargs"``, ...); an option given on the command
line wins over the file, and the file over the built-in default.
"""

import argparse
from typing import Any, List, Optional, TextIO, Tuple

import compiledopt.apps.values as values
from compiledopt.apps.config import layered, read_config
from compiledopt.apps.train import meta_train
from compiledopt.apps.train_settings import (
    DEFAULTS,
    PARSERS,
    TrainSettings,
    config_value,
)
from compiledopt.cli.arguments import Commands, argtype, json_object
from compiledopt.cli.text import wrote_artifact

__all__ = ["add_parser", "run", "settings"]


def _number(parser: argparse.ArgumentParser, name: str, help_text: Optional[str] = None) -> None:
    """Add the option of setting ``name`` (``--meta-steps`` for ``meta_steps``), of its type."""
    parser.add_argument(
        f"--{name.replace('_', '-')}", type=argtype(PARSERS[name]), default=None, help=help_text
    )


def add_parser(commands: Commands) -> argparse.ArgumentParser:
    """Add the ``train`` subparser."""
    from compiledopt.learned.catalog import LEARNED
    from compiledopt.meta import ESTIMATORS
    from compiledopt.tasks import FAMILIES

    parser = commands.add_parser(
        "train",
        help="meta-train a shape-agnostic learned optimizer on a built-in task family",
        description=(
            "Meta-train a transform on tasks of a built-in family, by truncated "
            "back-propagation through unrolls (tbptt) or by evolution strategies (pes: "
            "persistent, es: truncated; antithetic); evaluate it on held-out tasks and save a "
            "checkpoint that `--resume` continues exactly. Options may come from a JSON "
            "--config file; the command line wins."
        ),
    )
    add = parser.add_argument
    add("--config", default=None, help="a JSON file of option values (keys: option names)")
    add("--transform", choices=sorted(LEARNED), default=None, help="the learned optimizer")
    add("--transform-kwargs", type=json_object, default=None, help="constructor arguments, JSON")
    add("--family", choices=sorted(FAMILIES), default=None, help="task family")
    add("--family-kwargs", type=json_object, default=None, help="family arguments, JSON")
    add("--estimator", choices=list(ESTIMATORS), default=None, help="default: tbptt")
    _number(parser, "meta_steps", "updates of the weights")
    _number(parser, "unroll", "inner steps per truncation")
    _number(
        parser,
        "horizon",
        "inner steps a task runs (tbptt: a multiple of --unroll; pes/es: the longest, lengths "
        "drawn per task)",
    )
    _number(parser, "min_horizon", "pes/es: the shortest horizon")
    _number(parser, "tasks_per_step")
    _number(parser, "inner_lr", "default: the catalog's lr")
    _number(parser, "meta_lr")
    _number(parser, "clip_norm")
    _number(parser, "eval_every")
    _number(parser, "eval_tasks")
    _number(parser, "eval_steps")
    _number(parser, "checkpoint_every")
    _add_es_options(parser)
    add(
        "--routes",
        type=argtype(values.routes),
        default=None,
        metavar="ROLE=RULE[,ROLE=RULE...]",
        help="the rule of the transform each parameter role is updated by, in meta-training and "
        "in the exported artifact (e.g. matrix=orthogonal,vector=adam; roles: matrix, vector, "
        "embedding, head, input; rules: the transform's, such as normalized-mlp's artifact, "
        "learned, orthogonal and adam; roles left out: artifact). Default: none, every "
        "parameter gets the transform as configured",
    )
    _add_run_options(parser)
    return parser


def _add_es_options(parser: argparse.ArgumentParser) -> None:
    """The ``train`` options only evolution strategies (pes, es) read."""
    _number(parser, "pairs", "pes/es: antithetic pairs per task")
    _number(parser, "sigma", "pes/es: perturbation scale")
    parser.add_argument(
        "--objective", choices=("train", "validation"), default=None, help="pes/es meta-loss"
    )
    _number(parser, "warmup_fraction", "pes/es: inner lr warm-up, in [0, 1)")


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    """The ``train`` options on where and how the run goes: seed, device, output, export,
    resume."""
    add = parser.add_argument
    _number(parser, "seed", "seeds the weights and the tasks, in [0, 2**31)")
    add("--device", default=None, help="e.g. cpu or cuda (default: cpu)")
    add(
        "--output",
        default=None,
        help="checkpoint path (default: <output root>/train/learned.pt; the output root is "
        "$COMPILEDOPT_HOME, else $XDG_DATA_HOME/compiledopt, else ~/.local/share/compiledopt)",
    )
    _number(parser, "processes", "torch.distributed ranks the task slots are spread over")
    add("--export", default=None, help="also export the result as an artifact to this folder")
    add(
        "--overwrite",
        action="store_true",
        help="replace the --output checkpoint (unless --resume) and the --export folder (only a "
        "compiledopt artifact) if they exist; without it an existing one is refused before any "
        "work",
    )
    add("--export-backends", default=None, help="(default: torchscript,onnx)")
    _number(parser, "export_lr", "the artifact's recommended lr (default: the inner lr)")
    add("--resume", action="store_true", help="continue from --output")
    add(
        "--allow-changes",
        type=argtype(values.distinct_names("setting")),
        default=[],
        metavar="SETTING[,SETTING...]",
        help="--resume: settings that may differ from the checkpoint's (e.g. meta_lr); "
        "meta_steps, eval_every and checkpoint_every may always change",
    )
    add("--no-progress", action="store_true", help="hide the progress bar")


def _print_summary(
    rows: List[Tuple[str, str]], evaluations: List[Tuple[int, float]], out: TextIO
) -> None:
    width = max(len(k) for k, _ in rows)
    print("compiledopt train: summary", file=out)
    for key, value in rows:
        print(f"  {key:<{width}}  {value}", file=out)
    print("\n  held-out evaluations", file=out)
    print(f"  {'step':>9}  {'final loss':>10}", file=out)
    for step, loss in evaluations:
        print(f"  {step:>9}  {loss:>10.4g}", file=out)


def settings(args: argparse.Namespace) -> TrainSettings:
    """The run's settings, command line over --config over the built-in defaults
    (:func:`~compiledopt.apps.config.layered`); ``given`` names those set explicitly (on the
    command line or in the file)."""
    config = {} if args.config is None else read_config(args.config, DEFAULTS, config_value)
    given_values, given = layered(DEFAULTS, config, vars(args))
    if isinstance(given_values["export_backends"], str):
        given_values["export_backends"] = _backends(given_values["export_backends"])
    return TrainSettings(
        **given_values,
        resume=args.resume,
        overwrite=args.overwrite,
        allow_changes=args.allow_changes,
        progress=not args.no_progress,
        config_file=args.config,
        given=given,
    )


def _backends(text: str) -> Any:
    """The backends of ``--export-backends`` (e.g. ``torchscript,onnx``), checked."""
    from compiledopt.export import BACKENDS

    try:
        return values.names_of(BACKENDS, "backend")(text)
    except ValueError as error:
        raise ValueError(f"--export-backends {text!r}: {error}") from None


def run(args: argparse.Namespace, out: TextIO) -> int:
    """The ``train`` command: check everything, then meta-train, checkpoint, optionally export,
    and print a summary (:func:`compiledopt.apps.train.meta_train`)."""
    result = meta_train(settings(args))
    if result.artifact is not None:
        backends = result.settings.export_backends
        print(wrote_artifact(result.artifact, backends, result.export_seconds), file=out)
    _print_summary(result.summary(), result.evaluations, out)
    return result.exit_status  # 128 + the signal's number when one ended the run early
