"""The command line of the learning-quality suite and the settings it resolves to."""

import argparse
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

from benchmarks.learning_quality import metrics, optimizers, run, scaling
from benchmarks.learning_quality.tasks import DEFAULT_SUITE, SUITES, TASKS, seeds_for

DEFAULT_OUTPUT = "benchmarks/results/learning_quality"
QUICK_OUTPUT = "benchmarks/results/quick/learning_quality"
DEFAULT_SEEDS = 2
STRESS_STEPS = 20
QUICK_STRESS_STEPS = 3


def _task_list(text: str) -> List[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in TASKS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(
            f"unknown task(s) {', '.join(unknown) or text!r}: choose from {', '.join(TASKS)}"
        )
    return [name for name in TASKS if name in names]  # the suite's order


def _kind_list(text: str) -> List[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in optimizers.KINDS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(
            f"unknown optimizer kind(s) {', '.join(unknown) or text!r}: choose from "
            f"{', '.join(optimizers.KINDS)}"
        )
    if "adamw" not in names:  # refused here, not after every run has finished
        raise argparse.ArgumentTypeError(
            f"{text!r} leaves out adamw, which every result is normalised by (its runs are "
            "reused from --journal where recorded there)"
        )
    return [kind for kind in optimizers.KINDS if kind in names]


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"needs a positive integer, got {text!r}")
    return int(text)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"needs a positive number, got {text!r}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"needs a finite number >= 0, got {text!r}")
    return value


def _lr_grid(text: str) -> Tuple[str, List[float]]:
    """``KIND=LR[,LR...]``: an optimizer kind and its lrs (positive and finite; sorted, without
    repeats, each to 4 significant digits as the sweeps are)."""
    kind, equals, values = text.partition("=")
    kind = kind.strip()
    if not equals:
        raise argparse.ArgumentTypeError(f"needs KIND=LR[,LR...], got {text!r}")
    if kind not in optimizers.KINDS:
        raise argparse.ArgumentTypeError(
            f"unknown optimizer kind {kind!r} in {text!r}: choose from "
            f"{', '.join(optimizers.KINDS)}"
        )
    lrs = []
    for item in values.split(","):
        try:
            value = float(item)
        except ValueError:
            value = math.nan
        if not 0 < value < math.inf:
            raise argparse.ArgumentTypeError(
                f"{kind}: lr {item.strip()!r} is not a positive finite number (in {text!r})"
            )
        lrs.append(optimizers.clean_lr(value))
    return kind, sorted(set(lrs))


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.learning_quality",
        description="Learning quality of a learned optimizer on held-out tasks it never saw, "
        "against AdamW and SGD (tuned and untuned) and the earlier coordinate-mlp artifact: "
        "final validation losses, normalised losses, speed-ups, divergence, a stress check "
        "(JSON, a table and PNG plots).",
    )
    parser.add_argument(
        "--optimizer",
        required=True,
        help="the learned optimizer: an artifact folder, or a packaged name where "
        "compiledopt.pretrained exists",
    )
    parser.add_argument(
        "--optimizer-lr",
        type=_positive_float,
        default=None,
        help="its untuned lr (default: the artifact's manifest lr); its sweep is this times "
        f"{', '.join(f'{f:g}' for f in optimizers.LEARNED_FACTORS)}",
    )
    parser.add_argument(
        "--old-optimizer",
        default=str(optimizers.OLD_ARTIFACT),
        help="the earlier artifact compared at its manifest lr times "
        f"{', '.join(f'{f:g}' for f in optimizers.OLD_FACTORS)}, or 'none' "
        "(default: export/coordinate-mlp)",
    )
    parser.add_argument(
        "--backend",
        default="auto",
        help="FrozenOptimizer backend of both artifacts; auto: torchscript where the artifact "
        "has it, else eager (default: auto)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a dozen steps per task (24 for long-horizon), 2 lrs per sweep, 1 seed, a 3-step "
        "stress check: a smoke test of the whole pipeline",
    )
    chosen = parser.add_mutually_exclusive_group()
    chosen.add_argument(
        "--tasks", type=_task_list, default=None, help=f"comma-separated subset of {list(TASKS)}"
    )
    chosen.add_argument(
        "--suite",
        choices=list(SUITES),
        default=None,
        help=f"a named group of tasks: classic ({', '.join(SUITES['classic'])}), transformers "
        f"({', '.join(SUITES['transformers'])}) or all (default: {DEFAULT_SUITE}; not with "
        "--tasks)",
    )
    parser.add_argument(
        "--kinds",
        type=_kind_list,
        default=list(optimizers.KINDS),
        help="comma-separated optimizer kinds to run, of learned, old, adamw, sgd, adamw always "
        "among them (default: all; "
        "the learned optimizer's lr still comes from --optimizer)",
    )
    parser.add_argument(
        "--default-lr-only",
        action="store_true",
        help="run each kind at its untuned default lr alone, no sweep (learned: --optimizer-lr "
        f"or the manifest's; AdamW: {optimizers.ADAMW_DEFAULT_LR:g}; SGD has none and is left "
        "out); AdamW's default then is the normalising target",
    )
    parser.add_argument(
        "--lrs",
        type=_lr_grid,
        action="append",
        default=[],
        metavar="KIND=LR[,LR...]",
        help="replace KIND's lr sweep by exactly these lrs (repeatable, one per kind; e.g. "
        "--lrs adamw=1e-3,3e-3,1e-2 --lrs learned=3e-3,1e-2); the untuned baselines the report "
        "needs are added where missing: the learned kinds' default lr, AdamW's "
        f"{', '.join(f'{x:g}' for x in optimizers.ADAMW_UNTUNED_LRS)} (not with "
        "--default-lr-only)",
    )
    parser.add_argument(
        "--journal",
        default=None,
        metavar="PATH",
        help="a JSON Lines file each finished run is appended to at once; a rerun with the same "
        "journal reuses the runs recorded there (same task, seed, steps, optimizer, lr, weight "
        "decay, roles, backend, artifact, torch and Python) and runs only the others: a long "
        "suite in pieces",
    )
    parser.add_argument(
        "--weight-decay",
        type=_non_negative_float,
        default=0.0,
        help="weight decay of every optimizer: decoupled for the learned kinds and AdamW, torch's "
        "L2 term for SGD (default: 0)",
    )
    parser.add_argument(
        "--roles",
        choices=list(optimizers.ROLES),
        default=optimizers.DEFAULT_ROLES,
        help="how the learned optimizers get the parameters: auto, the parameter groups with "
        "roles of compiledopt.param_groups(model) where compiledopt has it; none, plain "
        f"model.parameters() (default: {optimizers.DEFAULT_ROLES})",
    )
    parser.add_argument(
        "--matrix-scale",
        choices=list(scaling.MODES),
        default="none",
        help="scale the learned kinds' step of every parameter of rank >= 2 by the parameter's "
        "RMS before the step (rms), at its first step (initial-rms) or of a default init of "
        "its shape (fan-in), each over 0.1: an experiment on lr semantics (default: none)",
    )
    parser.add_argument(
        "--output",
        default=None,
        help=f"output prefix: PREFIX.json, PREFIX.md, PREFIX_curves.png, PREFIX_normalized.png "
        f"(default: {DEFAULT_OUTPUT}, or {QUICK_OUTPUT} with --quick)",
    )
    parser.add_argument(
        "--seeds",
        type=_positive_int,
        default=None,
        help=f"seeds per task: 0 .. N-1 (default: {DEFAULT_SEEDS}, or a task's own minimum where "
        "larger (3 for the transformer tasks); 1 with --quick; each seed adds about as much "
        "time again)",
    )
    parser.add_argument(
        "--steps-scale",
        type=_positive_float,
        default=1.0,
        help="multiply every task's step count (default: 1)",
    )
    parser.add_argument(
        "--threads", type=_positive_int, default=1, help="torch threads per worker (default: 1)"
    )
    parser.add_argument(
        "--jobs",
        type=_positive_int,
        default=2,
        help="worker processes; 1 runs everything in this process (default: 2)",
    )
    parser.add_argument("--no-plots", action="store_true", help="write no PNG files")
    parser.add_argument(
        "--estimate-only",
        action="store_true",
        help="print the plan and the time estimate (a few timed steps per task), then stop",
    )
    return parser


def parse(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    command = parser()
    args = command.parse_args(list(argv) if argv is not None else None)
    kinds = [kind for kind, _ in args.lrs]
    twice = sorted({kind for kind in kinds if kinds.count(kind) > 1})
    if twice:
        command.error(f"argument --lrs: {', '.join(twice)} given more than once")
    if args.lrs and args.default_lr_only:
        command.error("argument --lrs: not allowed with argument --default-lr-only")
    return args


def settings(args: argparse.Namespace) -> Dict[str, Any]:
    """What the run does, resolved from the options."""
    output = args.output or (QUICK_OUTPUT if args.quick else DEFAULT_OUTPUT)
    old = None if args.old_optimizer.lower() == "none" else args.old_optimizer
    names = args.tasks or SUITES[args.suite or DEFAULT_SUITE]
    task_seeds = {name: seeds_for(name, args.seeds, args.quick, DEFAULT_SEEDS) for name in names}
    return {
        "optimizer": args.optimizer,
        "optimizer_lr": args.optimizer_lr,
        "old_optimizer": old,
        "backend": args.backend,
        "roles": args.roles,
        "kinds": args.kinds,
        "default_lr_only": args.default_lr_only,
        "lrs": dict(args.lrs),
        "weight_decay": args.weight_decay,
        "matrix_scale": args.matrix_scale,
        "quick": args.quick,
        "suite": None if args.tasks else (args.suite or DEFAULT_SUITE),
        "tasks": names,
        "output": output,
        "journal": args.journal,
        "seeds": sorted({seed for seeds in task_seeds.values() for seed in seeds}),
        "task_seeds": task_seeds,
        "steps_scale": args.steps_scale,
        "threads": args.threads,
        "jobs": args.jobs,
        "plots": not args.no_plots,
        "estimate_only": args.estimate_only,
        "stress_steps": QUICK_STRESS_STEPS if args.quick else STRESS_STEPS,
        "eval_fraction": run.EVAL_FRACTION,
        "divergence_factor": metrics.DIVERGENCE_FACTOR,
        "tie_tolerance": metrics.TIE_TOLERANCE,
        "warmup_fraction": optimizers.WARMUP_FRACTION,
    }
