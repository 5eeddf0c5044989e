"""Step speed: the library's ``compiledopt.bench`` API and ``compiledopt bench`` command, and the
project's suite under ``benchmarks/step_speed`` (its quick mode runs and writes well-formed
results; its roofline reads each rule's own cost model)."""

import argparse
import io
import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from compiledopt import bench
from compiledopt.learned import LearnedStepSize
from compiledopt.transforms import AdamW, Transform

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the suite is not installed: it lives in the checkout
    sys.path.insert(0, str(ROOT))

from benchmarks.step_speed import measure, models, plan, roofline, runner  # noqa: E402

ROW_KEYS = {
    "model",
    "params",
    "family",
    "backend",
    "status",
    "step_ms",
    "reps",
    "first_step_s",
    "graphs",
    "state_bytes_per_param",
    "flops_per_coordinate",
    "bytes_per_coordinate",
    "floor_ms",
    "achieved_fraction",
    "speedup_vs_eager",
    "ratio_vs_compiled",
    "ratio_vs_adamw_fused",
    "peak_rss_bytes",
    "load_1m",
}


class NoCost(Transform):
    """A rule that states no cost model."""

    shape_agnostic = True

    def update(self, grad, param, state, step):
        return grad, state


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    """A shape-agnostic learned-step-size artifact without graphs (eager and compiled only)."""
    from compiledopt.export import build_shape_agnostic, export_shape_agnostic

    spec = {"kind": "shape_agnostic", "name": "learned-step-size", "kwargs": {}}
    directory = tmp_path_factory.mktemp("bench") / "lss"
    return export_shape_agnostic(directory, spec, build_shape_agnostic(spec), backends=())


@pytest.fixture
def small_ceilings(monkeypatch):
    """Ceilings from a small matmul and copy: the numbers don't matter here, the time does."""
    measure_ceilings = bench.measure_ceilings
    monkeypatch.setattr(bench, "measure_ceilings", lambda *a, **k: measure_ceilings(64, 1, reps=1))


# -- the library API ---------------------------------------------------------------------------


def test_benchmark_eager_against_both_adamw(artifact):
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 2))
    before = [p.detach().clone() for p in model.parameters()]
    result = bench.benchmark(
        artifact, model, backends=["eager"], threads=[1], repeats=3, warmup=1, matmul_n=64,
        copy_mb=1,
    )  # fmt: skip

    assert result.params == 8 * 6 + 6 + 6 * 2 + 2 and result.tensors == 4
    assert {r.backend for r in result.rows} == {"eager", "adamw-foreach", "adamw-fused"}
    for row in result.rows:
        assert row.threads == 1 and row.step_ms > 0 and len(row.runs_ms) == 3
        for value in (row.ratio_vs_adamw_fused, row.ratio_vs_adamw_foreach, row.roofline_fraction):
            assert math.isfinite(value) and value > 0
        assert row.floor_ms > 0
    fused = next(r for r in result.rows if r.backend == "adamw-fused")
    assert fused.ratio_vs_adamw_fused == pytest.approx(1.0)
    assert set(result.ceilings) == {1} and result.ceilings[1].peak_flops > 0
    # The model is never touched; the result is plain data that prints as a table.
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(p.grad is None for p in model.parameters())
    json.dumps(result.to_dict())
    table = str(result)
    assert "adamw-fused" in table and "roofline" in table and "eager" in table


def test_without_fused_adamw_the_bandwidth_is_the_simple_kernels(monkeypatch):
    """A torch without fused AdamW on the CPU (it raises when asked for one) still gets a roof:
    the copy's and the update's, with AdamW's bytes and time recorded as nothing."""

    def no_fused(params, **options):
        raise RuntimeError("`fused=True` is not supported on this device")

    monkeypatch.setattr(torch.optim, "AdamW", no_fused)
    ceilings = bench.measure_ceilings(matmul_n=8, copy_mb=1, reps=2)
    assert (ceilings.adamw_bytes, ceilings.adamw_ms) == (0, 0.0)
    json.dumps(vars(ceilings), allow_nan=False)  # plain JSON, no infinity
    simple = max(ceilings.copy_bytes / ceilings.copy_ms, ceilings.update_bytes / ceilings.update_ms)
    assert 1e3 * simple == pytest.approx(ceilings.bandwidth_bytes_per_s)


@pytest.mark.parametrize(
    "copy_s, update_s, adamw_s", [(1.0, 0.5, 2.0), (0.25, 1.0, 2.0), (1.0, 1.0, 0.125)]
)
def test_the_bandwidth_is_the_fastest_of_a_copy_an_update_and_fused_adamw(
    monkeypatch, copy_s, update_s, adamw_s
):
    """A copy counts two bytes moved per byte copied, an in-place ``a += b`` three and a fused
    AdamW step seven a coordinate; the roof is the fastest of the three (a copy alone
    understates an optimizer's in-place traffic, and simple kernels what one core reaches on
    several streams). The update runs on two thirds of the copy's elements and AdamW on a
    parameter of a seventh of its bytes, so all three move about the same bytes."""
    seconds = iter([0.5, copy_s, update_s, adamw_s])  # matmul, copy, update, AdamW

    def timed(fn, reps, warmup=1):
        fn()  # every kernel still runs once: the shapes and the arithmetic are real
        value = next(seconds)
        return value, [value] * reps

    monkeypatch.setattr(bench, "median_time", timed)
    ceilings = bench.measure_ceilings(matmul_n=8, copy_mb=1, reps=3)
    nbytes = 1 << 20
    updated = 3 * 4 * (2 * (nbytes // 4) // 3)  # three passes over two thirds of the elements
    stepped = 7 * 4 * (2 * nbytes // 28)  # seven values a coordinate
    assert (ceilings.copy_bytes, ceilings.update_bytes) == (2 * nbytes, updated)
    assert ceilings.adamw_bytes == stepped
    assert updated == pytest.approx(2 * nbytes, rel=1e-5)
    assert stepped == pytest.approx(2 * nbytes, rel=1e-5)
    assert (ceilings.copy_ms, ceilings.update_ms) == (1e3 * copy_s, 1e3 * update_s)
    assert ceilings.adamw_ms == 1e3 * adamw_s
    want = max(2 * nbytes / copy_s, updated / update_s, stepped / adamw_s)
    assert ceilings.bandwidth_bytes_per_s == pytest.approx(want)
    assert ceilings.peak_flops == pytest.approx(2 * 8**3 / 0.5)
    # A recording made before the update was measured still loads.
    old = {k: v for k, v in vars(ceilings).items() if not k.startswith(("update", "adamw"))}
    assert bench.Ceilings(**old).update_bytes == bench.Ceilings(**old).adamw_bytes == 0


def test_the_bandwidth_is_measured_at_the_steps_own_traffic(artifact, monkeypatch):
    """Without ``copy_mb`` the copy moves what the step moves (the larger cost model, at least
    1 MiB): a model that fits in cache is not held to DRAM's bandwidth (which put fused AdamW
    above 100% of its roofline)."""
    sizes = []
    measure = bench.measure_ceilings

    def recording(matmul_n, copy_mb, *args, **kwargs):
        sizes.append(copy_mb)
        return measure(64, copy_mb, reps=1)

    monkeypatch.setattr(bench, "measure_ceilings", recording)
    shapes = [(1024, 512), (512,)]
    params = [torch.randn(s) for s in shapes]
    bench.benchmark(artifact, params, backends=["eager"], threads=[1], repeats=1, warmup=0)
    adamw = bench.step_cost([AdamW(weight_decay=bench.ADAMW_WEIGHT_DECAY)] * 2, shapes)
    lss = bench.step_cost([LearnedStepSize()] * 2, shapes)
    assert sizes == [pytest.approx(max(adamw.bytes, lss.bytes) / 2 / (1 << 20))]
    assert sizes[0] > 1  # larger than the floor, so the size really came from the models
    bench.benchmark(artifact, [torch.zeros(3)], backends=["eager"], threads=[1], repeats=1)
    assert sizes[-1] == 1.0  # a tiny step: the 1 MiB floor
    bench.benchmark(
        artifact, [torch.zeros(3)], backends=["eager"], threads=[1], repeats=1, copy_mb=3
    )
    assert sizes[-1] == 3  # asked for


def test_benchmark_rejects_a_backend_the_artifact_lacks(artifact):
    with pytest.raises(ValueError, match="onnx"):
        bench.benchmark(artifact, [torch.zeros(3)], backends=["onnx"], threads=[1])


def test_benchmark_without_a_cost_model_has_no_floor(artifact, monkeypatch):
    from compiledopt.learned import LearnedStepSize

    monkeypatch.setattr(LearnedStepSize, "cost", Transform.cost)
    result = bench.benchmark(
        artifact, [torch.randn(5, 3)], backends=["eager"], threads=[1], repeats=2, warmup=0,
        matmul_n=64, copy_mb=1,
    )  # fmt: skip
    eager = next(r for r in result.rows if r.backend == "eager")
    assert eager.floor_ms is None and eager.roofline_fraction is None  # unknown, never 0
    assert "LearnedStepSize" in result.cost_note
    adamw = next(r for r in result.rows if r.backend == "adamw-fused")
    assert adamw.floor_ms > 0


def test_step_cost_raises_for_a_rule_without_a_cost_model():
    with pytest.raises(NotImplementedError, match="NoCost"):
        bench.step_cost([NoCost()], [(3, 2)])


def test_available_backends_follow_the_export_registry(artifact):
    from compiledopt.export import BACKENDS, load_artifact

    assert bench.available_backends(load_artifact(artifact)) == ["eager", "compiled"]
    assert plan.BACKENDS == ("eager", "compiled", "compiled-bf16", *BACKENDS)


# -- the command -------------------------------------------------------------------------------


def _bench_args(*argv: str) -> argparse.Namespace:
    from compiledopt.cli import bench as command

    parser = argparse.ArgumentParser(prog="compiledopt")
    command.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["bench", *argv])


def test_command_prints_the_table_and_writes_json(artifact, tmp_path, small_ceilings):
    from compiledopt.cli import bench as command

    path = tmp_path / "result.json"
    args = _bench_args(
        str(artifact), "--backends", "eager", "--threads", "1", "--repeats", "2", "--warmup", "1",
        "--json", str(path),
    )  # fmt: skip
    out = io.StringIO()
    assert command.run(args, out) == 0
    assert "adamw-fused" in out.getvalue() and "mlp model" in out.getvalue()
    saved = json.loads(path.read_text())
    assert {r["backend"] for r in saved["rows"]} == {"eager", "adamw-foreach", "adamw-fused"}


def test_command_writes_no_file_unless_asked(artifact, tmp_path, monkeypatch, small_ceilings):
    # without --json or --plot nothing is written: not in the cwd, not under the output root
    from compiledopt.cli import main

    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    monkeypatch.setenv("COMPILEDOPT_HOME", str(tmp_path / "home"))
    argv = ["bench", str(artifact), "--backends", "eager", "--threads", "1", "--repeats", "2"]
    assert main([*argv, "--warmup", "1"]) == 0
    assert os.listdir(tmp_path / "cwd") == [] and not (tmp_path / "home").exists()


def test_command_without_matplotlib_exits_2_naming_the_extra(
    artifact, tmp_path, monkeypatch, capsys
):
    from compiledopt.cli import main

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setattr(bench, "benchmark", lambda *a, **k: pytest.fail("ran before the check"))
    status = main(["bench", str(artifact), "--plot", str(tmp_path / "plot.png")])
    assert status == 2
    err = capsys.readouterr().err
    assert "matplotlib" in err and "compiledopt[bench]" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "plot.png").exists()


# -- the suite ---------------------------------------------------------------------------------


def test_suite_without_matplotlib_stops_before_running(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setattr(runner, "machine_info", lambda: pytest.fail("ran before the check"))
    with pytest.raises(SystemExit) as stopped:
        runner.main(["--quick", "--out", str(tmp_path / "out")])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert "compiledopt[bench]" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_every_learned_catalog_family_is_benchmarked_or_skipped(monkeypatch):
    from compiledopt.learned.catalog import CATALOG, CatalogEntry

    learned = {name for name, entry in CATALOG.items() if entry.learned}
    assert learned == (set(plan.FAMILIES) - set(plan.BOUND)) | set(plan.SKIPPED)
    assert set(plan.LEARNED_KWARGS) | set(plan.SKIPPED) <= learned  # no stale names
    assert all(plan.SKIPPED.values())  # a skip says why
    # A newly registered family is benchmarked (with its defaults) ...
    monkeypatch.setitem(CATALOG, "new-rule", CatalogEntry(NoCost, 0.1, "a new rule"))
    assert plan.learned_families()["new-rule"]["kwargs"] == {}
    # ... unless it is skipped with a reason.
    monkeypatch.setitem(plan.SKIPPED, "new-rule", "not exportable yet")
    assert "new-rule" not in plan.learned_families()


def test_roofline_reads_each_rules_cost():
    # CoordinateMLP, default settings, a matrix: ~1.1 kFLOP and 44 bytes a coordinate.
    cost = roofline.rule_cost("coordinate-mlp", [(8, 4)])
    assert 1000 < cost.flops / 32 < 1200 and cost.bytes / 32 == 44
    # Kronecker (n, m) = (8, 4): 2nm(n + m) for L'GR' + 2 for the update; eager adds 2n³ + 2m³.
    cost = roofline.rule_cost("kronecker", [(8, 4)])
    assert cost.flops == 2 * 32 * 12 + 2 * 32
    assert cost.eager_flops - cost.flops == 2 * 8**3 + 2 * 4**3
    # AdamW: 14 FLOPs and 28 bytes a coordinate (p, g, m, v in; p, m, v out).
    cost = roofline.rule_cost("adamw-fused", [(10,)])
    assert (cost.flops, cost.bytes) == (140, 280)
    # Every benchmarked family has a cost model, on every model's shapes.
    shapes = [s for _, s in models.MODELS["convnet"][0]()]
    for family in plan.FAMILIES:
        assert roofline.rule_cost(family, shapes).flops > 0, family


def test_roofline_of_a_rule_without_a_cost_model_raises(monkeypatch):
    from compiledopt.learned.catalog import CATALOG, CatalogEntry

    monkeypatch.setitem(CATALOG, "no-cost", CatalogEntry(NoCost, 0.1, "no cost model"))
    spec = {"kind": "shape_agnostic", "name": "no-cost", "kwargs": {}}
    monkeypatch.setitem(plan.FAMILIES, "no-cost", spec)
    with pytest.raises(NotImplementedError, match="NoCost"):
        roofline.rule_cost("no-cost", [(4, 3)])
    row = {"backend": "compiled", "step_ms": 1.0}
    with pytest.raises(NotImplementedError):
        roofline.add_cost(row, "no-cost", [(4, 3)], bench.measure_ceilings(64, 1, reps=1))
    assert "floor_ms" not in row


def test_profiler_markers_are_kept_out_and_nothing_else(capfd):
    def call():
        os.write(2, b"kept on stderr\n")
        print("kept on stdout")

    profiled = measure.profile_call(call)
    assert profiled["wall_ms"] > 0
    captured = capfd.readouterr()
    assert "USDT" not in captured.err and "profiler_start" not in captured.err
    assert "kept on stderr" in captured.err and "kept on stdout" in captured.out


def test_resnet18_parameter_list():
    shapes = models.resnet18_shapes()
    assert len(shapes) == 62
    assert sum(math.prod(s) for _, s in shapes) == 11_689_512


@pytest.mark.slow
def test_quick_benchmark_writes_json_markdown_and_plots(tmp_path):
    from benchmarks.step_speed import report

    doc = runner.main(["--quick", "--out", str(tmp_path)])

    for name in ("step_speed.json", "step_speed.md", "step_speed.png", "roofline.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert json.loads((tmp_path / "step_speed.json").read_text())["schema"] == report.SCHEMA

    assert doc["mode"] == "quick"
    machine = doc["machine"]
    for key in ("cpu", "cores", "torch", "torch_threads", "load_average_start", "timestamp"):
        assert machine[key] is not None, key
    ceilings = doc["ceilings"]
    assert ceilings["peak_flops"] > 0 and ceilings["bandwidth_bytes_per_s"] > 0

    assert [m["name"] for m in doc["models"]] == ["mlp"]
    rows = doc["results"]
    seen = {(r["family"], r["backend"]) for r in rows}
    for family in ("coordinate-mlp", "metacurvature"):
        for backend in ("eager", "compiled", "torchscript", "onnx"):
            assert (family, backend) in seen
    assert {("adamw-foreach", "torch.optim"), ("adamw-fused", "torch.optim")} <= seen
    for row in rows:
        assert row["status"] == "ok", row
        assert ROW_KEYS <= set(row), ROW_KEYS - set(row)
        assert row["step_ms"] > 0 and row["reps"] >= 3
        assert math.isfinite(row["achieved_fraction"]) and row["floor_ms"] > 0
    mlp = {r["backend"]: r for r in rows if r["family"] == "coordinate-mlp"}
    assert mlp["eager"]["speedup_vs_eager"] == pytest.approx(1.0)
    assert mlp["compiled"]["ratio_vs_compiled"] == pytest.approx(1.0)
    assert mlp["compiled"]["graphs"] >= 1
    assert mlp["compiled"]["state_floats_per_param"] >= 4  # 3 momenta + second moment + rows/cols

    names = {t["name"] for t in doc["targets"]}
    assert {"compiled_speedup_coordinate_mlp", "aoti_vs_compiled", "resnet18_compile_s"} <= names
    for target in doc["targets"]:
        assert {"target", "measured", "met", "per_model", "note"} <= set(target)
        assert target["met"] in (True, False, None)

    assert doc["bottleneck"]["tensors"] and doc["bottleneck"]["per_coordinate_ns"] is not None
    table = (tmp_path / "step_speed.md").read_text()
    assert "| mlp |" in table and "## Targets" in table
