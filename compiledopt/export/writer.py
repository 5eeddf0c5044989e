"""Writing artifacts: a frozen transform exported as weights, graphs and a manifest.

Every export builds in a staging folder of its own next to the destination,
``.NAME.partial-<host>-<pid>-<time>-<random>``, and moves it into place once every file is written
and hashed: two concurrent exports to one path never mix their files (the last to finish wins,
whole). See :mod:`compiledopt.export.artifact` for the format.

Replacing (``overwrite``) is crash-safe, and a folder that is not an artifact is never replaced:
see :mod:`compiledopt.export.replace`.

"""

import copy
import importlib.metadata
import json
import os
import platform
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from safetensors.torch import save
from torch import Tensor, nn

from compiledopt._identity import unique_by_identity
from compiledopt._validation import check_positive
from compiledopt.export import backend as registry
from compiledopt.export import replace as replacing
from compiledopt.export import spec as specs
from compiledopt.export.backend import Backend
from compiledopt.export.layout import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    WEIGHTS,
    dtype_name,
    graph_file,
    sha256,
    state_entries,
)
from compiledopt.export.manifest import check_manifest, check_training
from compiledopt.export.rule import ModelRule, TensorRule
from compiledopt.roles import ROLES
from compiledopt.transforms.base import Transform
from compiledopt.version import VERSION

__all__ = ["clean_stale", "export_bound", "export_shape_agnostic", "recover", "replaceable"]

# Re-exported: the commands call them through this module.
recover = replacing.recover
replaceable = replacing.replaceable
clean_stale = replacing.clean_stale

# Versions recorded in the manifest: distribution name -> the module it provides.
_RECORDED = {"onnx": "onnx", "onnxruntime": "onnxruntime"}


def _producer() -> Dict[str, str]:
    """The versions that wrote an artifact, read from the installed distributions' metadata
    (nothing is imported: ``"not installed"`` for an absent one)."""
    return {
        "compiledopt": VERSION,
        "torch": torch.__version__,
        **{name: _installed_version(name, module) for name, module in _RECORDED.items()},
        "python": platform.python_version(),
    }


def _installed_version(distribution: str, module: str) -> str:
    """The version of ``distribution``, or of whichever installed distribution provides
    ``module`` (``onnxruntime`` also ships as ``onnxruntime-gpu``…), or ``"not installed"``."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        pass
    for other in importlib.metadata.packages_distributions().get(module, []):
        try:
            return importlib.metadata.version(other)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "not installed"


def _backends(names: Optional[Sequence[str]]) -> List[Backend]:
    """The backends called ``names`` (``None``: every registered one), each checked to be
    known and installed, so an export fails before any work when one is not."""
    if isinstance(names, str):
        raise ValueError(f"backends must be a sequence of names, got the string {names!r}")
    chosen = [registry.get(name) for name in (registry.names() if names is None else names)]
    for backend in chosen:
        backend.require()
    return chosen


def _rank_example(rank: int, dtype: torch.dtype) -> Tensor:
    """An example parameter of ``rank`` whose sizes are all different and greater than 1."""
    return torch.randn((5, 4, 3, 2, 6)[:rank], dtype=dtype)


def _write(
    directory: Path,
    manifest: Dict[str, Any],
    weights: Dict[str, Tensor],
    graphs: Sequence[Tuple[Backend, str, nn.Module, tuple, bool]],
    overwrite: bool,
) -> Path:
    """Build the artifact in a fresh staging folder beside ``directory``, then move it into place
    (see the module's docstring); the staging folder is removed if anything fails."""
    replacing.recover(directory)
    replacing.check_destination(directory, overwrite)
    directory.parent.mkdir(parents=True, exist_ok=True)
    replacing.clean_stale(directory)
    staging = Path(
        tempfile.mkdtemp(prefix=replacing.aside_prefix(directory, "partial"), dir=directory.parent)
    )
    placed = False
    try:
        files: Dict[str, str] = {}
        data = save({k: v.detach().contiguous().clone() for k, v in weights.items()})
        (staging / WEIGHTS).write_bytes(data)
        files[WEIGHTS] = sha256(data)
        backends: Dict[str, List[str]] = {}
        for backend, filename, rule, example, dynamic in graphs:
            backend.save(rule, example, str(staging / filename), dynamic)
            backends.setdefault(backend.name, []).append(filename)
            files[filename] = sha256((staging / filename).read_bytes())
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            **manifest,
            "backends": backends,
            "files": files,
            "producer": _producer(),
        }
        check_manifest(manifest, str(directory))  # never write what the loader would refuse
        for entry in os.listdir(staging):  # an exporter's leftovers: the artifact is its files
            if entry not in files:
                replacing.remove_any(staging / entry)
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, allow_nan=False) + "\n")
        os.chmod(staging, 0o755)  # mkdtemp makes it private; an artifact is as readable as a file
        replacing.move_into_place(staging, directory, overwrite)
        placed = True  # whatever is at the staging path now was judged there
    finally:
        if not placed and os.path.lexists(staging):
            replacing.discard(staging)
    return directory


def export_bound(
    directory: str | os.PathLike,
    spec: Mapping[str, Any],
    transforms: Sequence[Transform],
    named_params: Sequence[Tuple[str, Tensor]],
    backends: Optional[Sequence[str]] = None,
    lr: float = 1e-3,
    overwrite: bool = False,
    training: Optional[Mapping[str, Any]] = None,
) -> Path:
    """Export the whole-model rule of ``transforms`` (one per parameter) as an artifact.

    Args:
        directory: where to write the artifact (created; must not exist unless ``overwrite``).
        spec: the transform spec that rebuilds ``transforms`` (see :mod:`compiledopt.export.spec`).
        transforms: the trained transforms, one per parameter (a shared one may repeat).
        named_params: ``(name, parameter)`` pairs the rule is bound to, in order.
        backends: names of registered backends (``"torchscript"``, ``"onnx"``, ``"aoti"``);
            ``None``: all of them.
        lr: the learning rate recorded as the artifact's suggestion.
        overwrite: replace an existing ``directory``.
        training: provenance recorded as the manifest's ``training`` block (JSON values).

    Raises:
        BackendUnavailableError: a chosen backend's modules are not installed (before any
            export work).
    """
    spec = specs.check_spec(spec)
    chosen = _backends(backends)
    if len(transforms) != len(named_params):
        raise ValueError(f"{len(transforms)} transforms for {len(named_params)} parameters")
    params = [p.detach() for _, p in named_params]
    dtype = params[0].dtype
    states = [t.init_state(p) for t, p in zip(transforms, params)]
    bindings = []
    for (name, param), transform, state in zip(named_params, transforms, states):
        if param.dtype != dtype:
            raise ValueError(f"parameter {name!r} is {param.dtype}, the others {dtype}")
        bindings.append(
            {
                "name": name,
                "shape": list(param.shape),
                "dtype": dtype_name(param.dtype),
                "state": state_entries(transform.state_names(), state),
            }
        )
    counts = [len(s) for s in states]
    flat = [s for state in states for s in state]
    example = ([torch.randn_like(p) for p in params], params, flat, torch.tensor(0))
    unique = nn.ModuleList(unique_by_identity(transforms)[0])
    graphs = [
        (b, graph_file(b), ModelRule(transforms, counts, b.fused), example, False) for b in chosen
    ]
    manifest = {
        "kind": "bound",
        "transform": spec,
        "dtype": dtype_name(dtype),
        "lr": check_positive(lr, "lr"),
        "bindings": bindings,
        **({} if training is None else {"training": check_training(training)}),
    }
    return _write(Path(directory), manifest, unique.state_dict(), graphs, overwrite)


def export_shape_agnostic(
    directory: str | os.PathLike,
    spec: Mapping[str, Any],
    transform: Transform,
    backends: Optional[Sequence[str]] = None,
    ranks: Sequence[int] = (0, 1, 2, 3, 4, 5),
    lr: float = 1e-3,
    dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
    training: Optional[Mapping[str, Any]] = None,
    routes: Optional[Mapping[str, str]] = None,
) -> Path:
    """Export a shape-agnostic transform as per-tensor graphs that apply to any model.

    A backend with one graph for every rank (TorchScript) writes one graph; the others (ONNX,
    AOTInductor) one per rank in ``ranks``, with every size dynamic. ``transform`` itself is
    left as it is (the export converts a copy to ``dtype``).

    Args:
        directory: where to write the artifact (created; must not exist unless ``overwrite``).
        spec: the shape-agnostic spec that rebuilds ``transform``.
        transform: the trained shape-agnostic transform.
        backends: names of registered backends; ``None``: all of them.
        ranks: the parameter ranks (0 to 5) that per-rank backends write graphs for.
        lr: the learning rate recorded as the artifact's suggestion.
        dtype: the dtype of the graphs and weights (float32 or float64).
        overwrite: replace an existing ``directory``.
        training: provenance recorded as the manifest's ``training`` block (JSON values).
        routes: the rule of ``transform`` (one of its ``rules()``) for each parameter role
            (``matrix``, ``vector``, ``embedding``, ``head``, ``input``), recorded as the
            manifest's ``routes``; a role left out runs the transform as configured. The graphs
            compute the transform as configured: a role routed to another rule runs on the
            ``eager`` and ``compiled`` backends.

    Raises:
        BackendUnavailableError: a chosen backend's modules are not installed (before any
            export work).
        ValueError: an unknown role or rule in ``routes``.
    """
    spec = specs.check_spec(spec)
    if spec["kind"] != "shape_agnostic" or not transform.shape_agnostic:
        raise ValueError(f"{type(transform).__name__} is not shape-agnostic: use export_bound")
    if routes is not None:
        routes = _check_routes(routes, transform)
    ranks = sorted({int(r) for r in ranks})
    if not ranks or ranks[0] < 0 or ranks[-1] > 5:
        raise ValueError(f"Invalid ranks: {ranks} (a non-empty subset of 0..5)")
    name = dtype_name(dtype)
    chosen = _backends(backends)
    # A copy: Module.to converts in place, and an export must not change its input.
    transform = copy.deepcopy(transform).to(dtype)
    graphs = []
    for backend in chosen:
        rule = TensorRule(transform, backend.fused)
        if not backend.per_rank:
            example = _tensor_example(transform, 2, dtype)
            graphs.append((backend, graph_file(backend), rule, example, True))
            continue
        for rank in ranks:
            example = _tensor_example(transform, rank, dtype)
            graphs.append((backend, graph_file(backend, rank), rule, example, True))
    manifest = {
        "kind": "shape_agnostic",
        "transform": spec,
        "dtype": name,
        "lr": check_positive(lr, "lr"),
        "ranks": ranks,
        "state_names": transform.state_names(),
        **({} if training is None else {"training": check_training(training)}),
        **({} if not routes else {"routes": routes}),
    }
    weights = nn.ModuleList([transform]).state_dict()
    return _write(Path(directory), manifest, weights, graphs, overwrite)


def _check_routes(routes: Mapping[str, str], transform: Transform) -> Dict[str, str]:
    """``routes`` as the manifest records it: only the roles it names, each rule one of the
    transform's (``ValueError`` naming an unknown role or rule)."""
    if not isinstance(routes, Mapping):
        raise ValueError(f"Invalid routes: {routes!r} (a mapping of roles to rules)")
    rules = transform.rules()
    for role, rule in routes.items():
        if role not in ROLES:
            raise ValueError(f"Invalid routes: unknown role {role!r} (roles are {ROLES})")
        if rule not in rules:
            raise ValueError(f"Invalid routes: role {role!r} has rule {rule!r} (one of {rules})")
    return dict(routes)


def _tensor_example(transform: Transform, rank: int, dtype: torch.dtype) -> tuple:
    param = _rank_example(rank, dtype)
    return (torch.randn_like(param), param, transform.init_state(param), torch.tensor(0))
