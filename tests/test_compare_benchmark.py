"""The version-comparison benchmark (``python -m benchmarks.step_speed.compare``): a tiny run
times both versions in alternating processes, each on its own copy of the package, and reports
the ratio of its own medians; bad options stop it with one line. No timing is asserted."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the suite is not installed: it lives in the checkout
    sys.path.insert(0, str(ROOT))

from benchmarks.step_speed import compare  # noqa: E402


def _worktrees() -> str:
    return subprocess.run(
        ["git", "worktree", "list"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout


def test_a_tiny_comparison_times_each_version_from_its_own_tree(tmp_path):
    argv = ["--rounds", "1", "--steps", "3", "--warmup", "1", "--backend", "eager"]
    doc = compare.main([*argv, "--before", "HEAD", "--out", str(tmp_path), "--no-plot"])
    assert json.loads((tmp_path / "compare.json").read_text())["runs"] == doc["runs"]
    runs = {r["version"]: r for r in doc["runs"]}
    assert set(runs) == {"before", "after"} and all(r["status"] == "ok" for r in runs.values())
    # The "after" process imported this checkout's package, the "before" one another copy.
    assert Path(runs["after"]["package"]) == ROOT / "compiledopt"
    assert not Path(runs["before"]["package"]).is_relative_to(ROOT)
    assert "compiledopt-compare-" not in _worktrees()  # the temporary worktree is gone
    summary = doc["summary"]
    assert summary["after_over_before"] == pytest.approx(
        runs["after"]["step_ms"] / runs["before"]["step_ms"]
    )
    for version, row in runs.items():
        assert summary[version]["over_adamw_fused"] == pytest.approx(
            row["step_ms"] / row["adamw_fused_ms"]
        )
    assert doc["tensors"] == 28  # the tiny GPT-2's parameters
    table = (tmp_path / "compare.md").read_text()
    assert "| before |" in table and "| after |" in table and "after / before:" in table


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--before", "no-such-ref-anywhere"], "'no-such-ref-anywhere'"),
        (["--rounds", "0"], "--rounds: 0"),
        (["--warmup", "-1"], "--warmup: -1"),
        (["--backend", "tpu"], "'tpu'"),
        (["--case", "nope"], "'nope'"),
    ],
)
def test_bad_options_stop_with_one_line(argv, named, monkeypatch, capsys):
    monkeypatch.setattr(compare, "_run", lambda *a, **k: pytest.fail("ran a process"))
    with pytest.raises(SystemExit) as stopped:
        compare.main(argv)
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert named in err.strip().splitlines()[-1], err
