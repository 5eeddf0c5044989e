"""The run: measure the ceilings, go through the plan, write the results.

``main`` checks that matplotlib is installed before anything else (the plots need it), so a
missing package costs one line, not a 40-minute run without its plots.
"""

import datetime
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from benchmarks.step_speed import options, report
from benchmarks.step_speed.measure import ROOT, load_1m, thread_count
from benchmarks.step_speed.models import model_info, model_params
from benchmarks.step_speed.plan import EXPORTED, SKIPPED, cut, is_shape_agnostic, memory_skip, plan
from benchmarks.step_speed.roofline import add_cost, ceilings_of, rule_cost
from benchmarks.step_speed.runs import (
    bottleneck,
    export,
    run_adamw,
    run_frozen,
    run_isolated,
    run_whole_model,
)
from compiledopt.bench import measure_ceilings

PROG = "python -m benchmarks.step_speed"
RESULTS = Path(__file__).resolve().parents[1] / "results"


def git(*args: str, timeout: float = 10.0) -> Optional[str]:
    """The output of ``git ARGS`` run in the checkout, or ``None`` where it failed (no git, not
    a repository, an error status, ``timeout`` seconds passed)."""
    try:
        done = subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout


def _code_version() -> Dict[str, Any]:
    """The git commit of the checkout the benchmark runs from, and its modified tracked files."""
    status = git("status", "--porcelain", "--untracked-files=no")
    commit = git("rev-parse", "HEAD")
    return {
        "commit": commit.strip() if commit else None,
        "modified": [line[3:] for line in status.splitlines() if line.strip()] if status else [],
    }


#: The vector and matrix instruction sets a recording names (their kernels round differently).
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile")


def cpu_identity() -> Tuple[str, List[str]]:
    """This machine's CPU model name and which of :data:`CPU_FLAGS` it has."""
    cpu = platform.processor() or platform.machine()
    flags: List[str] = []
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name") and cpu in ("", platform.machine()):
                    cpu = line.split(":", 1)[1].strip()
                if line.startswith("flags") and not flags:
                    present = set(line.split(":", 1)[1].split())
                    flags = [f for f in CPU_FLAGS if f in present]
    except OSError:
        pass
    return cpu, flags


def machine_info() -> Dict[str, Any]:
    cpu, flags = cpu_identity()
    memory_kb = None
    try:
        with open("/proc/meminfo") as handle:
            memory_kb = int(handle.readline().split()[1])
    except (OSError, ValueError, IndexError):
        pass
    import onnxruntime

    return {
        "code": _code_version(),
        "cpu": cpu,
        "cpu_flags": flags,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": round(memory_kb / 2**20, 1) if memory_kb else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "load_average_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _preflight(settings: Dict[str, Any]) -> None:
    """Stop with one line, before any work, when matplotlib is missing or a family to run has no
    cost model."""
    from compiledopt.apps.requirements import require

    try:
        require("matplotlib", "bench")
    except ImportError as error:  # the helper's error names the package and the extra
        print(f"{PROG}: the plots {error}", file=sys.stderr)
        raise SystemExit(2) from None
    for family in settings["families"]:
        try:
            rule_cost(family, [(4, 3), (5,)])
        except NotImplementedError as error:
            print(f"{PROG}: {family} has no cost model for the roofline: {error}", file=sys.stderr)
            raise SystemExit(2) from None


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Run the benchmark; write ``step_speed.{json,md,png}`` and ``roofline.png`` under
    ``--out``, print the markdown table, and return the JSON document."""
    from tqdm.auto import tqdm

    args = options.parse(argv)
    settings = options.settings(args)
    _preflight(settings)
    out = Path(args.out) if args.out else (RESULTS / "quick" if args.quick else RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    saved_cache = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    work = tempfile.TemporaryDirectory(prefix="compiledopt-bench-")
    root = Path(work.name)
    if settings["inductor_cache"] == "fresh":
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(root / "inductor-cache")
    doc: Dict[str, Any] = {
        "schema": report.SCHEMA,
        "mode": "quick" if settings["quick"] else "full",
        "argv": list(argv) if argv is not None else None,
        "settings": {k: v for k, v in settings.items() if k != "max_state_bytes"}
        | {"max_state_gib": settings["max_state_bytes"] / 2**30, "skipped_families": SKIPPED},
        "machine": machine_info(),
        "notes": [],
    }
    try:
        with thread_count(settings["threads"]):
            doc["machine"]["torch_threads"] = torch.get_num_threads()
            with tqdm(total=1, desc="peak FLOP/s and bandwidth", leave=False) as bar:
                doc["ceilings"] = asdict(measure_ceilings(**settings["ceilings"]))
                bar.update(1)
            _run_plan(doc, settings, root)
    finally:
        work.cleanup()
        if settings["inductor_cache"] == "fresh":
            if saved_cache is None:
                os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
            else:
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = saved_cache
    report.derive(doc)
    doc["targets"] = report.targets(doc)
    doc["machine"]["load_average_end"] = (
        list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    )
    doc["wall_s"] = time.perf_counter() - started
    markdown = report.write(doc, out)
    from benchmarks.step_speed.plots import plot

    plot(doc, out)
    print(markdown)
    return doc


def _run_plan(doc: Dict[str, Any], settings: Dict[str, Any], root: Path) -> None:
    from tqdm.auto import tqdm

    configs = plan(settings)
    named_by_model: Dict[str, List[Tuple[str, nn.Parameter]]] = {}
    doc["models"] = []
    for model in settings["models"]:
        named_by_model[model] = model_params(model, settings["seed"])
        doc["models"].append(model_info(model, named_by_model[model]))
    ranks = sorted({r for m in doc["models"] for r in m["ranks"]})
    doc["builds"], doc["results"] = [], []
    state = _State(doc, settings, root, ranks, named_by_model)
    with tqdm(configs, desc="configurations", unit="config") as bar:
        for item in bar:
            bar.set_postfix_str(" ".join(item[1:]) or item[0])
            {
                "export": state.export,
                "adamw": state.adamw,
                "run": state.run,
                "whole-model": state.whole_model,
                "bottleneck": state.bottleneck,
            }[item[0]](*item[1:])
    doc["notes"] += report.notes(settings, SKIPPED)


class _State:
    """The artifacts built so far and what each kind of configuration does."""

    def __init__(self, doc, settings, root, ranks, named_by_model) -> None:
        self.doc, self.settings, self.root, self.ranks = doc, settings, root, ranks
        self.named = named_by_model
        self.ceilings = ceilings_of(doc)
        self.artifacts: Dict[Tuple[str, str, str], Path] = {}
        self.failed: Dict[Tuple[str, str, str], str] = {}
        self.profiled = next((c[1] for c in plan(settings) if c[0] == "bottleneck"), None)

    def _path(self, key: Tuple[str, str, str]) -> Path:
        return self.root / "-".join(k or "any" for k in key)

    def export(self, family: str, model: str, backend: str) -> None:
        named = self.named[model] if model else None
        if model and memory_skip(family, named, self.settings):
            return
        key = (family, model, backend)
        try:
            path, seconds = export(family, backend, self._path(key), named, self.ranks)
        except Exception as error:  # recorded in the results, not hidden
            self.failed[key] = f"error: export failed: {type(error).__name__}: {error}"
            warnings.warn(f"{family} {backend} export failed: {error}", stacklevel=1)
            return
        self.artifacts[key] = path
        self.doc["builds"].append(
            {
                "family": family,
                "model": model or None,
                "backend": backend,
                "seconds": seconds,
                "ranks": self.ranks if not model else None,
            }
        )

    def adamw(self, model: str, variant: str) -> None:
        # Bound artifacts of the models before this one are done with (they can be large).
        for key in [k for k in self.artifacts if k[1] and k[1] != model]:
            shutil.rmtree(self.artifacts.pop(key), ignore_errors=True)
        named = self.named[model]
        row = self._row(model, f"adamw-{variant}", "torch.optim")
        row.update(run_adamw(named, variant, self.settings))
        add_cost(row, "adamw", [p.shape for _, p in named], self.ceilings)
        self.doc["results"].append(row)

    def run(self, model: str, family: str, backend: str) -> None:
        named = self.named[model]
        row = self._row(model, family, backend)
        agnostic = is_shape_agnostic(family)
        exported = backend in EXPORTED
        key = (family, "" if agnostic else model, backend if exported else "weights")
        reason = memory_skip(family, named, self.settings)
        reason = reason or cut(self.settings, family, backend, row["params"])
        if reason:
            row.update(status="skipped", reason=reason)
        elif key in self.failed:
            row.update(status="error", reason=self.failed[key])
        else:
            try:
                if key not in self.artifacts:  # eager/compiled need the weights only
                    self.artifacts[key], _ = export(
                        family, backend, self._path(key), named, self.ranks
                    )
                row["build_s"] = self._build_seconds(family, model, backend, agnostic)
                profile = model == self.profiled and family == "coordinate-mlp"
                isolate = backend.startswith("compiled") and self.settings["isolate_compiled"]
                if model == "resnet18" or isolate:
                    artifact = self.artifacts[key]
                    row.update(run_isolated(model, artifact, backend, self.settings, profile))
                else:
                    artifact = self.artifacts[key]
                    row.update(run_frozen(named, artifact, backend, self.settings, profile))
            except Exception as error:  # recorded in the results, not hidden
                row.update(status="error", reason=f"error: {type(error).__name__}: {error}")
                warnings.warn(f"{model} {family} {backend}: {error}", stacklevel=1)
        add_cost(row, family, [p.shape for _, p in named], self.ceilings)
        self.doc["results"].append(row)

    def whole_model(self) -> None:
        self.doc["whole_model_compile"] = {"model": "resnet18", **run_whole_model(self.settings)}

    def bottleneck(self, model: str) -> None:
        results = self.doc["results"]
        mlp = [r for r in results if (r["model"], r["family"]) == (model, "coordinate-mlp")]
        self.doc["bottleneck"] = {
            "model": model,
            "family": "coordinate-mlp",
            **bottleneck(self.named[model], self.ceilings, self.settings["reps"]),
            "step_profiles": {r["backend"]: r["profile"] for r in mlp if r.get("profile")},
            "step_ms_compiled": next(
                (r.get("step_ms") for r in mlp if r["backend"] == "compiled"), None
            ),
        }

    def _row(self, model: str, family: str, backend: str) -> Dict[str, Any]:
        info = next(m for m in self.doc["models"] if m["name"] == model)
        return {
            "model": model,
            "params": info["params"],
            "family": family,
            "backend": backend,
            "status": "ok",
            "reason": None,
            "load_1m": load_1m(),
        }

    def _build_seconds(
        self, family: str, model: str, backend: str, agnostic: bool
    ) -> Optional[float]:
        for build in self.doc["builds"]:
            if (build["family"], build["backend"]) == (family, backend) and (
                agnostic or build["model"] == model
            ):
                return build["seconds"]
        return None
