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
from typing import Any, Dict, TextIO

from compiledopt.cli.arguments import (
    comma_list,
    json_object,
    non_negative_int,
    positive_float,
    positive_int,
)
from compiledopt.cli.requirements import require_task_family

__all__ = ["add_parser", "run"]

ESTIMATORS = ("tbptt", "pes", "es")
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
    "seed": 0,
    "device": "cpu",
    "output": "runs/learned.pt",
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
}


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
    add("--meta-steps", type=positive_int, default=None, help="updates of the weights")
    add("--unroll", type=positive_int, default=None, help="inner steps per truncation")
    add(
        "--horizon",
        type=positive_int,
        default=None,
        help="inner steps a task runs (tbptt: a "
        "multiple of --unroll; pes/es: the longest, lengths drawn per task)",
    )
    add("--min-horizon", type=positive_int, default=None, help="pes/es: the shortest horizon")
    add("--tasks-per-step", type=positive_int, default=None)
    add("--inner-lr", type=positive_float, default=None, help="default: the catalog's lr")
    add("--meta-lr", type=positive_float, default=None)
    add("--clip-norm", type=positive_float, default=None)
    add("--eval-every", type=non_negative_int, default=None)
    add("--eval-tasks", type=positive_int, default=None)
    add("--eval-steps", type=positive_int, default=None)
    add("--checkpoint-every", type=non_negative_int, default=None)
    add("--pairs", type=positive_int, default=None, help="pes/es: antithetic pairs per task")
    add("--sigma", type=positive_float, default=None, help="pes/es: perturbation scale")
    add("--objective", choices=("train", "validation"), default=None, help="pes/es meta-loss")
    add("--warmup-fraction", type=float, default=None, help="pes/es: inner lr warm-up")
    add("--seed", type=int, default=None, help="seeds the weights and the tasks")
    add("--device", default=None, help="e.g. cpu or cuda (default: cpu)")
    add("--output", default=None, help="checkpoint path (default: runs/learned.pt)")
    add("--processes", type=positive_int, default=None, help="torch.distributed ranks")
    add("--export", default=None, help="also export the result as an artifact to this folder")
    add("--export-backends", default=None, help="(default: torchscript,onnx)")
    add(
        "--export-lr",
        type=positive_float,
        default=None,
        help="the artifact's recommended lr (default: the inner lr)",
    )
    add("--resume", action="store_true", help="continue from --output")
    add("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def _settings(args: argparse.Namespace) -> Dict[str, Any]:
    """Command line over --config over the built-in defaults."""
    values = dict(DEFAULTS)
    if args.config is not None:
        try:
            with open(args.config, encoding="utf-8") as handle:
                loaded = json.load(handle)
        except FileNotFoundError:
            raise ValueError(f"--config: no such file: {args.config}") from None
        except json.JSONDecodeError as error:
            raise ValueError(f"--config {args.config}: not JSON ({error})") from None
        if not isinstance(loaded, dict):
            raise ValueError(f"--config {args.config}: expected a JSON object")
        unknown = sorted(set(loaded) - set(DEFAULTS) - {"comment"})
        if unknown:
            raise ValueError(f"--config {args.config}: unknown keys {unknown}")
        values.update({k: v for k, v in loaded.items() if k != "comment"})
    for key in DEFAULTS:
        given = getattr(args, key, None)
        if given is not None:
            values[key] = given
    if values["estimator"] not in ESTIMATORS:
        raise ValueError(f"Invalid estimator: {values['estimator']!r} (one of {ESTIMATORS})")
    return values


def _config(values: Dict[str, Any], fields: Dict[str, str], cls: type, inner_lr: float):
    kwargs = {field: values[option] for option, field in fields.items()}
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    kwargs["inner_lr"] = inner_lr
    known = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in kwargs.items() if k in known}).validate()


def run(args: argparse.Namespace, out: TextIO) -> int:
    """The ``train`` command: meta-train, checkpoint, optionally export, print a summary."""
    values = _settings(args)
    require_task_family(values["family"])
    import torch

    from compiledopt.learned.catalog import CATALOG, LEARNED, build_transform
    from compiledopt.meta import MetaTrainConfig, MetaTrainer
    from compiledopt.meta.es import ESConfig
    from compiledopt.meta.launch import make_family, run_es

    if values["transform"] not in LEARNED:
        raise ValueError(f"Invalid transform: {values['transform']!r} (one of {list(LEARNED)})")
    inner_lr = values["inner_lr"] or CATALOG[values["transform"]].inner_lr
    output = values["output"]
    folder = os.path.dirname(os.path.abspath(output))
    os.makedirs(folder, exist_ok=True)
    if not os.access(folder, os.W_OK):
        raise ValueError(f"--output: cannot write to {folder}")
    if args.resume and not os.path.exists(output):
        raise ValueError(f"--resume: no checkpoint at {output}")
    if values["export"] is not None:
        from compiledopt.export import BACKENDS

        backends = comma_list(values["export_backends"])
        if not backends or set(backends) - set(BACKENDS):
            raise ValueError(f"Invalid export_backends: {values['export_backends']!r}")
    # Build once here so bad transform or family arguments fail before any work.
    build_transform(values["transform"], values["transform_kwargs"])
    family = make_family(
        values["family"], values["seed"], values["device"], values["family_kwargs"]
    )
    start = time.perf_counter()
    if values["estimator"] == "tbptt":
        config = _config(values, TBPTT_FIELDS, MetaTrainConfig, inner_lr)
        torch.manual_seed(values["seed"])
        spec = {"name": values["transform"], "kwargs": values["transform_kwargs"]}
        transform = build_transform(spec["name"], spec["kwargs"])
        trainer = MetaTrainer(transform, family, config, metadata={"transform_spec": spec})
        if args.resume:
            trainer.load(output)
        result = trainer.train(checkpoint=output, progress=not args.no_progress)
        if not result.evaluations or result.evaluations[-1]["meta_step"] != result.meta_step:
            trainer.evaluate()
        history = [r["meta_loss"] for r in result.history]
        evaluations = [(r["meta_step"], r["final_loss"]) for r in trainer.evaluations]
        steps = (
            f"{result.meta_step} x {config.tasks_per_step} tasks x unroll {config.unroll_length}"
        )
    else:
        config = _config(values, ES_FIELDS, ESConfig, inner_lr)
        config.estimator = values["estimator"]
        settings = {
            **{k: values[k] for k in ("transform", "transform_kwargs", "family", "seed")},
            "family_kwargs": values["family_kwargs"],
            "device": values["device"],
            "config": dataclasses.asdict(config.validate()),
            "output": output,
            "resume": bool(args.resume),
            "processes": values["processes"],
            "config_file": os.path.basename(args.config) if args.config else None,
        }
        run_es(settings, progress=not args.no_progress)
        state = torch.load(output, map_location="cpu", weights_only=True)
        history = [r["objective"] for r in state["history"]]
        evaluations = [(r["step"], r["final_loss"]) for r in state["evaluations"]]
        steps = (
            f"{state['outer_step']} x {config.tasks_per_step} tasks x {config.pairs} pairs, "
            f"truncation {config.truncation}, unrolls {config.min_unroll}-{config.max_unroll}"
        )
    seconds = time.perf_counter() - start
    finite = [h for h in history if math.isfinite(h)]
    rows = [
        ("transform", f"{values['transform']} {json.dumps(values['transform_kwargs'])}"),
        ("task family", f"{values['family']} (seed {values['seed']}, device {values['device']})"),
        ("estimator", values["estimator"]),
        ("meta-steps", f"{steps} (inner lr {inner_lr:g})"),
        (
            "meta-loss",
            f"{finite[0] if finite else math.nan:.4g} -> {finite[-1] if finite else math.nan:.4g}",
        ),
        ("time", f"{seconds:.1f} s"),
        ("checkpoint", output),
    ]
    if values["export"] is not None:
        from compiledopt.cli import export as export_command

        export_args = argparse.Namespace(
            checkpoint=output,
            output=values["export"],
            backends=values["export_backends"],
            ranks=[0, 1, 2, 3, 4, 5],
            lr=values["export_lr"],
            training=None,
            overwrite=True,
        )
        export_command.run(export_args, out)
        rows.append(("artifact", values["export"]))
    width = max(len(k) for k, _ in rows)
    print("compiledopt train: summary", file=out)
    for key, value in rows:
        print(f"  {key:<{width}}  {value}", file=out)
    print("\n  held-out evaluations", file=out)
    print(f"  {'step':>9}  {'final loss':>10}", file=out)
    for step, loss in evaluations:
        print(f"  {step:>9}  {loss:>10.4g}", file=out)
    return 0
