"""The schema of an artifact's ``manifest.json``, checked field by field.

:func:`check_manifest` is the one place that decides whether a parsed manifest is well formed:
every field's type and range, before anything the manifest describes is opened, built or
allocated. Every problem is an :class:`ArtifactError` naming the field.
"""

import inspect
import json
import math
import typing
from typing import Any, Dict, List, Mapping, Sequence

from compiledopt._validation import is_int64, is_real
from compiledopt.export import backend as registry
from compiledopt.export import spec as specs
from compiledopt.export.hints import hint_problem
from compiledopt.learned.catalog import BOUND, CATALOG, kinds, spec_fields
from compiledopt.roles import ROLES

__all__ = [
    "ARTIFACT_KINDS",
    "DTYPE_NAMES",
    "FORMAT",
    "FORMAT_VERSION",
    "MAX_RANK",
    "WEIGHTS",
    "ArtifactError",
    "check_manifest",
    "check_training",
]

FORMAT = "compiledopt-artifact"
FORMAT_VERSION = 1
WEIGHTS = "weights.safetensors"
#: The artifact kinds (the manifest's ``kind``; a transform spec's kinds are
#: :func:`compiledopt.learned.catalog.kinds`).
ARTIFACT_KINDS = ("bound", "shape_agnostic")
#: The dtypes an artifact may hold (the manifest's ``dtype`` and each binding's ``dtype``).
DTYPE_NAMES = ("float32", "float64")
#: The highest parameter rank a shape-agnostic artifact lists in ``ranks``.
MAX_RANK = 5

_COMMON = ("format", "format_version", "kind", "transform", "dtype", "lr", "backends", "files")
_REQUIRED = {
    "bound": (*_COMMON, "bindings", "producer"),
    "shape_agnostic": (*_COMMON, "ranks", "state_names", "producer"),
}
_OPTIONAL = ("training", "routes")
_HEX = frozenset("0123456789abcdef")
_SHOWN = 60  # characters of a bad value quoted in a message


class ArtifactError(ValueError):
    """An artifact is missing, corrupted, of an unknown format, or does not fit the parameters."""


def check_manifest(manifest: Any, where: str) -> Dict[str, Any]:
    """``manifest`` (parsed JSON) checked against the schema and returned (the same dict).

    Only types and ranges are checked: nothing is built, opened or allocated, so a manifest
    alone cannot make this take long or use much memory (the sizes its shapes and ``kwargs``
    imply are checked against the weights by the loader).

    The schema (format version 1); every field is required unless marked optional, and a field
    not listed is an error:

    * ``format``: ``"compiledopt-artifact"``; ``format_version``: the int ``1`` (not ``true``).
    * ``kind``: ``"bound"`` or ``"shape_agnostic"``.
    * ``transform``: a spec that :func:`compiledopt.export.spec.check_spec` accepts, with only
      the fields of its kind (:func:`compiledopt.learned.catalog.spec_fields`); ``kind``
      ``"shape_agnostic"`` in a shape-agnostic artifact. Each field of a bound kind is of the
      type its catalog entry states (Kronecker ``bias`` and ``psd`` bools, metacurvature ``lr`` a
      finite number, ``step_size`` a finite number > 0), and every ``kwargs`` key a parameter of
      the catalog transform ``name``, its value of that parameter's annotated type (``int``: a
      64-bit int, ``float``: a finite number, ``bool``, ``str``, a sequence: a list of those,
      ``Optional``: also ``null``).
    * ``dtype``: ``"float32"`` or ``"float64"``.
    * ``lr``: a finite number > 0 (an int or a float, not a bool).
    * bound only: ``bindings``, a non-empty list of ``{"name": str, "shape": [int >= 0, ...],
      "dtype": the manifest's dtype, "state": [{"name": str, "shape": [int >= 0, ...]}, ...]}``
      with distinct names (each size below 2**63).
    * shape-agnostic only: ``ranks``, a non-empty increasing list of ints in 0..5, and
      ``state_names``, a list of distinct non-empty strings.
    * ``backends``: registered backend name -> a list of its graph files, each once: exactly
      ``["rule<ext>"]``, except for a backend that writes one graph per rank (``per_rank``) in a
      shape-agnostic artifact, which lists ``rule_rank<r><ext>`` for every ``r`` in ``ranks``.
    * ``files``: file name -> SHA-256 (64 lowercase hex digits), for exactly
      ``weights.safetensors`` and every file in ``backends``.
    * ``producer``: a JSON object of strings (the versions that wrote the artifact).
    * ``training`` (optional): a JSON object (see :func:`check_training`).
    * ``routes`` (optional, shape-agnostic only): a JSON object mapping parameter roles
      (``matrix``, ``vector``, ``embedding``, ``head``, ``input``) to rule names of the transform
      (strings; the runtime checks them against the transform's rules). A role left out, or no
      ``routes`` at all, runs the transform as its ``kwargs`` configure it (``"artifact"``).

    Raises:
        ArtifactError: ``f"{where}: ..."`` naming the field's path (``bindings[2].shape[1]``,
            ``files['rule.pt']``) and quoting the bad value; never another exception, whatever
            JSON value ``manifest`` is.
    """
    if not isinstance(manifest, dict):
        raise ArtifactError(
            f"{where}: not a compiledopt artifact (the manifest is {_show(manifest)}, "
            "not a JSON object)"
        )
    found = manifest.get("format")
    if not (isinstance(found, str) and found == FORMAT):
        raise ArtifactError(f"{where}: not a compiledopt artifact (format {_show(found)})")
    version = _field(manifest, "format_version", where)
    if isinstance(version, bool) or not isinstance(version, int) or version != FORMAT_VERSION:
        raise ArtifactError(
            f"{where}: unknown format version {_show(version)} in format_version "
            f"(this compiledopt reads {FORMAT_VERSION})"
        )
    kind = _field(manifest, "kind", where)
    if not (isinstance(kind, str) and kind in ARTIFACT_KINDS):
        _fail(where, "kind", kind, " or ".join(map(repr, ARTIFACT_KINDS)))
    _check_fields(manifest, kind, where)
    _check_transform(manifest["transform"], kind, where)
    dtype = manifest["dtype"]
    if not (isinstance(dtype, str) and dtype in DTYPE_NAMES):
        _fail(where, "dtype", dtype, " or ".join(map(repr, DTYPE_NAMES)))
    if not is_real(manifest["lr"]) or manifest["lr"] <= 0:
        _fail(where, "lr", manifest["lr"], "a finite number > 0")
    ranks: List[int] = []
    if kind == "bound":
        _check_bindings(manifest["bindings"], dtype, where)
    else:
        ranks = _check_ranks(manifest["ranks"], where)
        _check_names(manifest["state_names"], "state_names", where)
    graphs = _check_backends(manifest["backends"], kind, ranks, where)
    _check_files(manifest["files"], [WEIGHTS, *graphs], where)
    _check_producer(manifest["producer"], where)
    if "routes" in manifest:
        _check_routes(manifest["routes"], kind, where)
    if "training" in manifest:
        try:
            check_training(manifest["training"])
        except ValueError as error:
            raise ArtifactError(f"{where}: {error}") from None
    return manifest


def check_training(training: Any) -> Dict[str, Any]:
    """``training`` as a manifest's ``training`` block: a dict of JSON values (str keys; finite
    numbers: no NaN or infinity, and no int too large for a float), copied; ``ValueError``
    naming the field otherwise."""
    if not isinstance(training, Mapping):
        raise ValueError(f"'training' must be a JSON object, got {type(training).__name__}")
    try:
        return json.loads(json.dumps(dict(training), allow_nan=False), parse_int=_finite_int)
    except (TypeError, ValueError) as error:
        bad = _not_json(dict(training), "training")
        raise ValueError(f"'training' must hold only JSON values: {bad or error}") from None
    except RecursionError:
        raise ValueError("'training' must hold only JSON values: it nests too deeply") from None


def _finite_int(text: str) -> int:
    """A JSON int, refused (``ValueError``) if too large for a float (``is_real``)."""
    value = int(text)
    if not is_real(value):
        raise ValueError(f"an int of {value.bit_length()} bits is not a finite number")
    return value


def _not_json(value: Any, where: str, depth: int = 0) -> str:
    """Where in ``value`` the first value JSON cannot hold is, and what it is (``training['a']
    [1] is nan, not a finite number``); ``""`` if none is found within a depth of 64."""
    if depth > 64:
        return ""
    if isinstance(value, float) and not math.isfinite(value):
        return f"{where} is {value}, not a finite number"
    if isinstance(value, int) and not isinstance(value, bool) and not is_real(value):
        return f"{where} is an int of {value.bit_length()} bits, not a finite number"
    if isinstance(value, (list, tuple)):
        items: Any = enumerate(value)
    elif isinstance(value, dict):
        items = value.items()
        for key in value:
            if not isinstance(key, str):
                return f"{where} has the key {_show(key)}, not a string"
    elif value is None or isinstance(value, (str, int, float)):
        return ""
    else:
        return f"{where} is a {type(value).__name__}, not a JSON value"
    for key, item in items:
        found = _not_json(item, f"{where}[{key!r}]", depth + 1)
        if found:
            return found
    return ""


# -- messages ---------------------------------------------------------------------------------


def _show(value: Any) -> str:
    """A short repr of a JSON value: never long, never deep, and safe for any int."""
    text = _brief(value, 2)
    return text if len(text) <= _SHOWN else text[: _SHOWN - 3] + "..."


def _brief(value: Any, depth: int) -> str:
    if isinstance(value, str):
        return repr(value[:_SHOWN]) + ("..." if len(value) > _SHOWN else "")
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 200:
        return f"<an int of {value.bit_length()} bits>"
    if value is None or isinstance(value, (bool, int, float)):
        return repr(value)
    if isinstance(value, (list, dict)):
        if not value:
            return "[]" if isinstance(value, list) else "{}"
        if depth == 0:
            return "[...]" if isinstance(value, list) else "{...}"
        more = ", ..." if len(value) > 4 else ""
        if isinstance(value, list):
            return "[" + ", ".join(_brief(v, depth - 1) for v in value[:4]) + more + "]"
        pairs = list(value.items())[:4]
        shown = (f"{_brief(k, 0)}: {_brief(v, depth - 1)}" for k, v in pairs)
        return "{" + ", ".join(shown) + more + "}"
    return f"<{type(value).__name__}>"


def _fail(where: str, path: str, value: Any, expected: str) -> typing.NoReturn:
    raise ArtifactError(f"{where}: invalid {path}: {_show(value)} (expected {expected})")


def _key(container: str, key: Any) -> str:
    """The path of ``container[key]`` for a free-form key (``files['rule.pt']``)."""
    return f"{container}[{_show(key)}]"


# -- checks -------------------------------------------------------------------------------------


def _is_int(value: Any, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _field(container: Dict[str, Any], name: str, where: str, path: str = "the manifest") -> Any:
    if name not in container:
        raise ArtifactError(f"{where}: {path} lacks {name!r}")
    return container[name]


def _check_fields(manifest: Dict[str, Any], kind: str, where: str) -> None:
    allowed = _REQUIRED[kind] + _OPTIONAL
    other = _REQUIRED["shape_agnostic" if kind == "bound" else "bound"]
    for key in manifest:
        if key not in allowed:
            if key in other:
                raise ArtifactError(f"{where}: {key!r} is not a field of a {kind} artifact")
            raise ArtifactError(f"{where}: unknown field {_show(key)} in the manifest")
    for key in _REQUIRED[kind]:
        _field(manifest, key, where)


def _check_object(value: Any, path: str, fields: Sequence[str], where: str) -> Dict[str, Any]:
    """``value`` as a JSON object with exactly ``fields``."""
    if not isinstance(value, dict):
        _fail(where, path, value, f"a JSON object with {', '.join(fields)}")
    for key in value:
        if key not in fields:
            raise ArtifactError(f"{where}: unknown field {_show(key)} in {path}")
    for key in fields:
        _field(value, key, where, path)
    return value


def _check_transform(spec: Any, kind: str, where: str) -> None:
    if not isinstance(spec, dict):
        _fail(where, "transform", spec, "a JSON object (a transform spec)")
    spec_kind = _field(spec, "kind", where, "transform")
    if not (isinstance(spec_kind, str) and spec_kind in kinds()):
        raise ArtifactError(
            f"{where}: unknown transform spec kind {_show(spec_kind)} in transform.kind "
            f"(one of {kinds()})"
        )
    if kind == "shape_agnostic" and spec_kind != "shape_agnostic":
        _fail(where, "transform.kind", spec_kind, "'shape_agnostic' in a shape_agnostic artifact")
    allowed = spec_fields(spec_kind)
    for key in spec:
        if key not in allowed:
            raise ArtifactError(
                f"{where}: unknown field {_show(key)} in transform (a {spec_kind} spec has "
                f"{', '.join(allowed)})"
            )
    if "name" in spec and not isinstance(spec["name"], str):
        _fail(where, "transform.name", spec["name"], "a string")
    if not isinstance(spec.get("kwargs", {}), dict):
        _fail(where, "transform.kwargs", spec["kwargs"], "a JSON object")
    for field in BOUND[spec_kind].fields if spec_kind in BOUND else ():
        if field.name not in spec:
            continue
        value = spec[field.name]
        if field.choices is not None and not isinstance(value, str):
            _fail(where, f"transform.{field.name}", value, "a string")
        if field.choices is None and not field.check(value):
            _fail(where, f"transform.{field.name}", value, field.expected)
    try:
        specs.check_spec(spec)
    except (TypeError, ValueError) as error:
        raise ArtifactError(f"{where}: invalid transform: {error}") from None
    if spec_kind == "shape_agnostic":
        _check_kwargs(spec["name"], spec.get("kwargs", {}), where)


def _check_routes(routes: Any, kind: str, where: str) -> None:
    if kind != "shape_agnostic":
        _fail(where, "routes", routes, "absent (a bound artifact has one rule per binding)")
    if not isinstance(routes, dict):
        _fail(where, "routes", routes, "a JSON object of roles to rule names")
    for role, rule in routes.items():
        if role not in ROLES:
            _fail(where, _key("routes", role), role, "a role: " + ", ".join(ROLES))
        if not isinstance(rule, str) or not rule.isidentifier():
            _fail(where, _key("routes", role), rule, "a rule name")


def _check_kwargs(name: str, kwargs: Dict[str, Any], where: str) -> None:
    """Every key of ``kwargs`` a keyword parameter of the catalog transform ``name``, every value
    of that parameter's annotated type; unannotated parameters take any value."""
    build = CATALOG[name].build
    try:
        parameters = inspect.signature(build).parameters
    except (TypeError, ValueError):  # no signature to check against: the constructor checks
        return
    try:
        hints = typing.get_type_hints(build.__init__ if isinstance(build, type) else build)  # type: ignore[misc]  # a class's own constructor
    except Exception:  # annotations that do not resolve leave the values to the constructor
        hints = {}
    keyword = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    named = {p.name: p for p in parameters.values() if p.kind in keyword}
    open_ended = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    for key, value in kwargs.items():
        path = _key("transform.kwargs", key)
        if key not in named:
            if open_ended and isinstance(key, str):
                continue
            raise ArtifactError(
                f"{where}: invalid {path}: not a parameter of {name!r} (one of {', '.join(named)})"
            )
        problem = hint_problem(value, hints.get(key, Any), path, _key)
        if problem is not None:
            _fail(where, *problem)
    for parameter in named.values():
        if parameter.default is inspect.Parameter.empty and parameter.name not in kwargs:
            raise ArtifactError(f"{where}: transform.kwargs lacks {parameter.name!r}")


def _check_shape(shape: Any, path: str, where: str) -> None:
    """A list of sizes torch takes: ints from 0 to 2**63 - 1 (JSON's ints have any size)."""
    if not isinstance(shape, list):
        _fail(where, path, shape, "a list of ints >= 0")
    for index, size in enumerate(shape):
        if not _is_int(size, 0) or not is_int64(size):
            _fail(where, f"{path}[{index}]", size, "an int from 0 to 2**63 - 1")


def _check_bindings(bindings: Any, dtype: str, where: str) -> None:
    if not isinstance(bindings, list) or not bindings:
        _fail(where, "bindings", bindings, "a non-empty list of parameter bindings")
    seen = set()
    for index, binding in enumerate(bindings):
        path = f"bindings[{index}]"
        _check_object(binding, path, ("name", "shape", "dtype", "state"), where)
        name = binding["name"]
        if not isinstance(name, str):
            _fail(where, f"{path}.name", name, "a string")
        if name in seen:
            _fail(where, f"{path}.name", name, "a name no other binding has")
        seen.add(name)
        _check_shape(binding["shape"], f"{path}.shape", where)
        if not (isinstance(binding["dtype"], str) and binding["dtype"] == dtype):
            _fail(where, f"{path}.dtype", binding["dtype"], f"the manifest's dtype {dtype!r}")
        state = binding["state"]
        if not isinstance(state, list):
            _fail(where, f"{path}.state", state, "a list of {name, shape} objects")
        for position, entry in enumerate(state):
            entry_path = f"{path}.state[{position}]"
            _check_object(entry, entry_path, ("name", "shape"), where)
            if not isinstance(entry["name"], str):
                _fail(where, f"{entry_path}.name", entry["name"], "a string")
            _check_shape(entry["shape"], f"{entry_path}.shape", where)


def _check_ranks(ranks: Any, where: str) -> List[int]:
    if not isinstance(ranks, list) or not ranks:
        _fail(where, "ranks", ranks, f"a non-empty list of ints in 0..{MAX_RANK}")
    for index, rank in enumerate(ranks):
        if not _is_int(rank, 0) or rank > MAX_RANK:
            _fail(where, f"ranks[{index}]", rank, f"an int in 0..{MAX_RANK}")
        if index and rank <= ranks[index - 1]:
            _fail(where, f"ranks[{index}]", rank, "ranks in increasing order, each once")
    return ranks


def _check_names(names: Any, path: str, where: str) -> None:
    if not isinstance(names, list):
        _fail(where, path, names, "a list of strings")
    seen = set()
    for index, name in enumerate(names):
        if not isinstance(name, str) or not name or name in seen:
            _fail(where, f"{path}[{index}]", name, "a non-empty string, each once")
        seen.add(name)


def _check_backends(backends: Any, kind: str, ranks: List[int], where: str) -> List[str]:
    """The graph files listed in ``backends``, checked."""
    if not isinstance(backends, dict):
        _fail(where, "backends", backends, "a JSON object: backend name -> its files")
    listed: List[str] = []
    for name, files in backends.items():
        path = _key("backends", name)
        if not (isinstance(name, str) and name in registry.names()):
            raise ArtifactError(
                f"{where}: unknown backend {_show(name)} in backends "
                f"(registered: {', '.join(registry.names())})"
            )
        backend = registry.get(name)
        if kind == "shape_agnostic" and backend.per_rank:
            expected = [f"rule_rank{rank}{backend.extension}" for rank in ranks]
        else:
            expected = [f"rule{backend.extension}"]
        if not isinstance(files, list) or not files:
            _fail(where, path, files, f"a list of {', '.join(expected)}")
        for index, file in enumerate(files):
            if not (isinstance(file, str) and file in expected) or file in files[:index]:
                _fail(where, f"{path}[{index}]", file, f"each of {', '.join(expected)} once")
        missing = [file for file in expected if file not in files]
        if missing:
            raise ArtifactError(
                f"{where}: {path} lacks {', '.join(missing)} (one graph per rank in ranks)"
            )
        listed.extend(files)
    return listed


def _check_files(files: Any, needed: List[str], where: str) -> None:
    if not isinstance(files, dict):
        _fail(where, "files", files, "a JSON object: file name -> sha256")
    for name, digest in files.items():
        path = _key("files", name)
        if not isinstance(name, str) or name not in needed:
            raise ArtifactError(
                f"{where}: invalid {path}: not a file of this artifact (its files are "
                f"{', '.join(needed)})"
            )
        if not (isinstance(digest, str) and len(digest) == 64 and set(digest) <= _HEX):
            _fail(where, path, digest, "a sha256: 64 lowercase hex digits")
    for name in needed:
        if name not in files:
            raise ArtifactError(f"{where}: files lacks the checksum of {name!r}")


def _check_producer(producer: Any, where: str) -> None:
    if not isinstance(producer, dict):
        _fail(where, "producer", producer, "a JSON object of version strings")
    for name, version in producer.items():
        if not isinstance(version, str):
            _fail(where, _key("producer", name), version, "a string")
