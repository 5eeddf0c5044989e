"""Self-describing optimizer artifacts: a manifest, the weights, and one graph per backend.

Layout of an artifact directory (format version 1)::

    manifest.json          what it is (see below); not checksummed (it holds the checksums)
    signature.json         optional: an Ed25519 signature of manifest.json (see signatures.py)
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

:func:`load_artifact` checks the manifest against the schema of
:mod:`compiledopt.export.manifest` and every file's checksum, raising :class:`ArtifactError` with
one message naming the problem. Every file is loaded from the bytes that were hashed (weights
with safetensors, graphs with their own loaders: nothing is unpickled, no string is evaluated).
Graphs that are code (TorchScript, AOTInductor) load only from an artifact trusted with
``trust_code=True`` or signed by a key in ``trusted_keys`` (``docs/security.md``).
"""

import dataclasses
import math
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from safetensors.torch import load
from torch import Tensor, nn

from compiledopt._identity import unique_by_identity
from compiledopt._validation import check_flag
from compiledopt.export import backend as registry
from compiledopt.export import signatures
from compiledopt.export import spec as specs
from compiledopt.export.backend import Backend
from compiledopt.export.budget import BuildBudget, OverBudgetError, untouched_rng
from compiledopt.export.fit import misfit
from compiledopt.export.layout import (
    DTYPES,
    MANIFEST,
    SIGNATURE,
    WEIGHTS,
    check_weights_fit,
    file_rank,
    parse_manifest,
    read_regular,
    sha256,
    state_entries,
    weights_header,
)
from compiledopt.export.manifest import ArtifactError, check_manifest, check_training
from compiledopt.transforms.base import Transform

__all__ = [
    "MANIFEST",
    "WEIGHTS",
    "Artifact",
    "ArtifactError",
    "UntrustedCodeError",
    "artifact_path",
    "check_training",
    "load_artifact",
]


# -- loading ----------------------------------------------------------------------------------

#: The largest ``manifest.json`` read: 1 MiB, 450 times the packaged optimizers' (2.3 kB); a bound
#: artifact's manifest takes 170 to 290 bytes a parameter (measured, with long parameter names and
#: a state), so one bound to 3,500 parameters or more fits.
MAX_MANIFEST_BYTES = 1 << 20
#: The largest ``signature.json`` read (a real one is under 300 bytes).
MAX_SIGNATURE_BYTES = 1 << 16
#: The largest listed file (weights, graphs) read: 2 GiB, the most one ONNX model can hold
#: without external data (a protobuf limit); the packaged optimizers' largest file is 125 kB.
MAX_FILE_BYTES = 2 << 30
#: Errors a transform builder raises for arguments it cannot take.
_BUILD_ERRORS = (
    TypeError,
    ValueError,
    KeyError,
    IndexError,
    AttributeError,
    OverflowError,
    RuntimeError,
    NotImplementedError,
)


class UntrustedCodeError(ArtifactError):
    """A backend whose graphs are code (TorchScript, AOTInductor) was asked of an artifact that
    is not trusted to run code (see :func:`load_artifact`)."""


@dataclass(frozen=True)
class Artifact:
    """A verified artifact on disk. Build it with :func:`load_artifact`.

    Attributes:
        path: its directory.
        manifest: its parsed, schema-checked ``manifest.json``.
        code_trusted: whether graphs that are code (``Backend.carries_code``) may be loaded:
            the user passed ``trust_code=True`` or the manifest is signed by a trusted key.
        signed_by: the fingerprint of the trusted key that signed it, or ``None``.
    """

    path: Path
    manifest: Dict[str, Any]
    code_trusted: bool = False
    signed_by: Optional[str] = None

    @property
    def kind(self) -> str:
        return self.manifest["kind"]

    @property
    def spec(self) -> Dict[str, Any]:
        return self.manifest["transform"]

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.manifest["dtype"]]

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

    def trusting(self, code: bool = True) -> "Artifact":
        """This artifact with :attr:`code_trusted` set to ``code`` (the user vouches for it); a
        ``code`` that is not a bool (``"no"`` is truthy) is a ``ValueError``."""
        return dataclasses.replace(self, code_trusted=check_flag(code, "trust_code"))

    def may_load(self, backend: str) -> bool:
        """Whether ``backend``'s graphs may be loaded from this artifact: always for graphs that
        are data (ONNX), only with :attr:`code_trusted` for graphs that are code."""
        return self.code_trusted or not registry.get(backend).carries_code

    def check_may_load(self, backend: str) -> None:
        """Raise :class:`UntrustedCodeError` unless :meth:`may_load` allows ``backend``."""
        if not self.may_load(backend):
            raise UntrustedCodeError(
                f"{self.path}: its {backend} graphs are code, and the artifact is not trusted: "
                "pass trust_code=True (--trust-code) if you trust its source, or trusted_keys "
                "(--trusted-key) to accept it signed by a key you trust; the eager, compiled and "
                "onnx backends run no code from the artifact"
            )

    def read(self, name: str) -> bytes:
        """The bytes of the listed file ``name``, checked against the manifest's digest after
        they are read: the bytes returned are the bytes that were verified.

        Only a regular file is read (not a symbolic link, FIFO, device, socket or directory),
        and at most :data:`MAX_FILE_BYTES` of it (see :func:`~compiledopt.export.layout.
        read_regular`).

        Raises:
            ArtifactError: the file is missing, unlisted, not a regular file, larger than
                :data:`MAX_FILE_BYTES`, or its bytes do not match.
        """
        digest = self.manifest["files"].get(name)
        if digest is None:
            raise ArtifactError(f"{self.path}: {name} is not listed in its {MANIFEST}")
        data = read_regular(self.path, name, MAX_FILE_BYTES)
        if data is None:
            raise ArtifactError(f"{self.path}: missing file {name}")
        if sha256(data) != digest:
            raise ArtifactError(
                f"{self.path}: checksum mismatch for {name} (the file was modified or truncated)"
            )
        return data

    def transforms(self) -> List[Transform]:
        """The eager transforms, rebuilt from the spec and the weights (one per binding for a
        bound artifact; the one shared transform for a shape-agnostic artifact).

        The weights are read and verified first, and what they hold (how many tensors, of
        which dtypes and shapes) is read from their header, checked against the file's size.
        Nothing the spec implies may exceed that: a bound artifact of a per-parameter spec needs
        a tensor per binding at least (checked before anything is built), and the spec is built
        on the ``meta`` device under a budget of the weights' tensor and element counts, stopped
        as soon as it registers more (so a spec of a million layers costs as much as the
        weights' handful of tensors). Every tensor it implies is then checked against the
        weights' names, dtypes and shapes (:func:`~compiledopt.export.layout.check_weights_fit`),
        and the state the manifest lists against the state the transform keeps
        (:meth:`_check_state`), before the real transform is allocated.

        The global random number generators (CPU, and CUDA where initialised) are left as they
        were: building a transform draws its initial weights, which the artifact's weights replace.
        """
        where = self.path / WEIGHTS
        data = self.read(WEIGHTS)
        held = weights_header(data, str(where))
        per_binding = self.kind == "bound" and self.spec["kind"] != "shape_agnostic"
        if per_binding and len(self.bindings) > len(held):
            raise ArtifactError(
                f"{self.path}: weights do not fit the transform spec: {len(self.bindings)} "
                f"bindings of a {self.spec['kind']!r} spec need a tensor each, {where} holds "
                f"{len(held)} tensors"
            )
        elements = sum(math.prod(shape) for _, shape in held.values())
        with untouched_rng():
            with torch.device("meta"), BuildBudget(len(held), elements, where):
                implied_transforms = self._build("meta")
                implied = nn.ModuleList(unique_by_identity(implied_transforms)[0]).state_dict()
            check_weights_fit(implied, held, str(self.path), str(where))
            with torch.device("meta"):
                self._check_state(implied_transforms)
            try:
                weights = load(data)
            except Exception as error:  # safetensors' own error types
                raise ArtifactError(
                    f"{where}: safetensors cannot load it ({type(error).__name__}: "
                    f"{str(error)[:200]})"
                ) from error
            built = self._build()
            unique = nn.ModuleList(unique_by_identity(built)[0])
            try:
                unique.load_state_dict(weights)
            except RuntimeError as error:
                raise ArtifactError(
                    f"{self.path}: weights do not fit the transform spec: {str(error)[:500]}"
                ) from error
        return built

    def _check_state(self, built: List[Transform]) -> None:
        """Raise :class:`ArtifactError` unless the state the manifest lists is the state the
        transforms ``built`` from its spec (on the ``meta`` device) keep, as the exporter writes
        it: a shape-agnostic manifest's ``state_names`` are the transform's
        :meth:`~Transform.state_names`, and a bound manifest's ``bindings[i].state`` the names
        and shapes of the state its transform makes for the binding's shape (see
        :func:`~compiledopt.export.layout.state_entries`). The schema checks their types; what
        they are is known only once the spec is built."""
        if self.kind != "bound":
            listed, names = self.manifest["state_names"], built[0].state_names()
            if listed != names:
                raise ArtifactError(
                    f"{self.path}: invalid state_names: {_brief(repr(listed), 200)} (the "
                    f"{self.spec['name']!r} transform keeps {len(names)} state tensors: {names})"
                )
            return
        for index, (binding, transform) in enumerate(zip(self.bindings, built)):
            param = torch.empty(binding["shape"], dtype=self.dtype, device="meta")
            state = state_entries(transform.state_names(), transform.init_state(param))
            if binding["state"] != state:
                raise ArtifactError(
                    f"{self.path}: invalid bindings[{index}].state: "
                    f"{_brief(repr(binding['state']), 200)} (the transform keeps "
                    f"{_brief(repr(state), 200)} for {_brief(repr(binding['name']), 100)} of shape "
                    f"{tuple(binding['shape'])})"
                )

    def _build(self, device: str = "cpu") -> List[Transform]:
        try:
            if self.kind == "bound":
                shapes = [b["shape"] for b in self.bindings]
                return specs.build_bound(self.spec, shapes, self.dtype, device)
            return [specs.build_shape_agnostic(self.spec).to(self.dtype)]
        except OverBudgetError as error:
            raise ArtifactError(
                f"{self.path}: weights do not fit the transform spec: {error}"
            ) from None
        except _BUILD_ERRORS as error:
            raise ArtifactError(
                f"{self.path}: the transform spec does not build ({type(error).__name__}: "
                f"{_brief(str(error))})"
            ) from error

    def runner(self, backend: str) -> Callable:
        """The loaded graph of ``backend``: a bound rule's or a per-tensor rule's signature
        (a shape-agnostic artifact of a per-rank backend, ONNX or AOTI, dispatches on the
        tensor's rank, loading each rank's graph when it is first called). Every graph is loaded
        from the bytes that were just read and checked against the manifest.

        Raises:
            ValueError: ``backend`` is not a registered backend.
            UntrustedCodeError: ``backend``'s graphs are code and the artifact is not trusted.
            ArtifactError: the artifact has no graph of ``backend``, or a file does not verify.
            BackendUnavailableError: the modules that load ``backend`` are not installed.
        """
        chosen = registry.get(backend)
        files = self.manifest["backends"].get(chosen.name)
        if not files:
            raise ArtifactError(f"{self.path}: no {backend} graph (it has {self.backends})")
        self.check_may_load(chosen.name)
        chosen.require(loading=True)
        self.check_runnable(backend)
        if self.kind == "bound" or not chosen.per_rank:
            return self._load(chosen, files[0])
        return _RankDispatch(self, {file_rank(f): f for f in files}, chosen)

    def _load(self, backend: Backend, name: str) -> Callable:
        """The graph ``name`` of ``backend``, loaded from freshly verified bytes, and refused
        unless it fits the manifest (:func:`~compiledopt.export.fit.misfit`)."""
        runner = self._load_graph(backend, name)
        rank = file_rank(name) if self.kind != "bound" and backend.per_rank else None
        problem = misfit(runner, self.manifest, rank)
        if problem is not None:
            raise ArtifactError(f"{self.path / name}: {problem}")
        return runner

    def _load_graph(self, backend: Backend, name: str) -> Callable:
        data = self.read(name)
        where = self.path / name
        try:
            backend.check_runnable(data)
        except ArtifactError:
            raise
        except ValueError as error:
            raise ArtifactError(f"{where}: {error}") from error
        try:
            return backend.load_bytes(data, str(where))
        except ArtifactError:
            raise
        except ValueError as error:  # a graph that does not load is a broken artifact
            message = str(error)
            raise ArtifactError(
                message if str(where) in message else f"{where}: {message}"
            ) from error
        except Exception as error:  # the loader's own error types (onnxruntime, torch.jit...)
            raise ArtifactError(
                f"{where}: the {backend.name} loader cannot load it ({type(error).__name__}: "
                f"{_brief(str(error))})"
            ) from error

    def check_runnable(self, backend: str) -> None:
        """Raise :class:`ArtifactError` if a graph of ``backend`` cannot run on this machine
        (an AOTInductor package compiled for an instruction set this CPU lacks), before any of
        them is loaded."""
        chosen = registry.get(backend)
        for name in self.manifest["backends"].get(chosen.name, []):
            try:
                chosen.check_runnable(self.read(name))
            except ValueError as error:
                if isinstance(error, ArtifactError):
                    raise
                raise ArtifactError(f"{self.path / name}: {error}") from error

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
    """Per-tensor runner over one graph per rank, each loaded (from freshly verified bytes) on
    first use."""

    def __init__(self, artifact: Artifact, files: Dict[int, str], backend: Backend) -> None:
        self.artifact, self.files, self.backend = artifact, files, backend
        self.loaded: Dict[int, Callable] = {}
        self.lock = threading.Lock()

    def __call__(self, grad: Tensor, param: Tensor, state: List[Tensor], step: Tensor):
        rank = grad.dim()
        if rank not in self.files:
            raise ArtifactError(
                f"{self.artifact.path} has no graph for rank-{rank} parameters "
                f"(ranks {sorted(self.files)})"
            )
        runner = self.loaded.get(rank)
        if runner is None:
            with self.lock:
                runner = self.loaded.get(rank)
                if runner is None:
                    runner = self.artifact._load(self.backend, self.files[rank])
                    self.loaded[rank] = runner
        return runner(grad, param, state, step)


def load_artifact(
    path: "str | os.PathLike",
    *,
    trust_code: bool = False,
    trusted_keys: Optional[Sequence["str | os.PathLike | bytes"]] = None,
) -> Artifact:
    """Open and verify the artifact at ``path``; :class:`ArtifactError` names any problem.

    The manifest is read once, its signature checked (with ``trusted_keys``), its schema
    checked, and every listed file hashed. Graphs are not loaded here: each is read again, and
    its bytes hashed, at the moment it is loaded (:meth:`Artifact.runner`).

    Args:
        path: the artifact's directory.
        trust_code: allow loading the artifact's graphs that are code (TorchScript programs,
            AOTInductor native libraries). Only for artifacts from a source you trust.
        trusted_keys: Ed25519 public keys (PEM files' paths, or PEM bytes): the artifact must
            carry a valid signature (``signature.json``) by one of them, checked before anything
            else is read; a valid signature trusts its code. Needs ``cryptography``.
    """
    check_flag(trust_code, "trust_code")
    path = artifact_path(path)
    keys = None
    if trusted_keys is not None:
        if isinstance(trusted_keys, (str, bytes, os.PathLike)):
            raise TypeError("trusted_keys must be a list of keys (paths or PEM bytes)")
        keys = [signatures.load_public_key(k) for k in trusted_keys]
        if not keys:
            raise ValueError("trusted_keys is empty: give at least one key, or None")
    if not path.is_dir():
        raise ArtifactError(f"artifact not found: {path} is not a directory")
    data = read_regular(path, MANIFEST, MAX_MANIFEST_BYTES)
    if data is None:
        raise ArtifactError(f"{path}: missing {MANIFEST}")
    signed_by = None
    if keys is not None:
        signature = read_regular(path, SIGNATURE, MAX_SIGNATURE_BYTES)
        signed_by = signatures.verify_manifest(data, signature, keys, str(path))
    manifest = check_manifest(parse_manifest(data, path), str(path))
    artifact = Artifact(path, manifest, trust_code or signed_by is not None, signed_by)
    for name in manifest["files"]:
        artifact.read(name)
    return artifact


def artifact_path(path: "str | os.PathLike") -> Path:
    """``path`` as a ``Path``, refusing an empty one (``Path("")`` is the working directory) and
    one the operating system cannot look up for another reason than that it does not exist (a
    name too long for the file system, a folder on the way that cannot be searched): what does
    not exist is left to the caller, which says what it looked for."""
    if isinstance(path, str) and not path:
        raise ArtifactError(f"artifact not found: the path is empty ({path!r})")
    given = Path(path)
    try:
        os.stat(given)
    except (FileNotFoundError, NotADirectoryError, ValueError):  # ValueError: a NUL in it
        pass
    except OSError as error:
        raise ArtifactError(
            f"artifact not found: {given} cannot be looked up ({error.strerror})"
        ) from error
    return given


def _brief(text: str, limit: int = 300) -> str:
    """``text`` cut to ``limit`` characters (an argument's repr can be megabytes)."""
    return text if len(text) <= limit else text[: limit - 3] + "..."
