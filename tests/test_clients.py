"""The clients outside Python (export/clients/) apply an artifact as the eager transform does.

The tests build a small shape-agnostic ``CoordinateMLP`` artifact (weights perturbed with a seeded
generator, so the rule is not the hand-set Adam-like init), run the same fixed problem as the
clients — ``STEPS`` steps of ``p <- p - lr * direction`` on ``0.5 * ||p - target||²`` — with the
eager transform, and compare the final parameters each client prints (float32, rtol 1e-5,
atol 1e-6):

* the C++ program (libtorch from the torch wheel, ``rule.pt``), built with CMake into a tmp dir;
* the onnxruntime client (``rule_rank2.onnx``), run in a separate virtual environment that has
  only ``export/clients/onnxruntime/requirements.txt`` installed, so torch cannot be imported
  there (the venv is cached at ``export/clients/onnxruntime/.venv``, rebuilt when the
  requirements or the Python change).
"""

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import List, Sequence

import numpy as np
import pytest
import torch

from compiledopt.export import build_shape_agnostic, export_shape_agnostic

ROOT = Path(__file__).resolve().parents[1]
CLIENTS = ROOT / "export" / "clients"
SPEC = {"kind": "shape_agnostic", "name": "coordinate-mlp", "kwargs": {"hidden_sizes": [8]}}
LR = 10.0  # the catalog's suggestion for coordinate-mlp; recorded in the manifest
STEPS = 25
RTOL, ATOL = 1e-5, 1e-6


def _run(command: Sequence[object], timeout: float = 300, **kwargs) -> str:
    """Run ``command``; on failure raise an AssertionError that shows its output."""
    result = subprocess.run(
        [str(c) for c in command], capture_output=True, text=True, timeout=timeout, **kwargs
    )
    if result.returncode != 0:
        raise AssertionError(
            f"{' '.join(str(c) for c in command)} exited {result.returncode}\n"
            f"--- stdout ---\n{result.stdout[-4000:]}\n--- stderr ---\n{result.stderr[-4000:]}"
        )
    return result.stdout


def _problem() -> tuple:
    """The clients' fixed problem: p0[i] = (2i - 11)/11, target[i] = 0.25((i % 3) - 1), (3, 4)."""
    index = torch.arange(12, dtype=torch.float64)
    param = ((2.0 * index - 11.0) / 11.0).to(torch.float32).reshape(3, 4)
    target = (0.25 * (index.remainder(3) - 1.0)).to(torch.float32).reshape(3, 4)
    return param, target


def _reference(transform, steps: int, lr: float) -> np.ndarray:
    param, target = _problem()
    with torch.no_grad():
        state = transform.init_state(param)
        for k in range(steps):
            direction, state = transform.update(param - target, param, state, torch.tensor(k))
            param = param - lr * direction
    return param.reshape(-1).numpy()


def _parse(stdout: str) -> np.ndarray:
    values: List[float] = [float(line) for line in stdout.split()]
    return np.asarray(values, dtype=np.float64)


def _compare(printed: np.ndarray, reference: np.ndarray) -> None:
    assert printed.shape == reference.shape, f"printed {printed.size} values, expected 12"
    difference = np.abs(printed - reference.astype(np.float64))
    print(f"max |client - eager| = {difference.max():.3g}")
    np.testing.assert_allclose(printed, reference, rtol=RTOL, atol=ATOL)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> tuple:
    """(artifact directory, eager reference of the final parameter, flattened)."""
    with torch.random.fork_rng():  # the hidden units' nn.Linear init draws from the global RNG
        torch.manual_seed(0)
        transform = build_shape_agnostic(SPEC)
    generator = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for weight in transform.parameters():
            weight.add_(0.1 * torch.randn(weight.shape, generator=generator))
    directory = export_shape_agnostic(
        tmp_path_factory.mktemp("clients") / "artifact",
        SPEC,
        transform,
        backends=("torchscript", "onnx"),
        ranks=(2,),
        lr=LR,
    )
    reference = _reference(transform, STEPS, LR)
    start = _problem()[0].reshape(-1).numpy()
    assert np.abs(reference - start).max() > 1e-2, "the reference barely moves: a weak test"
    return directory, reference


# -- C++ (libtorch) -----------------------------------------------------------------------------


def _cxx_compiler() -> str | None:
    candidates = [os.environ.get("CXX", ""), "c++", "g++", "clang++"]
    return next((shutil.which(c) for c in candidates if c and shutil.which(c)), None)


@pytest.mark.slow
def test_cpp_client_matches_eager(artifact, tmp_path_factory):
    cmake = shutil.which("cmake")
    if cmake is None or _cxx_compiler() is None:
        pytest.skip(f"needs cmake and a C++ compiler (cmake: {cmake}, c++: {_cxx_compiler()})")
    directory, reference = artifact
    build = tmp_path_factory.mktemp("cpp-build")
    _run(
        [
            cmake,
            "-S",
            CLIENTS / "cpp",
            "-B",
            build,
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
            "-DCMAKE_BUILD_TYPE=Release",
        ]
    )
    _run([cmake, "--build", build, "--parallel", "2"], timeout=900)
    # No LR argument: the program reads the manifest's lr (LR) itself.
    printed = _parse(_run([build / "apply_rule", directory, STEPS]))
    _compare(printed, reference)


# -- onnxruntime (no torch) ---------------------------------------------------------------------


def _ort_python() -> Path:
    """A venv with only the onnxruntime client's requirements, cached beside the client."""
    client = CLIENTS / "onnxruntime"
    requirements = client / "requirements.txt"
    stamp = hashlib.sha256(
        requirements.read_bytes() + f"{sys.version}|{sys._base_executable}".encode()
    ).hexdigest()
    target = client / ".venv"
    python = target / "bin" / "python"
    stamp_file = target / "compiledopt-requirements.sha256"
    if stamp_file.is_file() and stamp_file.read_text() == stamp and python.exists():
        return python
    # Build beside the cache and move it into place at once, so a concurrent or interrupted
    # run never leaves (or uses) a half-installed environment.
    partial = client / f".venv.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        _run([sys.executable, "-m", "venv", partial])
        _run(
            [partial / "bin" / "python", "-m", "pip", "install", "-q", "-r", requirements],
            timeout=600,
        )
        (partial / stamp_file.name).write_text(stamp)
        shutil.rmtree(target, ignore_errors=True)
        try:
            os.rename(partial, target)
        except OSError:  # another run put its (identical) environment there first
            pass
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return python


@pytest.mark.slow
def test_onnxruntime_client_matches_eager_without_torch(artifact):
    directory, reference = artifact
    python = _ort_python()
    # -I: isolated mode (no PYTHONPATH, no user site-packages), so only the venv is visible.
    probe = subprocess.run(
        [str(python), "-I", "-c", "import torch"], capture_output=True, text=True, timeout=120
    )
    assert probe.returncode != 0 and "No module named 'torch'" in probe.stderr, probe.stderr
    script = CLIENTS / "onnxruntime" / "apply_rule.py"
    printed = _parse(_run([python, "-I", script, directory, STEPS]))
    _compare(printed, reference)
