"""Compiled rules kept on this machine as AOTInductor packages, so a later process loads in
milliseconds what the first one compiled.

``torch.compile`` keeps its work in Inductor's caches, but a new process still traces the rule
with Dynamo before it finds them: about 10 s for the packaged rule's graphs on two cores, at every
start. A :class:`PackagedCompile` instead builds each graph once as an AOTInductor package with
dynamic sizes (traced with ``make_fx``, which runs ``vmap``'s batching rules, then
``torch.export`` and :func:`torch._inductor.aoti_compile_and_package`, about as long as the
``torch.compile`` it replaces) and stores it in ``$COMPILEDOPT_CACHE/packages``; every later call
of that graph, in this process or another, runs the package's native code directly, without
Dynamo's guards.

**One package serves many sizes.** The trace records the conditions on sizes the rule's Python
branched on (a matrix taller than wide, long enough to end on its Gram matrix, no side of 1);
each is a linear relation between the inputs' sizes (:class:`Guard`) and is stored with the
package. A call runs the first package of its form whose guards its sizes satisfy, and builds a
new one otherwise. A rule whose trace depends on sizes in any other way is not packaged: it is
compiled by ``torch.compile`` as before, as is anything that fails to build.

**Keys.** A form is identified (:func:`form_key`) by the rule (its classes, its printed
configuration, every option attribute and the bytes of every weight and buffer: weights are
constants of the package), the inputs' structure, dtypes and ranks, the Inductor options, the
torch, Python and compiledopt versions and the digest of compiledopt's own code (an edited
checkout keeps its version number), the CPU's vector instruction set and the thread count
(Inductor writes it into its loops): a changed rule, code, torch or machine never reuses a
package.

**Trust.** A package is native code, like the libraries ``torch.compile`` leaves in Inductor's
cache: the store is this user's own cache folder, written only by this module. Each package is
stored with the SHA-256 of its bytes, and is loaded from the bytes that were hashed: a truncated,
corrupted or swapped file is ignored with one log line and removed (then built again), never
loaded. The records are only ever parsed as JSON of a fixed shape; nothing in them is
evaluated.

``COMPILEDOPT_PACKAGES=0`` turns the store off (``torch.compile`` throughout); ``=read`` loads
stored packages without building new ones. Only CPU tensors are packaged.
"""

import hashlib
import json
import logging
import os
import platform
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.fx.experimental._config as fx_config
from torch import Tensor, nn
from torch.utils._pytree import TreeSpec, tree_flatten

from compiledopt.cache import cache_root
from compiledopt.export.rule import inductor_configs
from compiledopt.export.tracing import quiet
from compiledopt.runtime.package_store import (
    FORMAT,
    Entry,
    Guard,
    discard,
    load_entry,
    read_entries,
    rebuild,
    write_json,
)
from compiledopt.runtime.timings import option_attributes
from compiledopt.version import VERSION, source_digest

__all__ = [
    "MODES",
    "VARIABLE",
    "PackagedCompile",
    "build",
    "forget",
    "form_key",
    "found_more",
    "mode",
    "signature",
    "store",
]

logger = logging.getLogger("compiledopt")

#: The environment variable that sets :func:`mode`.
VARIABLE = "COMPILEDOPT_PACKAGES"
#: Its values: build and load packages, only load stored ones, or neither.
MODES = ("build", "read", "off")


def mode() -> str:
    """``"build"`` (the default), ``"read"`` or ``"off"``, from ``$COMPILEDOPT_PACKAGES``
    (``0``/``off``, ``read``; anything else, or unset, builds). Read at each call."""
    value = os.environ.get(VARIABLE, "").strip().lower()
    if value in ("0", "off", "false", "no"):
        return "off"
    return "read" if value == "read" else "build"


def store() -> Path:
    """The folder of packages (not created here)."""
    return cache_root() / "packages"


class _UnpackableError(Exception):
    """The rule's trace depends on sizes in a way a :class:`Guard` cannot state."""


def _guards(gm: torch.fx.GraphModule) -> List[Guard]:
    """What the package traced as ``gm`` assumes of its input sizes, each a :class:`Guard`: every
    size the trace fixed, every size it found equal to another (or to an expression of others),
    and every condition it recorded while the rule's Python branched on sizes.
    :class:`_UnpackableError` if one is not a linear relation between input sizes."""
    import sympy  # type: ignore[import-untyped]

    sizes = [
        (leaf, dim, size)
        for leaf, node in enumerate(n for n in gm.graph.nodes if n.op == "placeholder")
        if isinstance(node.meta.get("val"), Tensor)
        for dim, size in enumerate(node.meta["val"].shape)
    ]
    env: Any = next((s.node.shape_env for _, _, s in sizes if isinstance(s, torch.SymInt)), None)
    where: Dict[Any, Tuple[int, int]] = {}  # a symbol: the first input size it stands for
    equal: List[Tuple[int, int, Any]] = []  # input sizes that equal an expression of others
    for leaf, dim, size in sizes:
        expr = sympy.Integer(size) if isinstance(size, int) else env.replace(size.node.expr)
        if isinstance(expr, sympy.Symbol) and expr not in where:
            where[expr] = (leaf, dim)
        else:
            equal.append((leaf, dim, expr))
    guards = []
    for leaf, dim, expr in equal:
        terms, constant = _linear(-expr, where, expr)
        guards.append(Guard(_merge([(leaf, dim, 1), *terms]), constant, "=="))
    conditions = [] if env is None else [g.expr for g in env.guards]
    if env is not None:
        conditions += [a.expr for run in env.deferred_runtime_asserts.values() for a in run]
    relations = {
        sympy.Eq: "==",
        sympy.Ne: "!=",
        sympy.Le: "<=",
        sympy.Lt: "<",
        sympy.Ge: "<=",
        sympy.Gt: "<",
    }
    for condition in conditions:
        condition = env.replace(condition)
        if condition is sympy.true:
            continue
        relation = relations.get(type(condition))
        if relation is None:
            raise _UnpackableError(f"a condition on sizes that is not a relation: {condition}")
        lhs, rhs = condition.args
        if isinstance(condition, (sympy.Ge, sympy.Gt)):
            lhs, rhs = rhs, lhs
        terms, constant = _linear(lhs - rhs, where, condition)
        guards.append(Guard(_merge(terms), constant, relation))
    return sorted(set(guards))


def _linear(expr: Any, where: Dict[Any, Tuple[int, int]], what: Any) -> Tuple[list, int]:
    """``expr`` as ``(terms, constant)`` over the input sizes ``where`` names."""
    import sympy

    terms, constant = [], 0
    for symbol, coefficient in sympy.expand(expr).as_coefficients_dict().items():
        if not coefficient.is_integer:
            raise _UnpackableError(f"a condition on sizes that is not linear: {what}")
        if symbol == 1:
            constant = int(coefficient)
        elif symbol in where:
            terms.append((*where[symbol], int(coefficient)))
        else:
            raise _UnpackableError(f"a condition on sizes that is not linear: {what}")
    return terms, constant


def _merge(terms: List[Tuple[int, int, int]]) -> Tuple[Tuple[int, int, int], ...]:
    """Terms of one size added up, zeros dropped, sorted."""
    total: Dict[Tuple[int, int], int] = {}
    for leaf, dim, coefficient in terms:
        total[leaf, dim] = total.get((leaf, dim), 0) + coefficient
    return tuple(sorted((*k, c) for k, c in total.items() if c))


def _structure(spec: TreeSpec) -> Any:
    """The output structure as JSON: ``0`` a tensor, a list the tuple or list of its children."""
    if spec.is_leaf():
        return 0
    if spec.type not in (tuple, list):
        raise _UnpackableError(f"an output of type {spec.type.__name__}")
    return [_structure(child) for child in spec.children()]


def _identity(module: nn.Module) -> List[Any]:
    """What a compiled ``module`` computes: every submodule's class and option attributes, its
    printed configuration and the bytes of its weights and buffers."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict(keep_vars=False).items():
        value = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{value.dtype}:{tuple(value.shape)}".encode())
        digest.update(value.view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    parts = []
    for name, sub in module.named_modules():
        plain = (bool, int, float, str, torch.dtype)
        options = [(key, repr(value)) for key, value in option_attributes(sub, plain)]
        parts.append([name, type(sub).__module__, type(sub).__qualname__, options])
    return [repr(module), parts, digest.hexdigest()]


def form_key(
    module: nn.Module,
    spec: TreeSpec,
    leaves: Sequence[Tensor],
    options: Dict,
    rule: Any = None,
    threads: Optional[int] = None,
) -> str:
    """The key of the graphs ``module`` needs for inputs of this structure and these dtypes and
    ranks (their sizes are the guards' business), on this machine, run on ``threads`` threads
    (default: this process's). ``rule``: the module's identity where already taken (a frozen
    rule's does not change)."""
    identity = [
        FORMAT,
        _identity(module) if rule is None else rule,
        str(spec),
        [[str(t.dtype), t.dim()] for t in leaves],
        sorted((k, repr(v)) for k, v in options.items()),
        torch.__version__,
        platform.python_version(),
        VERSION,
        source_digest(),
        torch.backends.cpu.get_cpu_capability(),
        threads or torch.get_num_threads(),  # Inductor writes it into its loops
    ]
    return hashlib.sha256(json.dumps(identity).encode()).hexdigest()


def build(
    module: nn.Module, args: tuple, folder: Path, options: Dict, threads: Optional[int] = None
) -> Tuple[Entry, Callable[[List[Tensor]], List[Tensor]]]:
    """Trace ``module`` on ``args`` with every size symbolic, compile it into a package with
    dynamic sizes for ``threads`` threads (default: this process's), and store it (and its
    record) in ``folder``: the entry and its runner.
    :class:`_UnpackableError` where the trace's size conditions cannot be stated as guards."""
    from torch._inductor import aoti_compile_and_package
    from torch.fx.experimental.proxy_tensor import make_fx

    # Sizes of 1 and sizes that happen to be equal stay symbolic (as in the compiled rules).
    patch = fx_config.patch  # type: ignore[attr-defined]
    with quiet(), torch.no_grad(), patch(backed_size_oblivious=True, use_duck_shape=False):
        gm = make_fx(module, tracing_mode="symbolic", _allow_non_fake_inputs=True)(*args)
        guards = _guards(gm)
        dims = tuple(
            [_dims(x) for x in arg] if isinstance(arg, (list, tuple)) else _dims(arg)
            for arg in args
        )
        program = torch.export.export(gm, args, dynamic_shapes=dims, strict=False)
        structure = _structure(program.call_spec.out_spec)
        folder.parent.mkdir(parents=True, exist_ok=True, mode=0o700)  # this user's alone
        folder.mkdir(exist_ok=True, mode=0o700)
        handle, staging = tempfile.mkstemp(dir=folder, prefix=".building-", suffix=".pt2")
        os.close(handle)
        try:
            aoti_compile_and_package(
                program,
                package_path=staging,
                # (a copy: it adds to it)
                inductor_configs={
                    **inductor_configs(options),
                    "cpp.threads": threads or torch.get_num_threads(),
                },
            )
            with open(staging, "rb") as file:
                sha = hashlib.sha256(file.read()).hexdigest()
            record = {
                "format": FORMAT,
                "sha256": sha,
                "guards": [g.to_json() for g in guards],
                "structure": structure,
            }
            # Named by its guards and bytes: two processes building one form at once each
            # store their own package, never one's record beside the other's bytes.
            name = hashlib.sha256(json.dumps(record["guards"]).encode()).hexdigest()[:16]
            name = f"{name}-{sha[:16]}"
            target = folder / f"{name}.pt2"
            os.replace(staging, target)
        finally:
            Path(staging).unlink(missing_ok=True)
        write_json(folder / f"{name}.json", record)
    entry = Entry(target, sha, tuple(guards), structure)
    return entry, load_entry(entry)


def _dims(value: Any) -> Any:
    if not isinstance(value, Tensor) or value.dim() == 0:
        return None
    return {i: torch.export.Dim.AUTO for i in range(value.dim())}


#: The packages of each form this process has read or built: ``[entry, runner]`` pairs, the
#: runner loaded at first use (``None`` until then, ``False`` when it would not load).
_FORMS: Dict[str, List[list]] = {}
#: Forms that failed to build in this process (not tried again).
_FAILED: set = set()
#: Bumped when packages may have appeared (see :func:`found_more`).
_GENERATION = [0]


def forget() -> None:
    """Forget the packages this process has read, loaded or failed to build: the next call of
    every form reads the store again, as a new process would."""
    _FORMS.clear()
    _FAILED.clear()
    found_more()


def found_more() -> None:
    """Packages may have been stored by another process: forms read again at their next call
    that finds no package (those already loaded stay)."""
    for key in [k for k, entries in _FORMS.items() if not any(slot[1] for slot in entries)]:
        del _FORMS[key]
    _GENERATION[0] += 1


class PackagedCompile:
    """``fallback`` (a ``torch.compile`` of ``module``, called as ``fallback(*args)``), with
    every graph it would build kept as a stored package instead (see the module doc): a call
    runs the stored package its sizes satisfy, builds one where none does, and calls
    ``fallback`` where the rule cannot be packaged, the tensors are not on the CPU, or
    :func:`mode` says so.

    Args:
        module (nn.Module): the frozen rule (its weights are constants of its packages).
        fallback (callable): the compiled rule.
        options (dict): the Inductor options of both.
        what (str): the rule, for log lines.
        threads (int, optional): the thread count its packages are for (default: this
            process's at each call; a background builder computes on one thread).
    """

    #: Calls of distinct input signatures remembered (a model has a handful).
    MAX_SIGNATURES = 1024

    def __init__(
        self,
        module: nn.Module,
        fallback: Callable,
        options: Dict,
        what: str = "a rule",
        threads: Optional[int] = None,
    ) -> None:
        self.module = module
        self.threads = threads
        self.fallback = fallback
        self.options = dict(options)
        self.what = what
        self._calls: Dict[tuple, Callable] = {}
        self._missing: Dict[tuple, int] = {}  # signatures no package served, at a generation
        self._rule: Any = None  # the module's identity, taken once

    def __call__(self, *args: Any) -> Any:
        leaves, spec, signed = self._signed(args)
        call = self._calls.get(signed)
        if call is None:
            call = self._resolve(args, leaves, spec, mode())
            if len(self._calls) >= self.MAX_SIGNATURES:
                self._calls.clear()
            self._calls[signed] = call
        return call(args, leaves)

    def stored(self, *args: Any) -> bool:
        """Whether a stored package serves this call (loaded now if so; nothing is built)."""
        leaves, spec, signed = self._signed(args)
        if signed in self._calls:
            return self._calls[signed] != self._fall_back
        if self._missing.get(signed) == _GENERATION[0]:
            return False
        current = mode()
        call = self._resolve(args, leaves, spec, "read" if current == "build" else current)
        if call == self._fall_back:
            if len(self._missing) >= self.MAX_SIGNATURES:
                self._missing.clear()
            self._missing[signed] = _GENERATION[0]
            return False
        self._calls[signed] = call
        return True

    def _signed(self, args: tuple) -> Tuple[List[Any], TreeSpec, tuple]:
        """The call's inputs flattened, their structure, and what its memo is keyed by."""
        leaves, spec = tree_flatten(args)
        return leaves, spec, (self.threads or torch.get_num_threads(), *signature(leaves))

    def _fall_back(self, args: tuple, leaves: List[Any]) -> Any:
        return self.fallback(*args)

    def _resolve(self, args: tuple, leaves: List[Any], spec: TreeSpec, current: str) -> Callable:
        if current == "off" or not all(
            isinstance(x, Tensor) and x.device.type == "cpu" for x in leaves
        ):
            return self._fall_back
        if self._rule is None:
            self._rule = _identity(self.module)
        key = form_key(self.module, spec, leaves, self.options, self._rule, self.threads)
        entries = _FORMS.get(key)
        if entries is None:
            entries = _FORMS[key] = [[e, None] for e in read_entries(store() / key)]
        sizes = [tuple(x.shape) for x in leaves]
        for slot in entries:
            if not all(g.holds(sizes) for g in slot[0].guards):
                continue
            if slot[1] is None:
                try:
                    slot[1] = load_entry(slot[0])
                except (OSError, ValueError, RuntimeError) as error:
                    logger.warning(
                        "compiled package %s ignored and removed: %s", slot[0].path, error
                    )
                    discard(slot[0].path)
                    slot[1] = False
            if slot[1] is not False:
                return _runner(slot[1], slot[0].structure)
        if current != "build" or key in _FAILED:
            return self._fall_back
        return self._build(args, key, entries, sizes)

    def _build(self, args: tuple, key: str, entries: List[list], sizes: list) -> Callable:
        import time

        began = time.perf_counter()
        try:
            entry, runner = build(self.module, args, store() / key, self.options, self.threads)
        except _UnpackableError as why:
            logger.info("%s is compiled, not packaged: %s", self.what, why)
        except Exception as error:  # anything that fails to build is compiled as before
            logger.warning("%s could not be packaged, it is compiled instead: %s", self.what, error)
        else:
            entries.append([entry, runner])
            if all(g.holds(sizes) for g in entry.guards):
                logger.info(
                    "%s: built a compiled package in %.1f s (%s), later processes load it",
                    self.what,
                    time.perf_counter() - began,
                    entry.path,
                )
                return _runner(runner, entry.structure)
            logger.warning("%s: its package does not serve the call it was built on", self.what)
        _FAILED.add(key)
        return self._fall_back


def signature(leaves: Sequence[Any]) -> tuple:
    """What tells calls apart for a compiled rule: each input's dtype, device and shape (other
    values themselves)."""
    return tuple(
        (x.dtype, x.device, x.shape) if isinstance(x, Tensor) else (type(x), x) for x in leaves
    )


def _runner(run: Callable[[List[Tensor]], List[Tensor]], structure: Any) -> Callable:
    def call(args: tuple, leaves: List[Tensor]) -> Any:
        # A package reads its inputs as contiguous and 16-byte aligned.
        inputs = [x.detach().contiguous() for x in leaves]
        inputs = [x if x.data_ptr() % 16 == 0 else x.clone() for x in inputs]
        with torch.no_grad():
            return rebuild(structure, list(run(inputs)))

    return call
