"""Compiled rules kept on this machine as AOTInductor packages: a package computes what the eager
rule does, serves every size its guards admit, is found again by a later process (simulated by
``packages.forget()``) without a build, is never reused for another rule, torch or instruction
set, and is ignored with a log line when its bytes or its record do not check out."""

import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

import compiledopt as co
from compiledopt.runtime import package_builder, package_store, packages, warming
from compiledopt.runtime.buckets import BatchedRule
from compiledopt.runtime.compiled import CompiledBatchedRule, CompiledTensorRule, StoredStateRule
from compiledopt.runtime.package_store import Guard
from compiledopt.runtime.packages import PackagedCompile, form_key
from compiledopt.transforms.base import Transform

OPTIONS = {"max_fusion_size": 100_000}


class Sided(Transform):
    """A rule whose formulation depends on its matrix's side, as Newton–Schulz's does: momentum
    divided by the column norms of a tall matrix and by the row norms of a wide one."""

    shape_agnostic = True
    view_invariant = True

    def __init__(self, scale: float = 0.5) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(scale))

    def init_state(self, param: Tensor):
        return [torch.zeros_like(param)]

    def update(self, grad, param, state, step):
        m = state[0] * 0.9 + grad
        if grad.dim() == 2 and grad.shape[0] > grad.shape[1]:
            d = m / (m.square().sum(0, keepdim=True).sqrt() + 1e-6)
        else:
            d = m / (m.square().sum(-1, keepdim=True).sqrt() + 1e-6)
        return d * self.scale, [m]


class Squares(Sided):
    """A rule whose trace branches on a product of sizes: no guard can state that."""

    def update(self, grad, param, state, step):
        if grad.numel() > 40:
            return grad * 2.0, [state[0] + grad]
        return grad, [state[0] + grad]


@pytest.fixture
def store(tmp_path, monkeypatch):
    """An empty store, packages built on demand, nothing remembered from earlier tests."""
    monkeypatch.setenv("COMPILEDOPT_CACHE", str(tmp_path))
    monkeypatch.setenv("COMPILEDOPT_PACKAGES", "build")
    packages.forget()
    yield tmp_path / "packages"
    packages.forget()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A store holding the packages of :class:`Sided` on batches of wide and of tall matrices
    (built once for the module's tests): ``(folder, results)``, the results of the calls that
    built them."""
    root = tmp_path_factory.mktemp("built")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("COMPILEDOPT_CACHE", str(root))
        patch.setenv("COMPILEDOPT_PACKAGES", "build")
        packages.forget()
        rule = CompiledBatchedRule(Sided(), torch.float32)
        results = {shape: rule(*_batch(shape)) for shape in [(3, 4, 6), (3, 6, 4)]}
        packages.forget()
    return root / "packages", results


def _batch(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    grads, params = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    return grads, params, [torch.randn(shape, generator=g)], torch.tensor(3), torch.arange(shape[0])


def _eager(transform, args):
    return BatchedRule(StoredStateRule(transform.update, torch.float32))(*args)


def _assert_equal(actual, expected, exact=False):
    directions, states, finite = actual
    tolerance = {"rtol": 0, "atol": 0} if exact else {"rtol": 1e-5, "atol": 1e-6}
    torch.testing.assert_close(directions, expected[0], **tolerance)
    for a, b in zip(states, expected[1], strict=True):
        torch.testing.assert_close(a, b, **tolerance)
    assert torch.equal(finite, expected[2])


def _no_build(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a package was built")

    monkeypatch.setattr(packages, "build", refuse)


def test_a_package_equals_the_eager_rule_and_a_new_process_loads_it(built, monkeypatch, caplog):
    folder, results = built
    for shape, result in results.items():
        _assert_equal(result, _eager(Sided(), _batch(shape)))
    assert len(list(folder.glob("*/*.pt2"))) == 2  # one form, two guard classes
    monkeypatch.setenv("COMPILEDOPT_CACHE", str(folder.parent))
    monkeypatch.setenv("COMPILEDOPT_PACKAGES", "build")
    _no_build(monkeypatch)
    packages.forget()  # a new process
    rule = CompiledBatchedRule(Sided(), torch.float32)
    assert rule.stored(*_batch((3, 4, 6)))
    _assert_equal(rule(*_batch((3, 4, 6))), results[(3, 4, 6)], exact=True)
    # Other sizes of each class: the same packages, no build.
    for shape in [(5, 2, 7), (1, 9, 3), (2, 5, 5)]:
        _assert_equal(rule(*_batch(shape, seed=1)), _eager(Sided(), _batch(shape, seed=1)))
    packages.forget()


def test_each_guard_class_gets_its_own_package(built):
    folder, _ = built
    records = [json.loads(p.read_text()) for p in folder.glob("*/*.json")]
    classes = {tuple(map(tuple, (tuple(map(tuple, g[0])) for g in r["guards"]))) for r in records}
    assert len(records) == 2 and len(classes) == 2
    wide, tall = (3, 4, 6), (3, 6, 4)
    served = [
        [
            all(Guard.from_json(g).holds([s, s, s, (), (3,)]) for g in r["guards"])
            for s in (wide, tall)
        ]
        for r in records
    ]
    assert sorted(served) == [[False, True], [True, False]]


def test_a_large_tensor_rule_is_packaged(store):
    transform = Sided()
    rule = CompiledTensorRule(transform)
    g = torch.Generator().manual_seed(0)
    for shape in [(300, 230), (4, 10, 3)]:
        grad, param, state = (
            torch.randn(shape, generator=g),
            torch.randn(shape, generator=g),
            [torch.randn(shape, generator=g)],
        )
        direction, new_state = rule(grad, param, state, torch.tensor(0))
        view = (shape[0], -1)
        expected, expected_state = transform.update(
            grad.reshape(view), param.reshape(view), [state[0].reshape(view)], torch.tensor(0)
        )
        torch.testing.assert_close(direction, expected.reshape(shape), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(new_state[0], expected_state[0].reshape(shape))
    assert len(list(store.glob("*/*.pt2"))) == 2  # tall matrices, then wide ones
    assert rule.stored(grad, param, state, torch.tensor(0))


def _corrupt(folder: Path, tmp_path: Path, edit) -> Path:
    copy = tmp_path / "cache" / "packages"
    shutil.copytree(folder, copy)
    edit(copy)
    return copy


def _fifo_records(folder):
    for record in folder.glob("*/*.json"):
        record.unlink()
        os.mkfifo(record)


def _linked_packages(folder):
    for package in folder.glob("*/*.pt2"):
        moved = package.with_name("elsewhere.bin")
        package.rename(moved)
        package.symlink_to(moved)


def _flip_a_byte(folder):
    for package in folder.glob("*/*.pt2"):
        data = bytearray(package.read_bytes())
        data[len(data) // 2] ^= 0xFF
        package.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "edit",
    [
        _flip_a_byte,
        _fifo_records,
        _linked_packages,
        lambda f: [p.write_bytes(p.read_bytes()[:100]) for p in f.glob("*/*.pt2")],
        lambda f: [p.write_text("{not json") for p in f.glob("*/*.json")],
        lambda f: [
            p.write_text(json.dumps({"format": 1, "sha256": "0" * 64})) for p in f.glob("*/*.json")
        ],
        lambda f: [
            p.write_text(p.read_text().replace('"<', '"<<').replace('"!=', '"=!'))
            for p in f.glob("*/*.json")
        ],
        lambda f: [
            p.write_bytes(b" " * (package_store.MAX_RECORD_BYTES + 1)) for p in f.glob("*/*.json")
        ],
    ],
    ids=[
        "flipped-byte",
        "fifo-record",
        "linked-package",
        "truncated",
        "record-not-json",
        "record-without-guards",
        "bad-guard",
        "huge-record",
    ],
)
def test_a_corrupted_entry_is_ignored_with_a_log_line_never_loaded(
    built, tmp_path, monkeypatch, caplog, edit
):
    folder, _ = built
    copy = _corrupt(folder, tmp_path, edit)
    monkeypatch.setenv("COMPILEDOPT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("COMPILEDOPT_PACKAGES", "read")
    loaded = []
    monkeypatch.setattr(package_store, "open_package", lambda path: loaded.append(path))
    packages.forget()
    rule = CompiledBatchedRule(Sided(), torch.float32)
    with caplog.at_level(logging.WARNING, logger="compiledopt"):
        served = [rule.stored(*_batch(s)) for s in [(3, 4, 6), (3, 6, 4)]]
    packages.forget()
    assert "ignored" in caplog.text
    assert served == [False, False] and loaded == []
    assert not list(copy.glob("*/*.pt2"))  # removed: ignored once, then built again


def test_a_changed_rule_torch_or_instruction_set_is_another_key(monkeypatch):
    args = _batch((2, 3, 4))
    leaves, spec = torch.utils._pytree.tree_flatten(args)

    def key(transform=None):
        module = CompiledBatchedRule(transform or Sided(), torch.float32).compiled.module
        return form_key(module, spec, leaves, OPTIONS)

    first = key()
    assert key() == first  # the same rule, built again
    assert key(Sided(scale=0.25)) != first  # another weight
    assert (
        form_key(CompiledBatchedRule(Sided(), torch.float32).compiled.module, spec, leaves, {})
        != first
    )  # other Inductor options
    assert (
        form_key(
            CompiledBatchedRule(Sided(), torch.float32).compiled.module,
            spec,
            [x.double() if x.is_floating_point() else x for x in leaves],
            OPTIONS,
        )
        != first
    )  # other dtypes
    monkeypatch.setattr(torch, "__version__", "9.9.9")
    assert key() != first
    monkeypatch.undo()
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert key() != first
    monkeypatch.undo()
    # compiledopt's own code edited (the version number unchanged)
    monkeypatch.setattr(packages, "source_digest", lambda: "0" * 64)
    assert key() != first


def test_the_source_digest_follows_every_python_file_and_only_those(tmp_path):
    from compiledopt.version import source_digest

    def digest():
        source_digest.cache_clear()
        return source_digest(tmp_path)

    (tmp_path / "sub").mkdir()
    (tmp_path / "a.py").write_text("x = 1\n")
    (tmp_path / "sub" / "b.py").write_text("y = 2\n")
    first = digest()
    assert digest() == first and len(first) == 64
    (tmp_path / "notes.txt").write_text("not code")
    assert digest() == first
    (tmp_path / "sub" / "b.py").write_text("y = 3\n")
    edited = digest()
    assert edited != first
    (tmp_path / "sub" / "b.py").rename(tmp_path / "b.py")
    assert digest() not in (first, edited)  # the same bytes under another name
    (tmp_path / "odd.py").mkdir()  # a name that is no readable file: counted, no error
    assert len(digest()) == 64
    source_digest.cache_clear()


def test_read_mode_never_builds_and_off_never_reads(store, monkeypatch):
    calls = []
    module = CompiledBatchedRule(Sided(), torch.float32).compiled.module
    rule = PackagedCompile(module, lambda *a: calls.append("fallback") or "fallback", OPTIONS)
    _no_build(monkeypatch)
    monkeypatch.setenv("COMPILEDOPT_PACKAGES", "read")
    assert rule(*_batch((2, 3, 4))) == "fallback"
    monkeypatch.setenv("COMPILEDOPT_PACKAGES", "0")
    read = []
    monkeypatch.setattr(packages, "read_entries", lambda folder: read.append(folder) or [])
    other = PackagedCompile(module, lambda *a: "fallback", OPTIONS)
    assert other(*_batch((2, 3, 4))) == "fallback" and not other.stored(*_batch((2, 3, 4)))
    assert read == [] and calls == ["fallback"]


def test_an_unpackable_rule_is_compiled_instead_with_an_info_line(store, caplog):
    module = CompiledBatchedRule(Squares(), torch.float32).compiled.module
    calls = []
    rule = PackagedCompile(module, lambda *a: calls.append(1) or "fallback", OPTIONS, "squares")
    with caplog.at_level(logging.INFO, logger="compiledopt"):
        assert rule(*_batch((2, 3, 4))) == "fallback"
        assert rule(*_batch((2, 5, 4))) == "fallback"  # not traced again
    assert "squares is compiled, not packaged" in caplog.text and "not linear" in caplog.text
    assert caplog.text.count("not packaged") == 1 and calls == [1, 1]
    assert not list(store.glob("*/*.pt2"))


@pytest.mark.parametrize(
    "value",
    [
        None,
        [],
        [[[0, 1, 1]], 0],
        [[[0, 1, 1]], 0, "=>"],
        [[[0, 1]], 0, "<"],
        [[[0, -1, 1]], 0, "<"],
        [[[0, 1, 1.5]], 0, "<"],
        [[[0, 1, True]], 0, "<"],
        [[[0, 1, 1]], "0", "<"],
        [[[0, 1, 1]], 1 << 70, "<"],
        [{"leaf": 0}, 0, "<"],
    ],
)
def test_a_malformed_guard_is_refused(value):
    with pytest.raises(ValueError, match="not a guard"):
        Guard.from_json(value)


@pytest.mark.parametrize(
    ("guard", "sizes", "holds"),
    [
        ([[[0, 1, 1], [0, 2, -1]], 0, "<"], [(2, 3, 4)], True),  # s1 < s2
        ([[[0, 1, 1], [0, 2, -1]], 0, "<"], [(2, 4, 4)], False),
        ([[[0, 1, 3], [0, 2, -1]], 0, "<="], [(2, 3, 9)], True),  # 3·s1 <= s2
        ([[[0, 1, 3], [0, 2, -1]], 0, "<="], [(2, 3, 8)], False),
        ([[[0, 0, 1]], -1, "!="], [(1, 3)], False),  # s0 != 1
        ([[[0, 0, 1], [1, 0, -1]], 0, "=="], [(2, 3), (2,)], True),
        ([[[1, 1, 1]], 0, "=="], [(2, 3), (2,)], False),  # a size the call lacks
    ],
)
def test_a_guard_states_a_linear_relation_between_sizes(guard, sizes, holds):
    parsed = Guard.from_json(guard)
    assert parsed.holds(sizes) is holds
    assert Guard.from_json(json.loads(json.dumps(parsed.to_json()))) == parsed


def test_a_run_that_ran_eager_leaves_its_packages_and_the_next_runs_them_at_once(
    store, caplog, monkeypatch
):
    # The builder process imports this module (the pickled rule is one of compiledopt's, the
    # path is for the session's other tests' classes).
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parent))

    def run(backend):
        torch.manual_seed(0)
        params = [nn.Parameter(torch.randn(7)), nn.Parameter(torch.randn(5))]
        optimizer = co.FrozenOptimizer(params, "normalized-mlp", lr=0.05, backend=backend)
        generator = torch.Generator().manual_seed(1)
        for _ in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=generator)
            optimizer.step()
        return [p.detach().clone() for p in params]

    started = warming.compiles_started()
    eager = run("auto")  # eager throughout (its patience is far off): notes the calls
    assert warming.compiles_started() == started and not list(store.glob("*/*.pt2"))
    pid = package_builder.BUILDER.start()  # what the process's exit would do
    assert pid is not None
    assert package_builder.wait_for_builders(600)  # it waits for the child (a marker, the lock)
    assert package_builder.BUILDER.wait(60) and not list(store.glob("builder-*.starting"))
    assert len(list(store.glob("*/*.pt2"))) == 1  # the padded bucket of the two vectors
    packages.forget()  # a new process
    with caplog.at_level(logging.INFO, logger="compiledopt"):
        automatic = run("auto")
    assert "was stored on this machine; it runs now" in caplog.text
    assert warming.compiles_started() == started  # nothing compiled, in the background or not
    assert package_builder.BUILDER.cancel() == 0  # and nothing left to build
    compiled = run("compiled")
    for a, c, e in zip(automatic, compiled, eager, strict=True):
        assert torch.equal(a, c)  # the same package from the first step on
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)
