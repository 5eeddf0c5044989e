"""The ``compiledopt`` command line (also ``python -m compiledopt``): ``demo`` and ``train``."""

import argparse
import json
import math
import os
import sys
import time
from typing import Optional, Sequence, TextIO

from compiledopt.demo import DEFAULT_STEPS, TRANSFORMS, run_demo

__all__ = ["build_parser", "main"]


def _positive_int(text: str) -> int:
    """argparse type: a positive integer, or an error naming the value."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _positive_float(text: str) -> float:
    """argparse type: a positive finite number, or an error naming the value."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text}")
    return value


def _json_object(text: str) -> dict:
    """argparse type: a JSON object, or an error naming the text."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not valid JSON ({error}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object, got {text!r}")
    return value


def _add_train(commands: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    from compiledopt.meta import MetaTrainConfig
    from compiledopt.tasks import FAMILIES
    from compiledopt.learned.catalog import LEARNED

    defaults = MetaTrainConfig()
    train = commands.add_parser(
        "train",
        help="meta-train a shape-agnostic learned optimizer on a built-in task family",
        description=(
            "Meta-train a transform by truncated back-propagation through unrolled inner "
            "training on tasks of a built-in family; evaluate it on held-out tasks and save a "
            "checkpoint that `--resume` continues exactly."
        ),
    )
    train.add_argument(
        "--transform",
        choices=sorted(LEARNED),
        default="coordinate-mlp",
        help="the learned optimizer (default: coordinate-mlp)",
    )
    train.add_argument(
        "--transform-kwargs",
        type=_json_object,
        default={},
        help="constructor arguments as JSON, e.g. '{\"hidden_sizes\": [16]}'",
    )
    train.add_argument(
        "--family",
        choices=sorted(FAMILIES),
        default="regression",
        help="task family (default: regression)",
    )
    train.add_argument("--meta-steps", type=_positive_int, default=defaults.meta_steps)
    train.add_argument(
        "--unroll",
        type=_positive_int,
        default=defaults.unroll_length,
        help=f"inner steps per truncated unroll (default: {defaults.unroll_length})",
    )
    train.add_argument(
        "--horizon",
        type=_positive_int,
        default=defaults.horizon,
        help="inner steps before a task is replaced (a multiple of --unroll)",
    )
    train.add_argument("--tasks-per-step", type=_positive_int, default=defaults.tasks_per_step)
    train.add_argument(
        "--inner-lr",
        type=_positive_float,
        default=None,
        help="lr multiplying the transform's direction (default: the catalog's)",
    )
    train.add_argument("--meta-lr", type=_positive_float, default=defaults.meta_lr)
    train.add_argument("--clip-norm", type=_positive_float, default=defaults.clip_norm)
    train.add_argument("--eval-every", type=int, default=defaults.eval_every)
    train.add_argument("--eval-tasks", type=_positive_int, default=defaults.eval_tasks)
    train.add_argument("--eval-steps", type=_positive_int, default=defaults.eval_steps)
    train.add_argument("--checkpoint-every", type=int, default=0)
    train.add_argument("--seed", type=int, default=0, help="seeds the weights and the tasks")
    train.add_argument("--device", default="cpu", help="e.g. cpu or cuda (default: cpu)")
    train.add_argument("--output", default="runs/learned.pt", help="checkpoint path")
    train.add_argument("--resume", action="store_true", help="continue from --output")
    train.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``compiledopt`` command."""
    parser = argparse.ArgumentParser(
        prog="compiledopt",
        description="Learned optimizers written once, run anywhere.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_pipeline(commands)
    demo = commands.add_parser(
        "meta-descent",
        help="meta-train a learned optimizer online on a synthetic task and compare it with SGD",
        description=(
            "Train a small MLP on a synthetic regression task (no downloads) with a "
            "LearnableOptimizer whose transform is meta-trained online by Adam, and with plain "
            "SGD at the same learning rate from the same initialisation; print the held-out "
            "loss of both."
        ),
    )
    demo.add_argument(
        "--steps",
        type=_positive_int,
        default=DEFAULT_STEPS,
        help=f"training steps of each optimizer (default: {DEFAULT_STEPS})",
    )
    demo.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the task, the init and the minibatches (default: 0)",
    )
    demo.add_argument(
        "--transform",
        choices=list(TRANSFORMS),
        default="kronecker",
        help="the learnable transform (default: kronecker)",
    )
    _add_train(commands)
    _add_export(commands)
    _add_finetune(commands)
    from compiledopt.cli import bench

    bench.add_parser(commands)
    return parser


def _add_pipeline(commands: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    from compiledopt.export.artifact import BACKENDS

    demo = commands.add_parser(
        "demo",
        help="the main job end to end: meta-train -> export -> verify -> fine-tune vs AdamW",
        description="Meta-train a CoordinateMLP on built-in tasks, export it (TorchScript, ONNX, "
        "AOTInductor), verify every backend, and fine-tune a pre-trained model with the frozen "
        "optimizer against AdamW. No downloads; a few minutes on 2 CPU cores.",
    )
    demo.add_argument("--workdir", default="runs/demo", help="checkpoint and artifact go here")
    demo.add_argument("--meta-steps", type=_positive_int, default=150)
    demo.add_argument("--finetune-steps", type=_positive_int, default=200)
    demo.add_argument(
        "--backends",
        default=",".join(BACKENDS),
        help=f"comma-separated subset of {','.join(BACKENDS)} (default: all)",
    )
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def _add_finetune(commands: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    finetune = commands.add_parser(
        "finetune",
        help="fine-tune a pre-trained model with an artifact's frozen optimizer vs AdamW",
        description="Pre-train an MLP on digits 0-4, fine-tune it on digits 5-9 with the "
        "artifact's FrozenOptimizer on each backend and with AdamW (best of an lr sweep); print "
        "loss, accuracy and step time.",
    )
    finetune.add_argument("artifact", help="an artifact directory")
    finetune.add_argument("--steps", type=_positive_int, default=200)
    finetune.add_argument(
        "--backends",
        default=None,
        help="comma-separated FrozenOptimizer backends (default: eager, "
        "compiled and every backend in the artifact)",
    )
    finetune.add_argument(
        "--lr",
        type=_positive_float,
        default=None,
        help="the frozen optimizer's lr (default: the artifact's)",
    )
    finetune.add_argument("--seed", type=int, default=0)


def _add_export(commands: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    from compiledopt.export.artifact import BACKENDS

    export = commands.add_parser(
        "export",
        help="export a meta-trained checkpoint as an artifact (TorchScript, ONNX, AOTInductor)",
        description="Freeze the transform of a `compiledopt train` checkpoint and write a "
        "self-describing artifact directory with one graph per backend.",
    )
    export.add_argument("checkpoint", help="a checkpoint written by `compiledopt train`")
    export.add_argument("--output", required=True, help="the artifact directory to create")
    export.add_argument(
        "--backends",
        default=",".join(BACKENDS),
        help=f"comma-separated subset of {','.join(BACKENDS)} (default: all)",
    )
    export.add_argument(
        "--ranks",
        default="0,1,2,3,4,5",
        help="parameter ranks to export ONNX/AOTI graphs for (default: 0-5)",
    )
    export.add_argument(
        "--lr",
        type=_positive_float,
        default=None,
        help="suggested learning rate recorded in the manifest "
        "(default: the checkpoint's inner lr)",
    )
    export.add_argument("--overwrite", action="store_true", help="replace --output if it exists")

    inspect = commands.add_parser("inspect", help="summarise an artifact's manifest")
    inspect.add_argument("artifact", help="an artifact directory")

    verify = commands.add_parser(
        "verify",
        help="replay random gradients through every backend and the eager reference",
        description="Check every backend of an artifact against the eager reference rebuilt "
        "from its weights, over several steps with state carried; exit 1 above --tolerance.",
    )
    verify.add_argument("artifact", help="an artifact directory")
    verify.add_argument("--steps", type=_positive_int, default=10)
    verify.add_argument(
        "--tolerance",
        type=_positive_float,
        default=1e-6,
        help="largest relative error accepted (default: 1e-6)",
    )
    verify.add_argument("--seed", type=int, default=0)


def run_export(args: argparse.Namespace, out: TextIO) -> int:
    """The ``export`` command: checkpoint -> shape-agnostic artifact."""
    import torch

    from compiledopt.export import export_shape_agnostic
    from compiledopt.learned.catalog import build_transform

    state = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
    spec = (state.get("metadata") or {}).get("transform_spec")
    if not spec:
        raise SystemExit(
            f"compiledopt export: {args.checkpoint} has no transform spec "
            "(write it with `compiledopt train`)"
        )
    transform = build_transform(spec["name"], spec.get("kwargs"))
    transform.load_state_dict(state["transform"])
    backends = [b for b in args.backends.split(",") if b]
    ranks = [int(r) for r in args.ranks.split(",") if r]
    lr = args.lr if args.lr is not None else float(state["config"]["inner_lr"])
    start = time.perf_counter()
    path = export_shape_agnostic(
        args.output,
        {"kind": "shape_agnostic", "name": spec["name"], "kwargs": spec.get("kwargs", {})},
        transform,
        backends=backends,
        ranks=ranks,
        lr=lr,
        overwrite=args.overwrite,
    )
    print(f"wrote {path} ({', '.join(backends)}) in {time.perf_counter() - start:.1f} s", file=out)
    return 0


def run_inspect(args: argparse.Namespace, out: TextIO) -> int:
    """The ``inspect`` command: a human-readable manifest summary."""
    from compiledopt.export import load_artifact

    artifact = load_artifact(args.artifact)
    m = artifact.manifest
    print(f"{artifact.path}: compiledopt artifact, format version {m['format_version']}", file=out)
    print(f"  transform  {json.dumps(m['transform'])}", file=out)
    print(f"  kind       {m['kind']} ({m['dtype']}), suggested lr {m['lr']:g}", file=out)
    if artifact.kind == "bound":
        print(f"  bindings   {len(artifact.bindings)} parameters", file=out)
        for b in artifact.bindings:
            state = ", ".join(f"{s['name']}{tuple(s['shape'])}" for s in b["state"]) or "-"
            print(f"    {b['name']:<24} {tuple(b['shape'])!s:<18} state: {state}", file=out)
    else:
        print(f"  ranks      {m['ranks']}", file=out)
        print(f"  state      {', '.join(m['state_names']) or '-'} (per parameter)", file=out)
    for backend, files in m["backends"].items():
        print(f"  {backend:<10} {', '.join(files)}", file=out)
    producer = ", ".join(f"{k} {v}" for k, v in m["producer"].items())
    print(f"  producer   {producer}", file=out)
    print("  checksums  verified (sha256 of every file)", file=out)
    return 0


def run_verify(args: argparse.Namespace, out: TextIO) -> int:
    """The ``verify`` command: per-backend max relative error; 1 if any exceeds the tolerance."""
    from compiledopt.export.verify import verify_artifact

    errors = verify_artifact(args.artifact, steps=args.steps, seed=args.seed)
    print(
        f"{args.artifact}: {args.steps} steps with state carried, vs the eager reference", file=out
    )
    print(f"  {'backend':<12} {'max rel error':>14}  result", file=out)
    failed = False
    for backend, error in errors.items():
        ok = error <= args.tolerance
        failed |= not ok
        print(f"  {backend:<12} {error:>14.3g}  {'ok' if ok else 'FAIL'}", file=out)
    return 1 if failed else 0


def run_train(args: argparse.Namespace, out: TextIO) -> int:
    """The ``train`` command: meta-train, checkpoint, and print a summary table."""
    import torch

    from compiledopt.meta import MetaTrainConfig, MetaTrainer
    from compiledopt.tasks import get_family
    from compiledopt.learned.catalog import CATALOG, build_transform

    torch.manual_seed(args.seed)
    spec = {"name": args.transform, "kwargs": args.transform_kwargs}
    transform = build_transform(args.transform, args.transform_kwargs)
    inner_lr = args.inner_lr if args.inner_lr is not None else CATALOG[args.transform].inner_lr
    config = MetaTrainConfig(
        meta_steps=args.meta_steps,
        unroll_length=args.unroll,
        horizon=args.horizon,
        tasks_per_step=args.tasks_per_step,
        inner_lr=inner_lr,
        meta_lr=args.meta_lr,
        clip_norm=args.clip_norm,
        eval_every=args.eval_every,
        eval_tasks=args.eval_tasks,
        eval_steps=args.eval_steps,
        checkpoint_every=args.checkpoint_every,
    )
    family = get_family(args.family, seed=args.seed, device=args.device)
    trainer = MetaTrainer(transform, family, config, metadata={"transform_spec": spec})
    if args.resume:
        trainer.load(args.output)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    start = time.perf_counter()
    result = trainer.train(checkpoint=args.output, progress=not args.no_progress)
    seconds = time.perf_counter() - start
    if not result.evaluations or result.evaluations[-1]["meta_step"] != result.meta_step:
        trainer.evaluate()
    first = next((r["meta_loss"] for r in result.history if math.isfinite(r["meta_loss"])), None)
    last = result.history[-1]["meta_loss"] if result.history else math.nan
    rows = [
        ("transform", f"{args.transform} {json.dumps(args.transform_kwargs)}"),
        ("task family", f"{args.family} (seed {args.seed}, device {args.device})"),
        (
            "meta-steps",
            f"{result.meta_step} x {config.tasks_per_step} tasks x unroll "
            f"{config.unroll_length} (inner lr {inner_lr:g})",
        ),
        ("meta-loss", f"{first if first is not None else math.nan:.4g} -> {last:.4g}"),
        ("skipped", f"{result.skipped_tasks} tasks, {result.skipped_steps} meta-steps"),
        ("time", f"{seconds:.1f} s"),
        ("checkpoint", args.output),
    ]
    width = max(len(k) for k, _ in rows)
    print("compiledopt train: summary", file=out)
    for key, value in rows:
        print(f"  {key:<{width}}  {value}", file=out)
    print(f"\n  held-out ({config.eval_tasks} tasks, {config.eval_steps} inner steps)", file=out)
    print(f"  {'meta-step':>9}  {'final loss':>10}  {'mean loss':>10}", file=out)
    for record in trainer.evaluations:
        print(
            f"  {record['meta_step']:>9}  {record['final_loss']:>10.4g}  "
            f"{record['mean_loss']:>10.4g}",
            file=out,
        )
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the ``compiledopt`` command with ``argv`` (default: ``sys.argv[1:]``); return its status.

    Invalid arguments exit through argparse (``SystemExit`` with status 2 and a usage message).
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # the benchmark parses its own options (compiledopt bench --help)
        from compiledopt.cli import bench

        return bench.run(argparse.Namespace(command="bench", args=argv[1:]), sys.stdout)
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        from compiledopt.pipeline import run_pipeline

        backends = [b for b in args.backends.split(",") if b]
        run_pipeline(
            args.workdir,
            args.meta_steps,
            backends=backends,
            finetune_steps=args.finetune_steps,
            seed=args.seed,
            out=sys.stdout,
            progress=not args.no_progress,
        )
        return 0
    if args.command == "finetune":
        from compiledopt.finetune import run_finetune

        backends = [b for b in args.backends.split(",") if b] if args.backends else None
        run_finetune(args.artifact, args.steps, backends, args.lr, args.seed, sys.stdout)
        return 0
    if args.command == "meta-descent":
        try:
            run_demo(steps=args.steps, seed=args.seed, transform=args.transform, out=sys.stdout)
        except BrokenPipeError:
            # The reader went away (``compiledopt demo | head``): stop quietly, as Python's docs
            # recommend, so that the interpreter's final flush does not raise again.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            return 1
        return 0
    if args.command == "train":
        return run_train(args, sys.stdout)
    if args.command in ("export", "inspect", "verify"):
        from compiledopt.export import ArtifactError

        runner = {"export": run_export, "inspect": run_inspect, "verify": run_verify}
        try:
            return runner[args.command](args, sys.stdout)
        except (ArtifactError, FileExistsError) as error:
            print(f"compiledopt {args.command}: {error}", file=sys.stderr)
            return 2
    raise AssertionError(f"unhandled command {args.command!r}")  # argparse rejects the rest
