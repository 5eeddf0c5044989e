"""The demo pipeline: the main job end to end on built-in defaults (``compiledopt demo``).

1. **meta-train** a NormalizedMLP for a few steps by persistent evolution strategies on the
   built-in ``image-mlp`` tasks (8×8 image classification with small MLPs), to show the
   training loop at work;
2. **export** it as a shape-agnostic artifact (TorchScript, ONNX, AOTInductor);
3. **verify** every backend against the eager reference over carried-state steps;
4. **fine-tune** a pre-trained MLP on new classes with the *shipped* default optimizer
   (:data:`compiledopt.pretrained.DEFAULT`, meta-trained for hours by the committed config) at
   its default learning rate on every backend, against AdamW at the best learning rate of a
   sweep, every run with the same warm-up + cosine schedule
   (:func:`compiledopt.apps.finetune.run_finetune`).

A few minutes on 2 CPU cores; every stage prints what it did and how long it took. The tasks need
scikit-learn (the ``tasks`` extra), checked before anything is written. The checkpoint and the
artifact go to ``workdir``, by default ``<output root>/demo``
(:func:`compiledopt.apps.paths.output_root`: ``$COMPILEDOPT_HOME``, else
``$XDG_DATA_HOME/compiledopt``, else ``~/.local/share/compiledopt``).
"""

import dataclasses
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, TextIO, Union

from compiledopt._validation import check_flag, check_int
from compiledopt.apps.finetune import MAX_STEPS
from compiledopt.apps.paths import (
    OVERWRITE_HINT,
    check_output_directory,
    check_output_file,
    default_output,
)
from compiledopt.apps.requirements import require, require_task_family

__all__ = ["ARTIFACT", "CHECKPOINT", "KWARGS", "TRANSFORM", "check_outputs", "run_pipeline"]

TRANSFORM = "normalized-mlp"
KWARGS: Dict[str, Any] = {}
#: The names of the checkpoint and the artifact the pipeline writes in its folder.
CHECKPOINT, ARTIFACT = "checkpoint.pt", "artifact"


def check_outputs(root: Path, overwrite: bool) -> None:
    """Refuse, before any work, a checkpoint or an artifact of an earlier run in ``root`` unless
    ``overwrite`` (and then an ``artifact`` folder that is not one), each error naming
    ``--workdir`` and the file."""
    check_output_file(str(root / CHECKPOINT), "--workdir", overwrite, OVERWRITE_HINT)
    check_output_directory(str(root / ARTIFACT), "--workdir", overwrite)


def run_pipeline(
    workdir: Union[str, "os.PathLike[str]", None] = None,
    meta_steps: int = 20,
    family: str = "image-mlp",
    backends: Optional[Sequence[str]] = None,
    finetune_steps: int = 300,
    seed: int = 0,
    out: Optional[TextIO] = None,
    progress: bool = True,
    overwrite: bool = False,
) -> Dict[str, Any]:
    """Run the four stages; returns their results (meta-training, verification, fine-tuning).

    The checkpoint and the artifact are written in ``workdir``, by default ``<output root>/demo``
    (:func:`compiledopt.apps.paths.default_output`, checked before any work); those of an earlier
    run there are replaced only with ``overwrite`` (:func:`check_outputs`). ``backends``
    defaults to every export backend. Before writing anything, raises
    :class:`~compiledopt.apps.requirements.MissingDependencyError` if scikit-learn (which the
    fine-tuning job and the 8×8 tasks need) is not installed, and ``ValueError`` naming the
    value for an unknown backend, a step count that is not a positive integer (fine-tuning: at
    most :data:`~compiledopt.apps.finetune.MAX_STEPS`), a seed that is
    not an integer >= 0 or a ``progress`` that is not a bool, and ``TypeError`` for a
    ``workdir`` that is neither a path nor ``None``.
    """
    check_int(meta_steps, "meta_steps", 1)
    if check_int(finetune_steps, "finetune_steps", 1) > MAX_STEPS:
        raise ValueError(f"Invalid finetune_steps: {finetune_steps!r} (at most {MAX_STEPS:,})")
    check_int(seed, "seed")
    check_flag(progress, "progress")
    check_flag(overwrite, "overwrite")
    if workdir is not None and not isinstance(workdir, (str, os.PathLike)):
        raise TypeError(f"Invalid workdir: {workdir!r} (expected a path or None)")
    require_task_family(family)
    require("sklearn", "tasks")  # the fine-tuning job trains on digits whatever the family
    import torch

    from compiledopt import pretrained
    from compiledopt.apps.finetune import run_finetune
    from compiledopt.export import BACKENDS, export_shape_agnostic
    from compiledopt.export.verify import verify_artifact
    from compiledopt.learned.catalog import CATALOG, build_transform
    from compiledopt.meta import MetaConfig, MetaLoop
    from compiledopt.meta.launch import make_family

    backends = BACKENDS if backends is None else tuple(backends)
    if not backends:
        raise ValueError("backends: needs at least one export backend, got none")
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:  # before minutes of meta-training, not at the export
        raise ValueError(f"Unknown backend: {unknown[0]!r} (choose from {BACKENDS})")
    shipped = pretrained.load(pretrained.DEFAULT)  # before any work: it must load
    out = out or sys.stdout
    root = default_output("demo") if workdir is None else Path(workdir)
    check_outputs(root, overwrite)
    root.mkdir(parents=True, exist_ok=True)
    print(f"outputs (checkpoint, artifact) go to {root.resolve()}", file=out, flush=True)
    timings: Dict[str, float] = {}

    def stage(name: str, text: str) -> float:
        print(f"\n[{name}] {text}", file=out, flush=True)
        return time.perf_counter()

    config = MetaConfig(
        estimator="pes",
        meta_steps=meta_steps,
        unroll=10,
        min_horizon=20,
        horizon=60,
        pairs=4,
        tasks_per_step=2,
        inner_lr=CATALOG[TRANSFORM].inner_lr,
        eval_every=0,
        eval_tasks=2,
        eval_steps=60,
        checkpoint_every=0,
        seed=seed,
    ).validate()
    begin = stage(
        "1/4 meta-train",
        f"{TRANSFORM} {KWARGS} on '{family}' tasks by PES: {meta_steps} steps of "
        f"{config.tasks_per_step} tasks x {config.pairs} antithetic pairs, truncations of "
        f"{config.unroll} in tasks of {config.min_horizon}-{config.horizon} steps",
    )
    torch.manual_seed(seed)
    transform = build_transform(TRANSFORM, KWARGS)
    spec = {"name": TRANSFORM, "kwargs": KWARGS}
    metadata: Dict[str, Any] = {
        "transform_spec": spec,
        "training": {"task_family": family, "estimator": "pes", "meta_steps": meta_steps},
    }
    loop = MetaLoop(transform, make_family(family, seed, "cpu"), config, metadata=metadata)
    result = loop.train(checkpoint=str(root / CHECKPOINT), progress=progress)
    heldout = loop.evaluate()
    timings["meta-train"] = time.perf_counter() - begin
    history = [r["loss"] for r in result.history]
    head, tail = history[: max(1, len(history) // 4)], history[-max(1, len(history) // 4) :]
    print(
        f"  meta-objective (mean log loss) {sum(head) / len(head):.4g} (first quarter) -> "
        f"{sum(tail) / len(tail):.4g} (last quarter); held-out loss after "
        f"{config.eval_steps} steps {heldout['final_loss']:.4g}; "
        f"{timings['meta-train']:.1f} s",
        file=out,
    )

    begin = stage("2/4 export", f"backends {', '.join(backends)}, ranks 1 and 2 (the MLP's)")
    artifact = export_shape_agnostic(
        root / ARTIFACT,
        {"kind": "shape_agnostic", **spec},
        transform,
        backends=backends,
        ranks=(1, 2),
        lr=CATALOG[TRANSFORM].inner_lr,
        overwrite=overwrite,
        training={**metadata["training"], "config": dataclasses.asdict(config)},
    )
    timings["export"] = time.perf_counter() - begin
    print(f"  wrote {artifact}; {timings['export']:.1f} s", file=out)

    begin = stage("3/4 verify", "10 steps, state carried, every backend vs the eager reference")
    errors = verify_artifact(artifact, steps=10, trust_code=True)  # exported just now
    for backend, error in errors.items():
        print(
            f"  {backend:<12} max relative error {error:.3g}"
            f"  {'ok' if error <= 1e-6 else 'ABOVE 1e-6'}",
            file=out,
        )
    timings["verify"] = time.perf_counter() - begin

    begin = stage(
        "4/4 fine-tune",
        f"the shipped '{pretrained.DEFAULT}' optimizer at its default lr on every backend vs AdamW",
    )
    finetune = run_finetune(
        shipped,
        steps=finetune_steps,
        backends=["eager", "compiled", *(b for b in backends if b in shipped.backends)],
        seed=seed,
        out=out,
    )
    timings["fine-tune"] = time.perf_counter() - begin
    total = sum(timings.values())
    print(
        "\ndone: "
        + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items())
        + f" (total {total:.0f} s)",
        file=out,
    )
    return {
        "meta_train": result.history,
        "heldout": heldout,
        "verify": errors,
        "finetune": finetune,
        "timings": timings,
        "artifact": str(artifact),
    }
