"""The ``compiledopt export`` command: a ``compiledopt train`` checkpoint -> an artifact."""

import argparse
import math
import time
from typing import Any, Dict, Optional, TextIO, Tuple

from compiledopt.apps.paths import check_output_directory
from compiledopt.cli.arguments import (
    int_list,
    json_object,
    names_of,
    non_negative_int,
    positive_float,
)

__all__ = ["RANKS", "add_parser", "run"]

#: The parameter ranks an artifact can hold graphs for.
RANKS = (0, 1, 2, 3, 4, 5)


def add_parser(
    commands: "argparse._SubParsersAction[argparse.ArgumentParser]",
) -> argparse.ArgumentParser:
    """Add the ``export`` subparser."""
    from compiledopt.export import BACKENDS

    parser = commands.add_parser(
        "export",
        help="export a meta-trained checkpoint as an artifact (TorchScript, ONNX, AOTInductor)",
        description="Freeze the transform of a `compiledopt train` checkpoint and write a "
        "self-describing artifact directory with one graph per backend.",
    )
    parser.add_argument("checkpoint", help="a checkpoint written by `compiledopt train`")
    parser.add_argument("--output", required=True, help="the artifact directory to create")
    parser.add_argument(
        "--backends",
        type=names_of(BACKENDS, "backend"),
        default=list(BACKENDS),
        help=f"comma-separated subset of {','.join(BACKENDS)} (default: all)",
    )
    parser.add_argument(
        "--ranks",
        type=int_list(non_negative_int, "rank", limit=max(RANKS)),
        default=list(RANKS),
        help="parameter ranks to export ONNX/AOTI graphs for, out of 0-5 (default: all)",
    )
    parser.add_argument(
        "--lr",
        type=positive_float,
        default=None,
        help="suggested learning rate recorded in the manifest "
        "(default: the checkpoint's inner lr)",
    )
    parser.add_argument(
        "--training",
        type=json_object,
        default=None,
        metavar="JSON",
        help="provenance for the manifest's training block, a JSON object merged over the "
        "checkpoint's metadata['training'] (task_family, estimator, meta_steps, wall_time_s, "
        "cpu_count, seed, config, schedule…)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    parser.add_argument(
        "--sign-key",
        default=None,
        metavar="PRIVATE_PEM",
        help="sign the artifact with this Ed25519 private key (`compiledopt keygen`), so that "
        "--trusted-key with its public key lets its code graphs load",
    )
    return parser


def _field(holder: Any, key: str, kind: type, where: str) -> Any:
    value = holder.get(key) if isinstance(holder, dict) else None
    if not isinstance(value, kind):
        raise ValueError(f"{where} has no {key} (write it with `compiledopt train`)")
    return value


def _lr(value: Any, source: str) -> float:
    finite = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not (finite and math.isfinite(value) and value > 0):
        raise ValueError(f"{source} must be a positive finite number, got {value!r}")
    return float(value)


def run(args: argparse.Namespace, out: TextIO) -> int:
    """The ``export`` command: checkpoint -> shape-agnostic artifact, its ``training`` block the
    checkpoint's ``metadata["training"]`` updated with ``--training`` (none if both are absent);
    the block's ``lr`` is the manifest's (``--lr``, else the block's, else the inner lr).
    Everything is checked (the output folder, the signing key, the checkpoint, its weights)
    before the export; with ``--sign-key`` the artifact is signed once written."""
    check_output_directory(args.output, "--output", args.overwrite)
    sign_key = getattr(args, "sign_key", None)
    if sign_key is not None:
        from compiledopt.cli.trust import check_private_key

        check_private_key(sign_key, "--sign-key")
    from compiledopt.cli.checkpoints import load_checkpoint
    from compiledopt.export import export_shape_agnostic

    source = f"checkpoint {args.checkpoint}"
    state = load_checkpoint(args.checkpoint, "checkpoint")
    metadata = state.get("metadata") or {}
    name, kwargs, transform = _transform(state, metadata, source)
    backends = list(args.backends)
    training, lr = _training_and_lr(args, state, metadata, source)
    routes = metadata.get("routes")  # the rule of each parameter role it was meta-trained with
    if routes is not None and not isinstance(routes, dict):
        raise ValueError(f"{source}: metadata['routes'] is not a dict: {routes!r}")
    start = time.perf_counter()
    path = export_shape_agnostic(
        args.output,
        {"kind": "shape_agnostic", "name": name, "kwargs": kwargs},
        transform,
        backends=backends,
        ranks=args.ranks,
        lr=lr,
        overwrite=args.overwrite,
        training=training,
        routes=routes or None,
    )
    print(f"wrote {path} ({', '.join(backends)}) in {time.perf_counter() - start:.1f} s", file=out)
    if sign_key is not None:
        from compiledopt.export import signing

        print(f"signed it with key {signing.sign_artifact(path, sign_key)}", file=out)
    return 0


def _transform(state: Dict[str, Any], metadata: Any, source: str) -> Tuple[str, dict, Any]:
    """``(name, kwargs, transform)`` of the checkpoint ``state``: the transform its spec names,
    with its weights loaded; an error naming ``source`` if any of it does not fit."""
    from compiledopt.learned.catalog import build_transform

    spec = metadata.get("transform_spec") if isinstance(metadata, dict) else None
    if not isinstance(spec, dict) or not spec:
        raise ValueError(f"{source} has no transform spec (write it with `compiledopt train`)")
    name = _field(spec, "name", str, f"{source}: its transform_spec")
    kwargs = spec.get("kwargs") or {}
    if not isinstance(kwargs, dict):
        raise ValueError(f"{source}: its transform_spec kwargs are not a dict: {kwargs!r}")
    try:
        transform = build_transform(name, kwargs)
    except TypeError as error:
        raise ValueError(f"{source}: transform {name} {kwargs}: {error}") from None
    try:
        transform.load_state_dict(_field(state, "transform", dict, source))
    except RuntimeError as error:
        first = str(error).strip().splitlines()[0]
        raise ValueError(f"{source}: its weights do not fit {name} {kwargs} ({first})") from None
    return name, kwargs, transform


def _training_and_lr(
    args: argparse.Namespace, state: Dict[str, Any], metadata: Dict[str, Any], source: str
) -> Tuple[Optional[Dict[str, Any]], float]:
    """The artifact's ``training`` block (the checkpoint's updated with ``--training``; None if
    both are absent) and its ``lr`` (``--lr``, else the block's, else the inner lr)."""
    training = metadata.get("training")
    if training is not None and not isinstance(training, dict):
        raise ValueError(f"{source}: metadata['training'] is not a dict: {training!r}")
    if training is not None or args.training is not None:
        if args.training is not None and "lr" in args.training:
            _lr(args.training["lr"], "--training: lr")
        training = {**(training or {}), **(args.training or {})}
    lr = args.lr
    if lr is None and training and "lr" in training:
        lr = _lr(training["lr"], f"{source}: metadata['training']['lr']")
    if lr is None:
        config = _field(state, "config", dict, source)
        lr = _lr(config.get("inner_lr"), f"{source}: its config's inner_lr")
    if training is not None:
        training["lr"] = lr
    return training, lr
