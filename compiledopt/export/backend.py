"""Export backends: what writes a frozen rule to a file, and what runs that file again.

A backend is a :class:`Backend`: a name (the key of ``manifest.json``'s ``backends``), the
extension of its files, how it covers parameter ranks, what it needs installed, and ``save`` /
``load``. The registry holds one instance per backend, in registration order; artifacts, the
runtime, the benchmark and the command line look backends up by name with :func:`get` and list
them with :func:`names` when they are called, never from a copy taken at import, so a backend
registered at any time is known everywhere from then on (``compiledopt.export.BACKENDS`` reads
:func:`names` too).

Adding a backend takes one module and one line: the module defines a :class:`Backend` subclass
and an instance of it named ``BACKEND``; the line registers it, beside the others at the top of
:mod:`compiledopt.export`::

    register(import_module("compiledopt.export.mybackend").BACKEND)

or, for a backend defined outside the package, ``compiledopt.export.register(MyBackend())``
once it is imported (:func:`unregister` takes it out again).

A backend module imports its heavy dependencies (``onnx``, ``onnxruntime`` …) inside ``save``
and ``load`` only, so that ``import compiledopt.export`` and the other backends work without
them; :meth:`Backend.available` tells whether they are installed without importing them.
"""

import importlib.util
import os
import re
import tempfile
from abc import ABC, abstractmethod
from typing import Any, Dict, List, Optional, Tuple

from torch import nn

from compiledopt.export.signature import Runner

__all__ = ["Backend", "BackendUnavailableError", "get", "names", "register", "unregister"]

# The runtime's own backends (``FrozenOptimizer(backend=...)``), which an export backend must
# not shadow.
_RESERVED = ("auto", "eager", "compiled")

_REGISTRY: Dict[str, "Backend"] = {}


class BackendUnavailableError(ImportError):
    """A backend's required modules are not installed; the message says what to install."""


class Backend(ABC):
    """One export format: writes frozen rules to files and loads them back as runners.

    Subclasses set the class attributes below and implement :meth:`save` and :meth:`load`.

    Attributes:
        name: the backend's name, lower case (``"onnx"``): the key under which artifacts list
            its files and the name callers choose it by.
        extension: the extension of its files, with the dot (``".onnx"``).
        per_rank: ``True`` if a shape-agnostic rule is written as one graph per parameter rank
            with every size dynamic (``rule_rank{r}.onnx``), as ONNX and AOTInductor do;
            ``False`` if one graph serves every rank (``rule.pt``), as TorchScript does.
        carries_code: ``True`` if the file is executable code (a TorchScript program, an
            AOTInductor shared library), ``False`` if it is data that a separate runtime
            interprets (ONNX run by onnxruntime). Load only code from sources you trust.
        fused: ``True`` if Inductor compiles the graph, so the rule is frozen with
            ``freeze_transform(fused=True)`` (formulations that only pay off under Inductor).
        requires: the top-level modules the backend needs beyond torch, to export and to run
            (``("onnx", "onnxruntime", "onnxscript", "onnx_ir")``); checked before an export.
        load_requires: the modules that :meth:`load` needs, when fewer than ``requires``
            (``None``: the same as ``requires``); checked before a graph is loaded.
        install: what to ``pip install`` when a required module is missing (``""``: the missing
            modules' names).
    """

    name: str
    extension: str
    per_rank: bool
    carries_code: bool
    fused: bool = False
    requires: Tuple[str, ...] = ()
    load_requires: Optional[Tuple[str, ...]] = None
    install: str = ""

    def missing(self, loading: bool = False) -> List[str]:
        """The required modules that cannot be found (``loading``: those :meth:`load` needs).

        Uses :func:`importlib.util.find_spec`, which locates a module without importing it.
        """
        wanted = self.requires
        if loading and self.load_requires is not None:
            wanted = self.load_requires
        return [module for module in wanted if not _findable(module)]

    def available(self) -> bool:
        """Whether every module :meth:`save` and :meth:`load` need is installed (nothing is
        imported to find out)."""
        return not self.missing()

    def require(self, loading: bool = False) -> None:
        """Raise :class:`BackendUnavailableError` naming what to install unless the modules
        needed to save (or, with ``loading``, to load) are installed."""
        missing = self.missing(loading)
        if missing:
            what = "load" if loading else "export"
            install = self.install or " ".join(missing)
            raise BackendUnavailableError(
                f"the {self.name} backend cannot {what}: {', '.join(missing)} "
                f"{'is' if len(missing) == 1 else 'are'} not installed (pip install {install})"
            )

    def check_runnable(self, source: "str | bytes") -> None:
        """Raise ``ValueError`` saying why the graph (a file's path, or its bytes) cannot run on
        this machine, before anything in it is loaded (native code built for an instruction set
        this CPU lacks would kill the process). The default accepts every graph: graphs that are
        data run wherever their runtime does."""
        return None

    def load_bytes(self, data: bytes, where: str) -> Runner:
        """A runner for the graph whose file content is ``data`` (``where`` names it in
        messages): what an artifact calls, so that the bytes it hashed are the bytes that run.

        The default writes ``data`` to a new private temporary folder, calls :meth:`load` on that
        file and removes the folder; backends whose loader reads bytes override it.
        """
        with tempfile.TemporaryDirectory(prefix="compiledopt-load-") as folder:
            path = os.path.join(folder, "rule" + self.extension)
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(descriptor, "wb") as handle:
                handle.write(data)
            return self.load(path)

    @abstractmethod
    def save(self, rule: nn.Module, example: tuple, path: str, dynamic: bool) -> None:
        """Write ``rule`` to the file ``path``.

        Args:
            rule: a frozen ``ModelRule`` (``example = (grads, params, states, step)``) or
                ``TensorRule`` (``example = (grad, param, state, step)``).
            example: example inputs; their dtypes (and, unless ``dynamic``, their shapes) may be
                baked into the graph.
            path: the file to write, ending in :attr:`extension`; its folder exists.
            dynamic: every size of the gradients, parameters and states dynamic (``step`` stays
                a 0-d tensor); ``False`` may fix every shape to the example's.
        """

    @abstractmethod
    def load(self, path: str) -> Runner:
        """A runner for the file at ``path``, with the saved rule's call signature.

        Returns:
            ``runner(grads, params, states, step) -> (directions, new_states)`` for a
            ``ModelRule`` and ``runner(grad, param, state, step) -> (direction, new_state)``
            for a ``TensorRule``; CPU tensors in and out.
        """

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {getattr(self, 'name', '?')!r}>"


def register(backend: Backend) -> Backend:
    """Add ``backend`` to the registry and return it.

    Raises:
        TypeError: ``backend`` is not a :class:`Backend`, or lacks one of its attributes or
            methods, or has one of the wrong type.
        ValueError: its name is taken (or reserved by the runtime, or malformed) or another
            backend writes files with its extension.
    """
    if not isinstance(backend, Backend):
        raise TypeError(f"register takes a Backend instance, got {type(backend).__name__}")
    _check_members(backend)
    name = backend.name
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        raise ValueError(f"Invalid backend name: {name!r} (lower-case letters, digits and _)")
    if name in _RESERVED:
        raise ValueError(f"Invalid backend name: {name!r} (the runtime reserves {_RESERVED})")
    if name in _REGISTRY:
        raise ValueError(f"a backend named {name!r} is already registered")
    if not re.fullmatch(r"\.[A-Za-z0-9]+", backend.extension):
        raise ValueError(f"Invalid extension of backend {name!r}: {backend.extension!r}")
    for other in _REGISTRY.values():
        if other.extension == backend.extension:
            raise ValueError(
                f"backend {name!r} writes {backend.extension} files, as {other.name!r} does"
            )
    _REGISTRY[name] = backend
    return backend


def unregister(name: str) -> Backend:
    """Take the backend called ``name`` out of the registry and return it (``ValueError`` for
    an unknown name). Artifacts that list its graphs load again only once it is registered."""
    backend = get(name)
    del _REGISTRY[name]
    return backend


def get(name: str) -> Backend:
    """The registered backend called ``name``; ``ValueError`` naming it and the known ones."""
    backend = _REGISTRY.get(name) if isinstance(name, str) else None
    if backend is None:
        raise ValueError(f"Unknown backend: {name!r} (choose from {names()})")
    return backend


def names() -> Tuple[str, ...]:
    """The registered backends' names, in registration order."""
    return tuple(_REGISTRY)


def _check_members(backend: Backend) -> None:
    kinds: Dict[str, Any] = {
        "name": str,
        "extension": str,
        "per_rank": bool,
        "carries_code": bool,
        "fused": bool,
        "requires": tuple,
        "install": str,
    }
    label = getattr(backend, "name", type(backend).__name__)
    for attribute, kind in kinds.items():
        value = getattr(backend, attribute, None)
        if not isinstance(value, kind):
            raise TypeError(
                f"backend {label!r} needs {attribute!r} of type {kind.__name__}, got {value!r}"
            )
    for attribute in ("requires", "load_requires"):
        value = getattr(backend, attribute, None)
        if value is not None and not (
            isinstance(value, tuple) and all(isinstance(m, str) and m for m in value)
        ):
            raise TypeError(f"backend {label!r}: {attribute} must be a tuple of module names")
    for method in ("available", "save", "load"):
        if not callable(getattr(backend, method, None)):
            raise TypeError(f"backend {label!r} needs the method {method}()")


def _findable(module: str) -> bool:
    """Whether ``module`` can be imported, found without importing it (nor, for a top-level
    name, anything else). A module set to ``None`` in ``sys.modules`` counts as absent."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False
