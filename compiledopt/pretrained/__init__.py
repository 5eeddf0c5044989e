"""Learned optimizers shipped inside the package, loaded by name.

Each packaged optimizer is an artifact directory (``manifest.json``, ``weights.safetensors``,
``rule.pt``, ``rule_rank{r}.onnx``) under this package, named after its folder; :func:`names`
discovers them, so adding one is dropping its folder here (written by ``compiledopt export
--backends torchscript,onnx``: AOTInductor packages are native code for the exporting machine's
CPU and are not shipped). The wheel carries them as package data and :func:`path` finds them with
:mod:`importlib.resources`, installed or in a source checkout::

    from compiledopt import FrozenOptimizer, pretrained

    pretrained.names()  # ['coordinate-mlp', ...]
    optimizer = FrozenOptimizer(model.parameters(), pretrained.DEFAULT)  # or any name

:func:`info` reads the manifest's optional ``training`` block: what the optimizer was
meta-trained on, for how long, and the learning rate and schedule it recommends.
"""

import os
from importlib import resources
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, TypeGuard, Union

from compiledopt._validation import is_real
from compiledopt.export import Artifact, ArtifactError, load_artifact
from compiledopt.export.artifact import artifact_path
from compiledopt.export.layout import MANIFEST
from compiledopt.pretrained.hub import from_hub, push_to_hub

__all__ = [
    "DEFAULT",
    "from_hub",
    "info",
    "load",
    "names",
    "open_artifact",
    "path",
    "push_to_hub",
    "resolve",
    "summary",
]

#: The recommended packaged optimizer, used where none is named: the best general-purpose one
#: shipped (change it when a better one is added).
DEFAULT = "normalized-mlp"


def _root() -> Path:
    root = resources.files(__name__)
    if not isinstance(root, Path):  # e.g. imported from a zip archive
        raise RuntimeError(
            f"compiledopt.pretrained is not on a file system ({root}): install compiledopt "
            "as a directory (pip does) to load its packaged optimizers"
        )
    return root


def names() -> List[str]:
    """The packaged optimizers' names, sorted: the folders here that hold a manifest."""
    return sorted(
        p.name
        for p in _root().iterdir()
        # A folder starting with "." is an export in progress (or an old one being replaced).
        if (p / MANIFEST).is_file() and not p.name.startswith(".")
    )


def _unknown(name: object) -> str:
    return f"{name!r} is not a packaged optimizer (packaged: {', '.join(names()) or 'none'})"


def path(name: str) -> Path:
    """The artifact directory of the packaged optimizer ``name``.

    Raises:
        ValueError: ``name`` is not one of :func:`names`, which the message lists.
    """
    if not isinstance(name, str) or name not in names():
        raise ValueError(_unknown(name))
    return _root() / name


def load(name: str) -> Artifact:
    """The packaged optimizer ``name``, loaded and verified (:func:`load_artifact`). It is
    trusted to run code (its TorchScript graph): it ships inside the installed package, whose
    Python code runs anyway."""
    return load_artifact(path(name), trust_code=True)


def open_artifact(
    path_or_name: "str | os.PathLike",
    *,
    trust_code: bool = False,
    trusted_keys: "Optional[Sequence[str | os.PathLike | bytes]]" = None,
) -> Artifact:
    """The artifact at ``path_or_name`` (see :func:`resolve`), loaded and verified: a packaged
    optimizer as :func:`load` does (trusted), any other with ``trust_code`` and
    ``trusted_keys`` passed to :func:`~compiledopt.export.load_artifact`."""
    where = resolve(path_or_name)
    if _is_packaged(where):
        return load(where.name)
    return load_artifact(where, trust_code=trust_code, trusted_keys=trusted_keys)


def _is_packaged(where: Path) -> bool:
    try:
        return where.resolve().parent == _root().resolve() and where.name in names()
    except OSError:
        return False


def resolve(path_or_name: "str | os.PathLike") -> Path:
    """An artifact directory: ``path_or_name`` itself when it exists, else the packaged
    optimizer of that name (a plain name: no path separator).

    Raises:
        ArtifactError: neither an existing path nor a packaged name (the message names it and
            lists the packaged ones); an empty string is neither, not the working directory.
    """
    given = artifact_path(path_or_name)  # an empty one refused: Path("") is the working directory
    if given.exists():
        return given
    text = os.fspath(path_or_name)
    separators = [s for s in (os.sep, os.altsep, "/") if s]
    if isinstance(text, str) and not any(s in text for s in separators) and text in names():
        return _root() / text
    raise ArtifactError(
        f"artifact not found: {text} is not a directory, nor the name of a packaged optimizer "
        f"(packaged: {', '.join(names()) or 'none'})"
    )


def info(name: str) -> Dict[str, Any]:
    """What the packaged optimizer ``name`` is and how it was meta-trained.

    Returns a dict with ``name``, ``path``, ``transform`` (the family's catalog name), ``lr``
    (the recommended learning rate, FrozenOptimizer's default), ``schedule`` (the recommended
    schedule, ``None`` if the manifest states none), ``backends``, ``training`` (the manifest's
    whole ``training`` block: task family, estimator, meta-steps, wall time, CPU count, seed,
    config…; ``{}`` if absent) and ``summary`` (one line, see :func:`summary`).
    """
    artifact = load(name)
    training = artifact.training
    return {
        "name": name,
        "path": artifact.path,
        "transform": artifact.spec.get("name", artifact.spec["kind"]),
        "lr": float(artifact.manifest["lr"]),
        "schedule": training.get("schedule"),
        "backends": artifact.backends,
        "training": training,
        "summary": summary(training, artifact.manifest["lr"]),
    }


def summary(training: Mapping[str, Any], lr: float) -> str:
    """One line from a ``training`` block: "meta-trained on …, … steps, … CPU-hours;
    recommended lr …, schedule …" (``?`` for what the block does not state; CPU-hours from
    ``cpu_time_s``, else ``wall_time_s`` times ``cpu_count``, else "CPU time not recorded")."""
    if not training:
        return f"no training record; suggested lr {lr:g}"
    steps = training.get("meta_steps", "?")
    # CPU-hours: the measured CPU time if recorded, else wall time x CPU count (an upper bound).
    wall, cpus, cpu_time = (training.get(k) for k in ("wall_time_s", "cpu_count", "cpu_time_s"))
    hours = "CPU time not recorded"
    if _number(cpu_time):
        hours = f"{float(cpu_time) / 3600:.2g} CPU-hours"
    elif _number(wall) and _number(cpus):  # as floats: a product of ints may exceed one
        hours = f"{float(wall) * float(cpus) / 3600:.2g} CPU-hours"
    return (
        f"meta-trained on {training.get('task_family', '?')}, {steps} steps, {hours}; "
        f"recommended lr {lr:g}, "
        f"schedule {_schedule(training.get('schedule'))}"
    )


def _number(value: Any) -> TypeGuard[Union[int, float]]:
    """A finite number (not a bool, nor an int too large for a float)."""
    return is_real(value)


def _schedule(schedule: Any) -> str:
    if schedule is None:
        return "?"
    if not isinstance(schedule, Mapping):
        return str(schedule)
    parts = []
    for key, value in schedule.items():
        if key == "warmup_fraction" and _number(value):
            parts.append(f"{value:.0%} warmup")
        elif key == "decay":
            parts.append("constant lr" if value in ("constant", "none") else f"{value} decay")
        else:
            parts.append(f"{key} {value}")
    return ", ".join(parts) or "?"
