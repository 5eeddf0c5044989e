"""The short-run benchmark (``python -m benchmarks.step_speed.short_run``): a tiny run writes
results whose ratios are those of its own wall times, and bad options stop it with one line. No
timing is asserted."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the suite is not installed: it lives in the checkout
    sys.path.insert(0, str(ROOT))

from benchmarks.step_speed import short_run  # noqa: E402


def test_a_tiny_run_writes_its_runs_and_their_ratios(tmp_path):
    argv = ["--steps", "2", "--threads", "1", "--backends", "auto", "--task", "regression"]
    doc = short_run.main([*argv, "--out", str(tmp_path)])
    stored = json.loads((tmp_path / "short_run.json").read_text())
    assert stored["runs"] == doc["runs"] and (tmp_path / "short_run.png").stat().st_size > 0
    runs = {(r["optimizer"], r["cache"]): r for r in doc["runs"]}
    assert set(runs) == {
        ("adamw-fused", None),
        ("adamw-foreach", None),
        ("auto", "cold"),
        ("auto", "warm"),
    }
    fused = runs["adamw-fused", None]
    for row in runs.values():
        assert row["steps"] == 2 and row["threads"] == 1
        assert 0 < row["first_step_s"] <= row["wall_s"]
        assert row["wall_over_adamw_fused"] == pytest.approx(row["wall_s"] / fused["wall_s"])
    learned = runs["auto", "cold"]
    assert learned["met"] == (learned["wall_over_adamw_fused"] <= short_run.TARGET)
    assert "met" not in fused
    # Two steps are far short of auto's patience: it never compiles, and says so (a wait for
    # the compiles that never started would read as "all finished").
    assert learned["compiles_started"] == 0 and learned["compiles_finished"] is False
    table = (tmp_path / "short_run.md").read_text()
    assert "| 1 | auto | cold |" in table and "≤ 1.5× fused AdamW's" in table
    assert "| none started |" in table


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--task", "nope"], "'nope'"),
        (["--steps", "0"], "--steps: 0"),
        (["--threads", "0"], "'0'"),
        (["--backends", "onnx"], "'onnx'"),
        (["--timeout", "0"], "--timeout: 0"),
    ],
)
def test_bad_options_stop_with_one_line(argv, named, monkeypatch, capsys):
    monkeypatch.setattr(short_run, "in_child", lambda *a, **k: pytest.fail("ran a run"))
    with pytest.raises(SystemExit) as stopped:
        short_run.main(argv)
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert named in err.strip().splitlines()[-1], err
