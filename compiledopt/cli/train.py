"""The ``compiledopt train`` command: meta-train a learned optimizer on a built-in task family.

Every option can also come from a JSON file (``--config``) whose keys are the options' names
with underscores (``"meta_steps"``, ``"transform_kwargs"``, ...); an option given on the command
line wins over the file, and the file over the built-in default.
"""

import argparse
import dataclasses
import json
import math
import os
import time
from typing import Any, Dict, List, Optional, TextIO, Tuple

from compiledopt.apps.requirements import require_task_family
from compiledopt.cli.arguments import comma_list, json_object
from compiledopt.cli.train_settings import (
    ES_FIELDS,
    ESTIMATORS,
    TBPTT_FIELDS,
    TYPES,
    build_config,
    check_settings,
    recorded_settings,
    requested_settings,
    resumable,
    routes_option,
    settings,
)

__all__ = ["FIXED_ON_RESUME", "add_parser", "run"]

#: Settings a resumed tbptt run cannot change, even when asked: they decide what the weights are
#: and which tasks the saved task slots hold.
FIXED_ON_RESUME = ("transform", "transform_kwargs", "family", "seed", "tasks_per_step")


def _number(parser: argparse.ArgumentParser, name: str, help_text: Optional[str] = None) -> None:
    """Add the option of setting ``name`` (``--meta-steps`` for ``meta_steps``), of its type."""
    parser.add_argument(
        f"--{name.replace('_', '-')}", type=TYPES[name], default=None, help=help_text
    )


def add_parser(
    commands: "argparse._SubParsersAction[argparse.ArgumentParser]",
) -> argparse.ArgumentParser:
    """Add the ``train`` subparser."""
    from compiledopt.learned.catalog import LEARNED
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
    add("--estimator", choices=ESTIMATORS, default=None, help="tbptt (default), pes or es")
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
        type=routes_option,
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
    _number(parser, "processes", "pes/es: torch.distributed ranks")
    add("--export", default=None, help="also export the result as an artifact to this folder")
    add("--export-backends", default=None, help="(default: torchscript,onnx)")
    _number(parser, "export_lr", "the artifact's recommended lr (default: the inner lr)")
    add("--resume", action="store_true", help="continue from --output")
    add(
        "--allow-changes",
        type=comma_list,
        default=[],
        metavar="SETTING[,SETTING...]",
        help="tbptt --resume: settings that may differ from the checkpoint's (e.g. meta_lr); "
        "meta_steps, eval_every and checkpoint_every may always change",
    )
    add("--no-progress", action="store_true", help="hide the progress bar")


def _check_resume(
    state: Dict[str, Any],
    values: Dict[str, Any],
    config: Any,
    fields: Dict[str, str],
    allowed: List[str],
) -> List[Dict[str, Any]]:
    """The checkpoint's settings against this run's (see :func:`check_resume`)."""
    from compiledopt.cli.checkpoints import check_resume, checkpoint_kind

    tbptt = values["estimator"] == "tbptt"
    resumable(state, values["output"])
    kind = checkpoint_kind(state)
    if kind != ("tbptt" if tbptt else "es"):
        written = "tbptt" if kind == "tbptt" else "pes or es"
        raise ValueError(
            f"--resume {values['output']}: written by --estimator {written}, "
            f"not by --estimator {values['estimator']}"
        )
    recorded = recorded_settings(state, fields)
    requested = requested_settings(values, config, fields, processes=not tbptt)
    fixed = FIXED_ON_RESUME if tbptt else tuple(requested)
    return check_resume(recorded, requested, allowed, fixed)


@dataclasses.dataclass
class _Plan:
    """What :func:`run` checked and built before any work."""

    inner_lr: float
    family: Any
    fields: Dict[str, str]
    config: Any
    state: Optional[Dict[str, Any]]
    changes: List[Dict[str, Any]]


def _prepare(values: Dict[str, Any], args: argparse.Namespace) -> _Plan:
    """Build the transform, the family and the config once, and read a checkpoint to resume,
    so that bad settings fail before any work."""
    from compiledopt.cli.checkpoints import load_checkpoint
    from compiledopt.learned.catalog import CATALOG, LEARNED, build_transform
    from compiledopt.meta import MetaTrainConfig
    from compiledopt.meta.es import ESConfig
    from compiledopt.meta.inner import check_routes, check_rules
    from compiledopt.meta.launch import make_family

    if values["transform"] not in LEARNED:
        raise ValueError(f"Invalid transform: {values['transform']!r} (one of {list(LEARNED)})")
    inner_lr = values["inner_lr"] or CATALOG[values["transform"]].inner_lr
    try:
        built = build_transform(values["transform"], values["transform_kwargs"])
    except TypeError as error:
        kwargs = json.dumps(values["transform_kwargs"])
        raise ValueError(f"--transform-kwargs {kwargs}: {error}") from None
    check_rules(built, check_routes(values["routes"], "--routes"), "--routes")
    family = make_family(
        values["family"], values["seed"], values["device"], values["family_kwargs"]
    )
    if values["estimator"] == "tbptt":
        fields = TBPTT_FIELDS
        config = build_config(values, fields, MetaTrainConfig, inner_lr=inner_lr)
    else:
        fields = ES_FIELDS
        extra = {"inner_lr": inner_lr, "estimator": values["estimator"]}
        config = build_config(values, fields, ESConfig, **extra)
    state = None
    changes: List[Dict[str, Any]] = []
    if args.resume:
        state = load_checkpoint(values["output"], "--resume")
        changes = _check_resume(state, values, config, fields, args.allow_changes)
    return _Plan(inner_lr, family, fields, config, state, changes)


def _train_tbptt(
    values: Dict[str, Any], args: argparse.Namespace, plan: _Plan
) -> Tuple[List[float], List[Tuple[int, float]], str]:
    """Meta-train by truncated backprop: ``(meta-losses, evaluations, steps text)``."""
    import torch

    from compiledopt.learned.catalog import build_transform
    from compiledopt.meta import MetaTrainer

    config, fields, state = plan.config, plan.fields, plan.state
    torch.manual_seed(values["seed"])
    spec = {"name": values["transform"], "kwargs": values["transform_kwargs"]}
    transform = build_transform(spec["name"], spec["kwargs"])
    metadata = {"transform_spec": spec, "family_kwargs": values["family_kwargs"]}
    if config.routes is not None:  # what `compiledopt export` writes as the routes
        metadata["routes"] = dict(config.routes)
    trainer = MetaTrainer(transform, plan.family, config, metadata=metadata)
    if state is not None:
        allowed = [fields[key] for key in args.allow_changes if key in fields]
        trainer.load_state_dict(state, allow_changes=allowed)
        extra_changes = [c for c in plan.changes if c["setting"] not in fields]
        if extra_changes:  # settings outside the trainer's config, e.g. family_kwargs
            trainer.metadata["config_changes"] = trainer.metadata.get("config_changes", []) + [
                {"meta_step": trainer.meta_step, **c} for c in extra_changes
            ]
    result = trainer.train(checkpoint=values["output"], progress=not args.no_progress)
    if not result.evaluations or result.evaluations[-1]["meta_step"] != result.meta_step:
        trainer.evaluate()
    history = [r["meta_loss"] for r in result.history]
    evaluations = [(r["meta_step"], r["final_loss"]) for r in trainer.evaluations]
    steps = f"{result.meta_step} x {config.tasks_per_step} tasks x unroll {config.unroll_length}"
    return history, evaluations, steps


def _train_es(
    values: Dict[str, Any], args: argparse.Namespace, config: Any
) -> Tuple[List[float], List[Tuple[int, float]], str]:
    """Meta-train by evolution strategies: ``(objectives, evaluations, steps text)``."""
    import torch

    from compiledopt.meta.launch import run_es

    output = values["output"]
    run_settings = {
        **{k: values[k] for k in ("transform", "transform_kwargs", "family", "seed")},
        "family_kwargs": values["family_kwargs"],
        "device": values["device"],
        "config": dataclasses.asdict(config),
        "output": output,
        "resume": bool(args.resume),
        "processes": values["processes"],
        "config_file": os.path.basename(args.config) if args.config else None,
    }
    run_es(run_settings, progress=not args.no_progress)
    saved = torch.load(output, map_location="cpu", weights_only=True)
    history = [r["objective"] for r in saved["history"]]
    evaluations = [(r["step"], r["final_loss"]) for r in saved["evaluations"]]
    steps = (
        f"{saved['outer_step']} x {config.tasks_per_step} tasks x {config.pairs} pairs, "
        f"truncation {config.truncation}, unrolls {config.min_unroll}-{config.max_unroll}"
    )
    return history, evaluations, steps


def _export(values: Dict[str, Any], out: TextIO) -> None:
    """``compiledopt export`` of the checkpoint just written to ``--export``."""
    from compiledopt.cli import export as export_command

    export_args = argparse.Namespace(
        checkpoint=values["output"],
        output=values["export"],
        backends=comma_list(values["export_backends"]),
        ranks=[0, 1, 2, 3, 4, 5],
        lr=values["export_lr"],
        training=None,
        overwrite=True,
    )
    export_command.run(export_args, out)


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


def run(args: argparse.Namespace, out: TextIO) -> int:
    """The ``train`` command: check everything, then meta-train, checkpoint, optionally export,
    and print a summary."""
    values, given = settings(args)
    require_task_family(values["family"])
    check_settings(values, given, args)
    plan = _prepare(values, args)
    output = values["output"]
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    start = time.perf_counter()
    if values["estimator"] == "tbptt":
        history, evaluations, steps = _train_tbptt(values, args, plan)
    else:
        history, evaluations, steps = _train_es(values, args, plan.config)
    seconds = time.perf_counter() - start
    finite = [h for h in history if math.isfinite(h)]
    rows = [
        ("transform", f"{values['transform']} {json.dumps(values['transform_kwargs'])}"),
        ("task family", f"{values['family']} (seed {values['seed']}, device {values['device']})"),
        ("estimator", values["estimator"]),
        ("meta-steps", f"{steps} (inner lr {plan.inner_lr:g})"),
        (
            "meta-loss",
            f"{finite[0] if finite else math.nan:.4g} -> {finite[-1] if finite else math.nan:.4g}",
        ),
        ("time", f"{seconds:.1f} s"),
        ("checkpoint", output),
    ]
    for change in plan.changes:
        if change["setting"] not in ("meta_steps", "eval_every", "checkpoint_every"):
            rows.append(("changed", f"{change['setting']}: {change['from']} -> {change['to']}"))
    if values["export"] is not None:
        _export(values, out)
        rows.append(("artifact", values["export"]))
    _print_summary(rows, evaluations, out)
    return 0
