"""Self-describing optimizer artifacts: a manifest, the weights, and one graph per backend.

Layout of an artifact directory (format version 1)::

    manifest.json          what it is (see below); the only file not checksummed
    weights.safetensors    the transform weights, to rebuild the eager reference
    rule.pt                TorchScript (any rank for shape-agnostic rules)
    rule.onnx | rule_rank{r}.onnx    ONNX (bound | shape-agnostic, one per rank, dynamic sizes)
    rule.pt2  | rule_rank{r}.pt2     torch.export + AOTInductor package

``manifest.json`` fields: ``format`` (``"compiledopt-artifact"``), ``format_version``, ``kind``
(``"bound"``: one graph for a fixed list of parameters; ``"shape_agnostic"``: per-tensor graphs for
parameters of any shape), ``transform`` (the spec that rebuilds it, see
:mod:`compiledopt.export.spec`), ``dtype``, ``lr`` (suggested learning rate), ``bindings`` (bound:
``name``, ``shape``, ``dtype`` and ``state`` — names and shapes — of every parameter), ``ranks`` and
``state_names`` (shape-agnostic), ``backends`` (backend -> its files), ``files`` (file -> sha256),
``producer`` (versions of compiledopt, torch, onnx, onnxruntime, python).

:func:`load_artifact` verifies everything before any graph is loaded and raises
:class:`ArtifactError` with one message naming the problem; weights load with safetensors and
graphs with their own loaders, so nothing is unpickled.
"""

import hashlib
import json
import os
import platform
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Sequence, Tuple

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from compiledopt._validation import check_positive
from compiledopt.export import spec as specs
from compiledopt.export.rule import ModelRule, TensorRule
from compiledopt.transforms.base import Transform

FORMAT = "compiledopt-artifact"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"
BACKENDS = ("torchscript", "onnx", "aoti")
_EXTENSIONS = {"torchscript": ".pt", "onnx": ".onnx", "aoti": ".pt2"}
_DTYPES = {"float32": torch.float32, "float64": torch.float64}
# Backends compiled by Inductor get the fused formulations (see freeze_transform).
_FUSED = ("aoti",)


class ArtifactError(ValueError):
    """An artifact is missing, corrupted, of an unknown format, or does not fit the parameters."""


def _backend_module(name: str):
    if name == "torchscript":
        from compiledopt.export import torchscript as module
    elif name == "onnx":
        from compiledopt.export import onnx as module
    elif name == "aoti":
        from compiledopt.export import aoti as module
    else:
        raise ValueError(f"Unknown backend: {name!r} (choose from {BACKENDS})")
    return module


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
    import onnx
    import onnxruntime

    import compiledopt

    return {
        "compiledopt": compiledopt.__version__,
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "python": platform.python_version(),
    }


def _unique(transforms: Sequence[Transform]) -> List[Transform]:
    unique: List[Transform] = []
    for transform in transforms:
        if not any(transform is seen for seen in unique):
            unique.append(transform)
    return unique


def _rank_example(rank: int, dtype: torch.dtype) -> Tensor:
    """An example parameter of ``rank`` whose sizes are all different and greater than 1."""
    return torch.randn((5, 4, 3, 2, 6)[:rank], dtype=dtype)


def _write(
    directory: Path,
    manifest: Dict[str, Any],
    weights: Dict[str, Tensor],
    graphs: List[Tuple[str, str, nn.Module, tuple, bool]],
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
        _backend_module(backend).save(rule, example, str(staging / filename), dynamic)
        backends.setdefault(backend, []).append(filename)
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
    backends: Sequence[str] = BACKENDS,
    lr: float = 1e-3,
    overwrite: bool = False,
) -> Path:
    """Export the whole-model rule of ``transforms`` (one per parameter) as an artifact.

    Args:
        directory: where to write the artifact (created; must not exist unless ``overwrite``).
        spec: the transform spec that rebuilds ``transforms`` (see :mod:`compiledopt.export.spec`).
        transforms: the trained transforms, one per parameter (a shared one may repeat).
        named_params: ``(name, parameter)`` pairs the rule is bound to, in order.
        backends: any of ``"torchscript"``, ``"onnx"``, ``"aoti"``.
        lr: the learning rate recorded as the artifact's suggestion.
    """
    spec = specs.check_spec(spec)
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
    unique = nn.ModuleList(_unique(transforms))
    graphs = [
        (
            b,
            "rule" + _EXTENSIONS[_check_backend(b)],
            ModelRule(transforms, counts, b in _FUSED),
            example,
            False,
        )
        for b in backends
    ]
    manifest = {
        "kind": "bound",
        "transform": spec,
        "dtype": _dtype_name(dtype),
        "lr": check_positive(lr, "lr"),
        "bindings": bindings,
    }
    return _write(Path(directory), manifest, unique.state_dict(), graphs, overwrite)


def export_shape_agnostic(
    directory: str | os.PathLike,
    spec: Mapping[str, Any],
    transform: Transform,
    backends: Sequence[str] = BACKENDS,
    ranks: Sequence[int] = (0, 1, 2, 3, 4, 5),
    lr: float = 1e-3,
    dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
) -> Path:
    """Export a shape-agnostic transform as per-tensor graphs that apply to any model.

    TorchScript writes one graph for every rank; ONNX and AOTInductor one per rank in ``ranks``,
    with every size dynamic.
    """
    spec = specs.check_spec(spec)
    if spec["kind"] != "shape_agnostic" or not transform.shape_agnostic:
        raise ValueError(f"{type(transform).__name__} is not shape-agnostic: use export_bound")
    ranks = sorted({int(r) for r in ranks})
    if not ranks or ranks[0] < 0 or ranks[-1] > 5:
        raise ValueError(f"Invalid ranks: {ranks} (a non-empty subset of 0..5)")
    transform = transform.to(dtype)
    graphs = []
    for backend in backends:
        extension = _EXTENSIONS[_check_backend(backend)]
        rule = TensorRule(transform, backend in _FUSED)
        if backend == "torchscript":
            example = _tensor_example(transform, 2, dtype)
            graphs.append((backend, "rule" + extension, rule, example, True))
            continue
        for rank in ranks:
            example = _tensor_example(transform, rank, dtype)
            graphs.append((backend, f"rule_rank{rank}{extension}", rule, example, True))
    manifest = {
        "kind": "shape_agnostic",
        "transform": spec,
        "dtype": _dtype_name(dtype),
        "lr": check_positive(lr, "lr"),
        "ranks": ranks,
        "state_names": transform.state_names(),
    }
    weights = nn.ModuleList([transform]).state_dict()
    return _write(Path(directory), manifest, weights, graphs, overwrite)


def _tensor_example(transform: Transform, rank: int, dtype: torch.dtype) -> tuple:
    param = _rank_example(rank, dtype)
    return (torch.randn_like(param), param, transform.init_state(param), torch.tensor(0))


def _check_backend(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"Unknown backend: {name!r} (choose from {BACKENDS})")
    return name


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
    def bindings(self) -> List[Dict[str, Any]]:
        return self.manifest.get("bindings", [])

    def transforms(self) -> List[Transform]:
        """The eager transforms, rebuilt from the spec and the weights (one per binding for a
        bound artifact; the one shared transform for a shape-agnostic artifact)."""
        if self.kind == "bound":
            built = specs.build_bound(self.spec, [b["shape"] for b in self.bindings], self.dtype)
        else:
            built = [specs.build_shape_agnostic(self.spec).to(self.dtype)]
        unique = nn.ModuleList(_unique(built))
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
        (a shape-agnostic ONNX/AOTI artifact dispatches on the tensor's rank)."""
        files = self.manifest["backends"].get(_check_backend(backend))
        if not files:
            raise ArtifactError(f"{self.path}: no {backend} graph (it has {self.backends})")
        module = _backend_module(backend)
        if self.kind == "bound" or backend == "torchscript":
            return module.load(str(self.path / files[0]))
        by_rank = {int(f.split("_rank")[1].split(".")[0]): f for f in files}
        return _RankDispatch(self.path, by_rank, module)

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

    def __init__(self, path: Path, files: Dict[int, str], module) -> None:
        self.path, self.files, self.module = path, files, module
        self.loaded: Dict[int, Callable] = {}

    def __call__(self, grad: Tensor, param: Tensor, state: List[Tensor], step: Tensor):
        rank = grad.dim()
        if rank not in self.files:
            raise ArtifactError(
                f"{self.path} has no graph for rank-{rank} parameters (ranks {sorted(self.files)})"
            )
        if rank not in self.loaded:
            self.loaded[rank] = self.module.load(str(self.path / self.files[rank]))
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
