"""The package's layout holds: layers only import downwards, no private names cross modules, no
module grows past a readable size, and every registered rule has a cost model and a test entry.

The layers (docs/architecture.md), lowest first; a module may import its own package and any
lower layer, never a higher one nor a different package of its own layer.
"""

import ast
import importlib
import inspect
import math
import pkgutil
from pathlib import Path
from typing import Dict, FrozenSet, Iterator, List, Set, Tuple

import pytest
import torch
from registry import REGISTRY

import compiledopt
from compiledopt.learned.catalog import CATALOG
from compiledopt.transforms.base import Cost, Transform

PACKAGE = Path(compiledopt.__file__).parent

LAYERS: Dict[str, int] = {
    "_validation": 0,
    "_identity": 0,
    "schedules": 0,
    "module_update": 0,
    "roles": 0,
    "version": 0,
    "cache": 0,
    "nn": 0,
    "transforms": 1,
    "tasks": 1,
    "learned": 2,
    "optim": 2,
    "meta": 3,
    "export": 3,
    "pretrained": 4,
    "runtime": 5,
    "bench": 6,
    "apps": 7,
    "cli": 8,
    "__init__": 9,
    "__main__": 9,
}
MAX_LINES = 500
#: The longest a function of ``compiledopt/cli/`` may be, in lines: a command parses its
#: arguments, calls an application (:mod:`compiledopt.apps`) and prints.
MAX_CLI_FUNCTION_LINES = 60


def _modules() -> Iterator[Tuple[str, Path]]:
    for path in sorted(PACKAGE.rglob("*.py")):
        yield ".".join(path.relative_to(PACKAGE).with_suffix("").parts), path


def _top(dotted: str) -> str:
    return dotted.split(".")[0]


def _imports(path: Path) -> Iterator[Tuple[int, str, List[str]]]:
    """``(line, module, names)`` of every import of a compiledopt module, nested ones included."""
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("compiledopt."):
                    yield node.lineno, alias.name.removeprefix("compiledopt."), []
                elif alias.name == "compiledopt":  # the whole package: the top layer
                    yield node.lineno, "__init__", []
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [alias.name for alias in node.names]
            if node.module.startswith("compiledopt."):
                yield node.lineno, node.module.removeprefix("compiledopt."), names
            elif node.module == "compiledopt":  # a subpackage, or a name of the top level
                for name in names:
                    yield node.lineno, name if name in LAYERS else "__init__", []


def test_every_module_has_a_layer() -> None:
    tops = {_top(name) for name, _ in _modules()}
    assert tops <= set(LAYERS), f"modules without a layer: {sorted(tops - set(LAYERS))}"
    assert {"transforms", "learned", "export", "runtime", "apps", "cli"} <= tops


def test_imports_only_point_down() -> None:
    wrong = []
    for name, path in _modules():
        own = _top(name)
        for line, target, _ in _imports(path):
            other = _top(target)
            if other == own or own in ("__init__", "__main__"):
                continue
            if LAYERS[other] >= LAYERS[own]:
                wrong.append(f"{path.relative_to(PACKAGE)}:{line} ({own}) imports {target}")
    assert not wrong, "imports against the layers:\n" + "\n".join(wrong)


def test_no_private_name_crosses_modules() -> None:
    """Neither the package nor the benchmarks (which sit above every layer) import a private
    name of a compiledopt module."""
    benchmarks = sorted((PACKAGE.parent / "benchmarks").rglob("*.py"))
    wrong = [
        f"{path}:{line} imports {names} from {target}"
        for path in [*(p for _, p in _modules()), *benchmarks]
        for line, target, names in _imports(path)
        if any(n.startswith("_") for n in names)
    ]
    assert benchmarks, "the benchmarks were not found"
    assert not wrong, "\n".join(wrong)


def test_no_module_is_too_long() -> None:
    long = {
        str(path.relative_to(PACKAGE)): n
        for _, path in _modules()
        if (n := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def _module_names() -> Dict[str, Path]:
    """Dotted name (relative to compiledopt; a package by its own name) -> file."""
    names = {}
    for name, path in _modules():
        if name.endswith(".__init__"):
            name = name.removesuffix(".__init__")
        names[name] = path
    return names


def _top_level_statements(body: List[ast.stmt]) -> Iterator[ast.stmt]:
    """The statements run when a module is imported: its body, into ``if``/``try``/``with``
    blocks, leaving out ``if TYPE_CHECKING:`` blocks and every function and class body."""
    for node in body:
        if isinstance(node, ast.If):
            test = node.test
            guarded = isinstance(test, ast.Name) and test.id == "TYPE_CHECKING"
            guarded |= isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
            if not guarded:
                yield from _top_level_statements(node.body)
            yield from _top_level_statements(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, *(h.body for h in node.handlers), node.orelse):
                yield from _top_level_statements(block)
            yield from _top_level_statements(node.finalbody)
        elif isinstance(node, ast.With):
            yield from _top_level_statements(node.body)
        else:
            yield node


def _all_statements(body: List[ast.stmt]) -> Iterator[ast.stmt]:
    """Every statement at any depth (function and class bodies, loops), leaving out
    ``if TYPE_CHECKING:`` blocks (their imports never run)."""
    for node in body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            yield from _all_statements(node.orelse)
            continue
        yield node
        for field in ("body", "orelse", "finalbody", "handlers", "cases"):
            for child in getattr(node, field, []):
                if isinstance(child, ast.stmt):
                    yield from _all_statements([child])
                elif hasattr(child, "body"):  # an except handler or a match case
                    yield from _all_statements(child.body)


def _module_imports(path: Path, modules: Dict[str, Path], lazy: bool = False) -> List[str]:
    """The compiledopt modules that ``path`` imports when it is imported (its top-level
    imports; with ``lazy``, those inside functions too), each resolved to a module of
    ``modules``: ``from compiledopt.x import y`` is module ``x.y`` when ``y`` is a submodule,
    else ``x``."""
    found = []
    body = ast.parse(path.read_text(), str(path)).body
    for node in _all_statements(body) if lazy else _top_level_statements(body):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "compiledopt":
                    found.append("__init__")
                elif alias.name.startswith("compiledopt."):
                    found.append(alias.name.removeprefix("compiledopt."))
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "compiledopt":
                base = ""
            elif node.module.startswith("compiledopt."):
                base = node.module.removeprefix("compiledopt.") + "."
            else:
                continue
            for alias in node.names:
                sub = base + alias.name
                found.append(sub if sub in modules else base.rstrip(".") or "__init__")
    return found


def _cycle(graph: Dict[str, List[str]]) -> List[str]:
    """One cycle of ``graph`` (its modules in import order, the first repeated last), or []."""
    done: Set[str] = set()
    for root in sorted(graph):
        if root in done:
            continue
        path: List[str] = []
        on_path: Dict[str, int] = {}
        stack = [(root, iter(sorted(graph[root])))]
        path.append(root)
        on_path[root] = 0
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                stack.pop()
                path.pop()
                del on_path[node]
                done.add(node)
            elif child in on_path:
                return [*path[on_path[child] :], child]
            elif child not in done and child in graph:
                on_path[child] = len(path)
                path.append(child)
                stack.append((child, iter(sorted(graph[child]))))
    return []


#: Import cycles between modules that are known and allowed for now, each as the set of modules
#: on it. Empty: no module imports, at its top level, one that imports it back.
KNOWN_CYCLES: List[FrozenSet[str]] = []


def _graph(lazy: bool = False) -> Dict[str, List[str]]:
    modules = _module_names()
    graph = {
        name: sorted({m for m in _module_imports(path, modules, lazy) if m != name})
        for name, path in modules.items()
    }
    for known in KNOWN_CYCLES:
        for name in known:
            graph[name] = [m for m in graph[name] if m not in known]
    return graph


def test_no_import_cycles() -> None:
    """No module imports, at its top level (the imports run when it is imported: not those
    inside functions nor under ``if TYPE_CHECKING:``), a module that imports it back, directly
    or through others."""
    graph = _graph()
    assert "apps.finetune" in graph and "apps.requirements" in graph["apps.finetune"]
    cycle = _cycle(graph)
    assert not cycle, "import cycle: " + " -> ".join(cycle)


def test_no_import_cycles_through_imports_inside_functions() -> None:
    """Nor through the imports functions make when called: a module never needs one that
    needs it back, so each can be understood (and tested) from the modules below it."""
    graph = _graph(lazy=True)
    # apps.train imports meta.launch only inside a function: the lazy graph sees it.
    assert "meta.launch" in graph["apps.train"] and "meta.launch" not in _graph()["apps.train"]
    cycle = _cycle(graph)
    assert not cycle, "import cycle (imports inside functions included): " + " -> ".join(cycle)


def test_the_cycle_check_finds_a_cycle(tmp_path: Path) -> None:
    fake = tmp_path / "fake.py"
    fake.write_text(
        "from typing import TYPE_CHECKING\nfrom compiledopt import apps, version\n"
        "from compiledopt.apps.finetune import run_finetune\nimport compiledopt.tasks.digits\n"
        "if TYPE_CHECKING:\n    from compiledopt import bench\n"
        "def f():\n    from compiledopt import cli\n"
    )
    found = _module_imports(fake, _module_names())
    assert found == ["apps", "version", "apps.finetune", "tasks.digits"]
    assert _cycle({"a": ["b"], "b": ["c", "d"], "c": ["a"], "d": []}) == ["a", "b", "c", "a"]
    assert _cycle({"a": ["b", "c"], "b": ["c"], "c": []}) == []


def test_cli_functions_are_short() -> None:
    """Every function of ``compiledopt/cli/`` fits in :data:`MAX_CLI_FUNCTION_LINES` lines: the
    work belongs in :mod:`compiledopt.apps` or below."""
    long = {}
    for path in sorted((PACKAGE / "cli").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_CLI_FUNCTION_LINES:
                    long[f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name}"] = lines
    assert not long, f"functions over {MAX_CLI_FUNCTION_LINES} lines: {long}"


def test_the_layer_check_catches_an_upward_import(tmp_path: Path) -> None:
    # The checks above must be able to fail: an upward import in a lower layer is reported.
    fake = tmp_path / "fake.py"
    fake.write_text(
        "def f():\n    from compiledopt.runtime import FrozenOptimizer\n"
        "    import compiledopt\n    from compiledopt.apps.finetune import _model\n"
    )
    found = [(line, target, names) for line, target, names in _imports(fake)]
    assert found == [
        (2, "runtime", ["FrozenOptimizer"]),
        (3, "__init__", []),
        (4, "apps.finetune", ["_model"]),
    ]
    assert LAYERS["runtime"] > LAYERS["transforms"]


# -- the catalog and the cost models ----------------------------------------------------------


def _transform_classes() -> List[type]:
    for info in pkgutil.walk_packages(compiledopt.__path__, "compiledopt."):
        importlib.import_module(info.name)
    seen, stack = [], [Transform]
    while stack:
        for sub in stack.pop().__subclasses__():
            if sub.__module__.startswith("compiledopt.") and sub not in seen:
                seen.append(sub)
                stack.append(sub)
    return seen


def test_every_transform_states_a_cost_model() -> None:
    classes = _transform_classes()
    assert {c.__name__ for c in classes} >= {"CoordinateMLP", "KroneckerUpdate", "AdamW"}
    missing = [c.__name__ for c in classes if c.cost is Transform.cost]
    assert not missing, f"transforms without a cost model: {missing}"


def test_a_rule_without_a_cost_model_is_never_free() -> None:
    class NoCost(Transform):
        shape_agnostic = True

    with pytest.raises(NotImplementedError, match="NoCost states no cost model"):
        NoCost().cost((3, 4))


def test_every_catalog_entry_has_a_test_registry_entry() -> None:
    tested = {entry.spec["name"] for entry in REGISTRY if entry.spec and "name" in entry.spec}
    missing = set(CATALOG) - tested
    assert not missing, f"catalog rules without an entry in tests/registry.py: {missing}"


@pytest.mark.parametrize("entry", REGISTRY, ids=[e.name for e in REGISTRY])
@pytest.mark.parametrize("shape", [(), (7,), (6, 5), (4, 3, 2, 2)], ids=str)
def test_cost_is_positive_and_grows_with_the_parameter(entry, shape) -> None:
    param = torch.zeros(shape)
    try:
        transform = entry.factory(param)
    except ValueError:
        pytest.skip("the transform does not take this rank")
    cost = transform.cost(shape)
    assert isinstance(cost, Cost)
    numel = math.prod(shape)
    # At least the update p <- p - lr*d (2 FLOPs) and g, p in and p out (12 bytes) a coordinate.
    assert cost.flops >= 2 * numel and cost.bytes >= 12 * numel
    assert cost.eager_flops >= cost.flops
    if transform.shape_agnostic and shape:  # one instance serves any size, at a per-coordinate cost
        doubled = transform.cost((*shape[:-1], 2 * shape[-1]))
        assert doubled.flops == 2 * cost.flops and doubled.bytes == 2 * cost.bytes


def test_adamw_cost_counts_torch_adamw() -> None:
    # torch.optim.AdamW's step per coordinate: m (3), v (4), sqrt, + eps, divide (3), decoupled
    # decay (2), update (2); reads p, g, m, v and writes p, m, v: 7 float32 values.
    cost = compiledopt.transforms.AdamW(weight_decay=1e-2).cost((10, 10))
    assert cost == Cost(14 * 100, 28 * 100, 14 * 100)
    adam = compiledopt.transforms.Adam().cost((10,))
    assert adam.flops == 12 * 10 and adam.bytes == 28 * 10


def test_kronecker_cost_counts_its_products() -> None:
    # One KroneckerLinear product on the (n, m) view: L'·G is 2·n·n·m FLOPs, (L'G)·R' 2·n·m·m.
    n, m = 6, 5
    transform = compiledopt.optim.KroneckerTransform(compiledopt.nn.KroneckerLinear, psd=True)(
        torch.zeros(n, m)
    )
    cost = transform.cost((n, m))
    assert cost.flops == 2 * n * n * m + 2 * n * m * m + 2 * n * m
    assert cost.eager_flops - cost.flops == 2 * n**3 + 2 * m**3  # LᵀL and RᵀR, every eager call


def test_catalog_lists_learned_families_and_baselines() -> None:
    learned = {name for name, entry in CATALOG.items() if entry.learned}
    assert learned == set(compiledopt.learned.LEARNED)
    assert {"sgd", "adam", "adamw"}.isdisjoint(learned)
    for name, entry in CATALOG.items():
        assert inspect.isclass(entry.build) and issubclass(entry.build, Transform), name
        assert entry.build().shape_agnostic, name
