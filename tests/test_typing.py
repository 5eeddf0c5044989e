"""The package type-checks: ``mypy compiledopt`` with pyproject.toml's ``[tool.mypy]`` settings
reports no error (the pinned mypy of the test and dev extras)."""

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("mypy")

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # about two minutes on two cores without a cache, seconds with one
def test_mypy_reports_no_error():
    # The cache (.mypy_cache, ignored by git) makes later runs incremental.
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "compiledopt", "--cache-dir", str(ROOT / ".mypy_cache")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, f"mypy failed:\n{result.stdout}{result.stderr}"
