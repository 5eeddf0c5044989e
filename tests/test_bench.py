"""The step-speed benchmark's quick mode: it runs and writes well-formed results (not speed)."""

import json
import math

import pytest

from compiledopt import bench

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


@pytest.mark.slow
def test_quick_benchmark_writes_json_markdown_and_plots(tmp_path):
    doc = bench.main(["--quick", "--out", str(tmp_path)])

    for name in ("step_speed.json", "step_speed.md", "step_speed.png", "roofline.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert json.loads((tmp_path / "step_speed.json").read_text())["schema"] == bench.SCHEMA

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


def test_rule_cost_counts():
    # CoordinateMLP, default settings, a matrix: ~1.1 kFLOP and 44 bytes a coordinate.
    cost = bench.rule_cost("coordinate-mlp", [(8, 4)], bench.FAMILIES["coordinate-mlp"])
    assert cost["coordinates"] == 32
    assert 1000 < cost["flops"] / 32 < 1200 and cost["bytes"] / 32 == 44
    # Kronecker (n, m) = (8, 4): 2nm(n + m) for L'GR' + 2 for the update; eager adds 2n³ + 2m³.
    cost = bench.rule_cost("kronecker", [(8, 4)], bench.FAMILIES["kronecker"])
    assert cost["flops"] == 2 * 32 * 12 + 2 * 32
    assert cost["eager_flops"] - cost["flops"] == 2 * 8**3 + 2 * 4**3
    # AdamW: 28 bytes a coordinate (p, g, m, v in; p, m, v out).
    assert bench.rule_cost("adamw", [(10,)], {})["bytes"] == 280


def test_resnet18_parameter_list():
    shapes = bench._resnet18_shapes()
    assert len(shapes) == 62
    assert sum(math.prod(s) for _, s in shapes) == 11_689_512
