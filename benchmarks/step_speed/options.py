"""The command line of the step-speed suite and the settings it resolves to."""

import argparse
import os
from typing import Any, Dict, Optional, Sequence

import torch

from benchmarks.step_speed.models import MODELS
from benchmarks.step_speed.plan import (
    BACKENDS,
    CUTS,
    FAMILIES,
    QUICK_BACKENDS,
    QUICK_FAMILIES,
)


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.step_speed",
        description="Step speed of frozen learned optimizers per backend, against AdamW, with "
        "a roofline (JSON, markdown and PNG plots).",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="the smallest model, coordinate-mlp and metacurvature, backends eager/compiled/"
        "torchscript/onnx, few repetitions, the user's Inductor cache (about a minute once it "
        "is warm)",
    )
    parser.add_argument(
        "--out",
        default=None,
        help="output folder (default: benchmarks/results, or benchmarks/results/quick with "
        "--quick)",
    )
    parser.add_argument(
        "--models", nargs="+", choices=sorted(MODELS), default=None, help="models to run"
    )
    parser.add_argument(
        "--families", nargs="+", choices=sorted(FAMILIES), default=None, help="families to run"
    )
    parser.add_argument(
        "--backends", nargs="+", choices=BACKENDS, default=None, help="backends to run"
    )
    parser.add_argument(
        "--aoti",
        nargs="*",
        default=None,
        help="families that get AOTInductor graphs (a C++ build per rank: ~30 s or more) "
        "(default: coordinate-mlp; none with --quick)",
    )
    parser.add_argument("--reps", type=int, default=None, help="timed steps (default: 5; 3 quick)")
    parser.add_argument(
        "--warmup", type=int, default=None, help="warm-up steps after the first (default: 2; 1)"
    )
    parser.add_argument(
        "--slow-step-s",
        type=float,
        default=2.0,
        help="a step slower than this gets 3 timed runs and 1 warm-up (default: 2.0)",
    )
    parser.add_argument(
        "--max-state-gb",
        type=float,
        default=2.0,
        help="skip a family on a model whose optimizer state (or Kronecker weights) would exceed "
        "this (default: 2.0)",
    )
    parser.add_argument(
        "--no-whole-model",
        action="store_true",
        help="skip the cold (empty Inductor cache) compile of the CoordinateMLP compiled "
        "backend on the ResNet-18 list",
    )
    parser.add_argument(
        "--inductor-cache",
        choices=("fresh", "shared"),
        default=None,
        help="fresh: an empty Inductor cache for this run, so compile times are cold; shared: "
        "the user's cache, so a repeated run skips compiling (default: fresh; shared with "
        "--quick)",
    )
    parser.add_argument(
        "--threads",
        default="auto",
        help="intra-op threads for torch and onnxruntime: a number, or auto: all cores less "
        "the ones other jobs keep busy (the 1-minute load average), at least 1. Oversubscribed "
        "threads wait on each other at every parallel region and time noise, not the rule "
        "(default: auto)",
    )
    parser.add_argument(
        "--compile-timeout",
        type=float,
        default=240.0,
        help="the ResNet-18 runs (there for compile time; with --isolate-compiled every compiled "
        "run) go to a child process, stopped after this many seconds; a stopped run records the "
        "limit as a lower bound (default: 240)",
    )
    parser.add_argument(
        "--isolate-compiled",
        action="store_true",
        help="run every compiled-backend configuration in a child process under "
        "--compile-timeout, not only the ResNet-18 ones: bounds the run's time when compiles are "
        "slow",
    )
    parser.add_argument(
        "--no-cuts",
        action="store_true",
        help="run the configurations the full run leaves out to stay near 25 minutes on 2 cores "
        "(see CUTS in plan.py)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of parameters and gradients")
    return parser


def settings(args: argparse.Namespace) -> Dict[str, Any]:
    """What the run does, resolved from the options (the quick run's defaults with ``--quick``)."""
    quick = args.quick
    models = args.models or (["mlp"] if quick else list(MODELS))
    families = args.families or (list(QUICK_FAMILIES) if quick else list(FAMILIES))
    backends = args.backends or [
        b for b in (QUICK_BACKENDS if quick else BACKENDS) if b in BACKENDS
    ]
    aoti = args.aoti if args.aoti is not None else ([] if quick else ["coordinate-mlp"])
    return {
        "quick": quick,
        "models": models,
        "families": families,
        "backends": list(backends),
        "aoti_families": [f for f in aoti if f in families] if "aoti" in backends else [],
        "reps": args.reps or (3 if quick else 5),
        "warmup": args.warmup if args.warmup is not None else (1 if quick else 2),
        "slow_step_s": args.slow_step_s,
        "max_state_bytes": args.max_state_gb * 2**30,
        "whole_model": not quick and not args.no_whole_model and "resnet18" in models,
        "compile_timeout_s": args.compile_timeout,
        "isolate_compiled": args.isolate_compiled,
        "cuts": [] if args.no_cuts or quick else list(CUTS),
        "ceilings": {"matmul_n": 2048, "copy_mb": 256, "reps": 3 if quick else 5},
        "inductor_cache": args.inductor_cache or ("shared" if quick else "fresh"),
        "seed": args.seed,
        **threads(args.threads),
    }


def threads(value: str) -> Dict[str, Any]:
    """``--threads``: a count, or ``auto`` (all cores less the 1-minute load average)."""
    default = torch.get_num_threads()
    if value != "auto":
        if not value.isdigit() or int(value) < 1:
            raise ValueError(f"Invalid --threads: {value!r} (a positive integer or auto)")
        return {"threads": int(value), "threads_reason": "--threads"}
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    cores = os.cpu_count() or default
    count = max(1, min(default, cores - round(load)))
    return {
        "threads": count,
        "threads_reason": f"auto: {cores} cores, 1-minute load average {load:.2f} at start",
    }


def parse(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    return parser().parse_args(list(argv) if argv is not None else None)
