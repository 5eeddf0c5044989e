"""Self-describing optimizer artifacts: a manifest, the weights, and one graph per backend.

Layout of an artifact directory (format version 1)::

    manifest.json          what it is (see below); the only file not checksummed
    weights.safetensors    the transform weights, to rebuild the eager reference
    rule.pt                TorchScript (any rank for shape-agnostic rules)
    rule.onnx | rule_rank{r}.onnx    ONNX (bound | shape-agnostic, one per rank, dynamic sizes)
    rule.pt2  | rule_rank{r}.pt2     torch.export + AOTInductor package

A graph file is ``rule`` plus its backend's extension; a shape-agnostic artifact of a backend
that writes one graph per rank (:attr:`~compiledopt.export.backend.Backend.per_rank`) has
``rule_rank{r}`` plus the extension for each rank ``r``. Backends are looked up by name in
:mod:`compiledopt.export.backend`'s registry.

``manifest.json`` fields: ``format`` (``"compiledopt-artifact"``), ``format_version``, ``kind``
(``"bound"``: one graph for a fixed list of parameters; ``"shape_agnostic"``: per-tensor graphs for
parameters of any shape), ``transform`` (the spec that rebuilds it, see
:mod:`compiledopt.export.spec`), ``dtype``, ``lr`` (suggested learning rate), ``bindings`` (bound:
``name``, ``shape``, ``dtype`` and ``state`` — names and shapes — of every parameter), ``ranks`` and
``state_names`` (shape-agnostic), ``backends`` (backend -> its files), ``files`` (file -> sha256),
``producer`` (versions of compiledopt, torch, onnx, onnxruntime, python; ``"not installed"``
for an absent package), and optionally ``training``: a free-form JSON object of provenance (task
family, estimator, meta-steps, wall time, CPU count, seed, recommended ``lr`` and ``schedule``).

:func:`load_artifact` verifies everything before any graph is loaded and raises
:class:`ArtifactError` with one message naming the problem; weights load with safetensors and
graphs with their own loaders, so nothing is unpickled.
"""

import copy
import hashlib
import importlib.metadata
import json
import os
import platform
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from compiledopt._identity import unique_by_identity
from compiledopt._validation import check_positive
from compiledopt.export import backend as registry
from compiledopt.export import spec as specs
from compiledopt.export.backend import Backend
from compiledopt.export.manifest import ArtifactError
from compiledopt.export.rule import ModelRule, TensorRule
from compiledopt.transforms.base import Transform

FORMAT = "compiledopt-artifact"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"
#: The registered backends' names (:func:`compiledopt.export.backend.names`), read once the
#: package has registered them.
BACKENDS: Tuple[str, ...] = registry.names()
_DTYPES = {"float32": torch.float32, "float64": torch.float64}
# Versions recorded in the manifest: distribution name -> the module it provides.
_RECORDED = {"onnx": "onnx", "onnxruntime": "onnxruntime"}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _dtype_name(dtype: torch.dtype) -> str:
    for name, value in _DTYPES.items():
        if value == dtype:
            return name
    raise ValueError(f"artifacts support float32 and float64, got {dtype}")


def _producer() -> Dict[str, str]:
    """The versions that wrote an artifact, read from the installed distributions' metadata
    (nothing is imported: ``"not installed"`` for an absent one)."""
    import compiledopt

    return {
        "compiledopt": compiledopt.__version__,
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


def check_training(training: Any) -> Dict[str, Any]:
    """``training`` as a manifest's ``training`` block: a dict of JSON values (str keys; finite
    numbers), copied; ``ValueError`` naming the field otherwise."""
    if not isinstance(training, Mapping):
        raise ValueError(f"'training' must be a JSON object, got {type(training).__name__}")
    try:
        return json.loads(json.dumps(dict(training), allow_nan=False))
    except (TypeError, ValueError) as error:
        raise ValueError(f"'training' must hold only JSON values: {error}") from None


def _backends(names: Optional[Sequence[str]]) -> List[Backend]:
    """The backends called ``names`` (``None``: every registered one), each checked to be
    known and installed, so an export fails before any work when one is not."""
    if isinstance(names, str):
        raise ValueError(f"backends must be a sequence of names, got the string {names!r}")
    chosen = [registry.get(name) for name in (registry.names() if names is None else names)]
    for backend in chosen:
        backend.require()
    return chosen


def _graph_file(backend: Backend, rank: Optional[int] = None) -> str:
    """``rule`` plus the extension, or ``rule_rank{rank}`` plus the extension."""
    return ("rule" if rank is None else f"rule_rank{rank}") + backend.extension


def _file_rank(filename: str) -> int:
    """The rank of a per-rank graph file (``rule_rank3.onnx`` -> 3)."""
    return int(filename.split("_rank")[1].split(".")[0])


def _rank_example(rank: int, dtype: torch.dtype) -> Tensor:
    """An example parameter of ``rank`` whose sizes are all different and greater than 1."""
    return torch.randn((5, 4, 3, 2, 6)[:rank], dtype=dtype)


def _write(
    directory: Path,
    manifest: Dict[str, Any],
    weights: Dict[str, Tensor],
    graphs: List[Tuple[Backend, str, nn.Module, tuple, bool]],
    overwrite: bool,
) -> Path:
    if directory.exists():
        if not overwrite:
            raise FileExistsError(f"artifact directory {directory} exists (pass overwrite=True)")
        shutil.rmtree(directory)
    staging = directory.with_name(directory.name + ".partial")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    save_file({k: v.detach().contiguous().clone() for k, v in weights.items()}, staging / WEIGHTS)
    backends: Dict[str, List[str]] = {}
    for backend, filename, rule, example, dynamic in graphs:
        backend.save(rule, example, str(staging / filename), dynamic)
        backends.setdefault(backend.name, []).append(filename)
    files = [WEIGHTS] + [f for fs in backends.values() for f in fs]
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        **manifest,
        "backends": backends,
        "files": {name: _sha256(staging / name) for name in files},
        "producer": _producer(),
    }
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(staging, directory)
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
        names = transform.state_names()
        bindings.append(
            {
                "name": name,
                "shape": list(param.shape),
                "dtype": _dtype_name(param.dtype),
                "state": [{"name": n, "shape": list(s.shape)} for n, s in zip(names, state)],
            }
        )
    counts = [len(s) for s in states]
    flat = [s for state in states for s in state]
    example = ([torch.randn_like(p) for p in params], params, flat, torch.tensor(0))
    unique = nn.ModuleList(unique_by_identity(transforms)[0])
    graphs = [
        (b, _graph_file(b), ModelRule(transforms, counts, b.fused), example, False) for b in chosen
    ]
    manifest = {
        "kind": "bound",
        "transform": spec,
        "dtype": _dtype_name(dtype),
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

    Raises:
        BackendUnavailableError: a chosen backend's modules are not installed (before any
            export work).
    """
    spec = specs.check_spec(spec)
    if spec["kind"] != "shape_agnostic" or not transform.shape_agnostic:
        raise ValueError(f"{type(transform).__name__} is not shape-agnostic: use export_bound")
    ranks = sorted({int(r) for r in ranks})
    if not ranks or ranks[0] < 0 or ranks[-1] > 5:
        raise ValueError(f"Invalid ranks: {ranks} (a non-empty subset of 0..5)")
    name = _dtype_name(dtype)
    chosen = _backends(backends)
    # A copy: Module.to converts in place, and an export must not change its input.
    transform = copy.deepcopy(transform).to(dtype)
    graphs = []
    for backend in chosen:
        rule = TensorRule(transform, backend.fused)
        if not backend.per_rank:
            example = _tensor_example(transform, 2, dtype)
            graphs.append((backend, _graph_file(backend), rule, example, True))
            continue
        for rank in ranks:
            example = _tensor_example(transform, rank, dtype)
            graphs.append((backend, _graph_file(backend, rank), rule, example, True))
    manifest = {
        "kind": "shape_agnostic",
        "transform": spec,
        "dtype": name,
        "lr": check_positive(lr, "lr"),
        "ranks": ranks,
        "state_names": transform.state_names(),
        **({} if training is None else {"training": check_training(training)}),
    }
    weights = nn.ModuleList([transform]).state_dict()
    return _write(Path(directory), manifest, weights, graphs, overwrite)


def _tensor_example(transform: Transform, rank: int, dtype: torch.dtype) -> tuple:
    param = _rank_example(rank, dtype)
    return (torch.randn_like(param), param, transform.init_state(param), torch.tensor(0))


# -- loading ----------------------------------------------------------------------------------


@dataclass
class Artifact:
    """A verified artifact on disk. Build it with :func:`load_artifact`."""

    path: Path
    manifest: Dict[str, Any]

    @property
    def kind(self) -> str:
        return self.manifest["kind"]

    @property
    def spec(self) -> Dict[str, Any]:
        return self.manifest["transform"]

    @property
    def dtype(self) -> torch.dtype:
        return _DTYPES[self.manifest["dtype"]]

    @property
    def backends(self) -> List[str]:
        return list(self.manifest["backends"])

    @property
    def training(self) -> Dict[str, Any]:
        """The manifest's ``training`` block (provenance; ``{}`` when it has none)."""
        return self.manifest.get("training", {})

    @property
    def bindings(self) -> List[Dict[str, Any]]:
        return self.manifest.get("bindings", [])

    def transforms(self) -> List[Transform]:
        """The eager transforms, rebuilt from the spec and the weights (one per binding for a
        bound artifact; the one shared transform for a shape-agnostic artifact)."""
        if self.kind == "bound":
            built = specs.build_bound(self.spec, [b["shape"] for b in self.bindings], self.dtype)
        else:
            built = [specs.build_shape_agnostic(self.spec).to(self.dtype)]
        unique = nn.ModuleList(unique_by_identity(built)[0])
        weights = load_file(str(self.path / WEIGHTS))
        try:
            unique.load_state_dict(weights)
        except RuntimeError as error:
            raise ArtifactError(
                f"{self.path}: weights do not fit the transform spec: {error}"
            ) from None
        return built

    def runner(self, backend: str) -> Callable:
        """The loaded graph of ``backend``: a bound rule's or a per-tensor rule's signature
        (a shape-agnostic artifact of a per-rank backend, ONNX or AOTI, dispatches on the
        tensor's rank).

        Raises:
            ValueError: ``backend`` is not a registered backend.
            ArtifactError: the artifact has no graph of ``backend``.
            BackendUnavailableError: the modules that load ``backend`` are not installed.
        """
        chosen = registry.get(backend)
        files = self.manifest["backends"].get(chosen.name)
        if not files:
            raise ArtifactError(f"{self.path}: no {backend} graph (it has {self.backends})")
        chosen.require(loading=True)
        self.check_runnable(backend)
        if self.kind == "bound" or not chosen.per_rank:
            return chosen.load(str(self.path / files[0]))
        by_rank = {_file_rank(f): f for f in files}
        return _RankDispatch(self.path, by_rank, chosen)

    def check_runnable(self, backend: str) -> None:
        """Raise :class:`ArtifactError` if a graph of ``backend`` cannot run on this machine
        (an AOTInductor package compiled for an instruction set this CPU lacks), before any of
        them is loaded."""
        chosen = registry.get(backend)
        for name in self.manifest["backends"].get(chosen.name, []):
            try:
                chosen.check_runnable(str(self.path / name))
            except ValueError as error:
                raise ArtifactError(str(error)) from None

    def check_bindings(
        self,
        named_params: Sequence[Tuple[str, Tensor]],
        check_dtype: bool = True,
        check_names: bool = False,
    ) -> None:
        """Raise :class:`ArtifactError` naming the first parameter that doesn't fit the bindings
        (count, shape, dtype unless ``check_dtype`` is False, and names if ``check_names``)."""
        if self.kind != "bound":
            return
        if len(named_params) != len(self.bindings):
            raise ArtifactError(
                f"{self.path} is bound to {len(self.bindings)} parameters, got {len(named_params)}"
            )
        for binding, (name, param) in zip(self.bindings, named_params):
            if check_names and name != binding["name"]:
                raise ArtifactError(
                    f"parameter {name!r} is where {self.path} binds {binding['name']!r}"
                )
            dtype = str(param.dtype).removeprefix("torch.")
            if list(param.shape) != binding["shape"] or (check_dtype and dtype != binding["dtype"]):
                raise ArtifactError(
                    f"parameter {name!r} has shape {tuple(param.shape)} and dtype {param.dtype}, "
                    f"but {self.path} binds {binding['name']!r} of shape {tuple(binding['shape'])}"
                    f" and dtype {binding['dtype']}"
                )


class _RankDispatch:
    """Per-tensor runner over one graph per rank, loaded on first use."""

    def __init__(self, path: Path, files: Dict[int, str], backend: Backend) -> None:
        self.path, self.files, self.backend = path, files, backend
        self.loaded: Dict[int, Callable] = {}

    def __call__(self, grad: Tensor, param: Tensor, state: List[Tensor], step: Tensor):
        rank = grad.dim()
        if rank not in self.files:
            raise ArtifactError(
                f"{self.path} has no graph for rank-{rank} parameters (ranks {sorted(self.files)})"
            )
        if rank not in self.loaded:
            self.loaded[rank] = self.backend.load(str(self.path / self.files[rank]))
        return self.loaded[rank](grad, param, state, step)


def load_artifact(path: str | os.PathLike) -> Artifact:
    """Open and verify the artifact at ``path``; :class:`ArtifactError` names any problem."""
    path = Path(path)
    if not path.is_dir():
        raise ArtifactError(f"artifact not found: {path} is not a directory")
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise ArtifactError(f"{path}: missing {MANIFEST}")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ArtifactError(f"{path}: {MANIFEST} is not valid JSON (truncated?): {error}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(
            f"{path}: not a compiledopt artifact (format {manifest.get('format')!r})"
            if isinstance(manifest, dict)
            else f"{path}: not a compiledopt artifact"
        )
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ArtifactError(
            f"{path}: unknown format version {version!r} (this compiledopt reads {FORMAT_VERSION})"
        )
    for key in ("kind", "transform", "dtype", "lr", "backends", "files"):
        if key not in manifest:
            raise ArtifactError(f"{path}: {MANIFEST} lacks {key!r}")
    if manifest["kind"] not in ("bound", "shape_agnostic") or manifest["dtype"] not in _DTYPES:
        raise ArtifactError(
            f"{path}: unknown kind {manifest['kind']!r} or dtype {manifest['dtype']!r}"
        )
    try:
        specs.check_spec(manifest["transform"])
        if "training" in manifest:
            check_training(manifest["training"])
    except ValueError as error:
        raise ArtifactError(f"{path}: {error}") from None
    listed = set(manifest["files"])
    needed = {WEIGHTS} | {f for fs in manifest["backends"].values() for f in fs}
    if not needed <= listed:
        raise ArtifactError(f"{path}: files without a checksum: {sorted(needed - listed)}")
    for name, digest in manifest["files"].items():
        file = path / name
        if Path(name).name != name or not file.is_file():
            raise ArtifactError(f"{path}: missing file {name}")
        if _sha256(file) != digest:
            raise ArtifactError(
                f"{path}: checksum mismatch for {name} (the file was modified or truncated)"
            )
    return Artifact(path, manifest)
