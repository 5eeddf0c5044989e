"""A ``compiledopt train`` checkpoint -> a shape-agnostic artifact: what ``compiledopt export``
does, and what ``compiledopt train --export`` does once training ends.

The artifact's ``training`` block is the checkpoint's ``metadata["training"]`` updated with
``training`` (none if both are absent); its ``lr`` is ``lr``, else the block's, else the
checkpoint's inner learning rate. Everything is checked (the checkpoint, its spec, its weights,
the numbers) before anything is written; each problem is a ``ValueError`` naming it."""

import math
import os
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

__all__ = ["RANKS", "export_checkpoint"]

#: The parameter ranks an artifact can hold graphs for.
RANKS = (0, 1, 2, 3, 4, 5)


def export_checkpoint(
    checkpoint: "str | os.PathLike[str]",
    output: "str | os.PathLike[str]",
    backends: Sequence[str],
    ranks: Sequence[int] = RANKS,
    lr: Optional[float] = None,
    training: Optional[Mapping[str, Any]] = None,
    overwrite: bool = False,
) -> Path:
    """Export the transform of ``checkpoint`` to the artifact folder ``output`` with
    ``backends`` (graphs for parameter ``ranks``); returns the artifact's path."""
    from compiledopt.export import export_shape_agnostic
    from compiledopt.meta.resume import load_checkpoint

    source = f"checkpoint {checkpoint}"
    state = load_checkpoint(str(checkpoint), "checkpoint")
    metadata = state.get("metadata") or {}
    name, kwargs, transform = _transform(state, metadata, source)
    block, lr = _training_and_lr(lr, training, state, metadata, source)
    routes = metadata.get("routes")  # the rule of each parameter role it was meta-trained with
    if routes is not None and not isinstance(routes, dict):
        raise ValueError(f"{source}: metadata['routes'] is not a dict: {routes!r}")
    return export_shape_agnostic(
        output,
        {"kind": "shape_agnostic", "name": name, "kwargs": kwargs},
        transform,
        backends=list(backends),
        ranks=list(ranks),
        lr=lr,
        overwrite=overwrite,
        training=block,
        routes=routes or None,
    )


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
    lr: Optional[float],
    extra: Optional[Mapping[str, Any]],
    state: Dict[str, Any],
    metadata: Dict[str, Any],
    source: str,
) -> Tuple[Optional[Dict[str, Any]], float]:
    """The artifact's ``training`` block (the checkpoint's updated with ``extra``; None if both
    are absent) and its ``lr`` (``lr``, else the block's, else the inner lr)."""
    training = metadata.get("training")
    if training is not None and not isinstance(training, dict):
        raise ValueError(f"{source}: metadata['training'] is not a dict: {training!r}")
    if training is not None or extra is not None:
        if extra is not None and "lr" in extra:
            _lr(extra["lr"], "--training: lr")
        training = {**(training or {}), **(extra or {})}
    if lr is None and training and "lr" in training:
        lr = _lr(training["lr"], f"{source}: metadata['training']['lr']")
    if lr is None:
        config = _field(state, "config", dict, source)
        lr = _lr(config.get("inner_lr"), f"{source}: its config's inner_lr")
    if training is not None:
        training["lr"] = lr
    return training, lr
