"""The Newton–Schulz cost benchmark: its record, and bad arguments refused."""

import json

import pytest

pytest.importorskip("matplotlib")

from benchmarks.step_speed import newton_schulz as bench


def test_one_small_run_records_both_forms_and_adamw(tmp_path):
    assert (
        bench.main(
            ["--models", "gpt2-tiny", "--reps", "1", "--threads", "1", "--out", str(tmp_path)]
        )
        == 0
    )
    doc = json.loads((tmp_path / "newton_schulz.json").read_text())
    (row,) = doc["rows"]
    assert row["model"] == "gpt2-tiny" and row["threads"] == 1 and row["matrices"] == 10
    assert row["params"] == 109_312
    # The package's form takes fewer FLOPs: the MLP's 64x256 matrices end on the Gram matrix.
    assert row["gflop"]["package"] < row["gflop"]["plain"]
    assert set(row["median_ms"]) == {"package", "plain", "adamw_fused"}
    assert row["package_over_plain"] == pytest.approx(
        row["median_ms"]["package"] / row["median_ms"]["plain"]
    )
    assert (tmp_path / "newton_schulz.png").stat().st_size > 0


@pytest.mark.parametrize("argv", [["--reps", "0"], ["--threads", "two"], ["--models", "vgg"]])
def test_bad_arguments_exit_2(argv, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        bench.main([*argv, "--out", str(tmp_path)])
    assert stop.value.code == 2
    assert argv[1] in capsys.readouterr().err
