"""Fine-tuning with a frozen learned optimizer, against AdamW (``compiledopt finetune``).

The built-in fine-tuning job needs no downloads: an MLP (64-64-10) is pre-trained with AdamW on
scikit-learn's handwritten digits 0-4, then fine-tuned on digits 5-9 — once with the artifact's
:class:`~compiledopt.FrozenOptimizer` on each requested backend, and once with ``torch.optim.AdamW``
at each learning rate of a sweep — from the same pre-trained weights, on the same minibatches,
every run with the same learning-rate schedule (linear warm-up over 5 % of the steps, then cosine
decay to 0: :func:`compiledopt.schedules.warmup_cosine_lr`). The table reports the final training
loss, the held-out loss and accuracy on digits 5-9, and the median step time (optimizer step only)
of each, with AdamW at its best learning rate and at 1e-3. The digits need scikit-learn (the
``tasks`` extra), checked before any work.

The split and the minibatches come from :func:`compiledopt.tasks.digits.digits_split` and
:func:`compiledopt.tasks.digits.sample_batches`; the backends are checked by
:mod:`compiledopt.apps.backends`.
"""

from __future__ import annotations

import statistics
import sys
import time
from typing import TYPE_CHECKING, Dict, Optional, Sequence, TextIO, Tuple

from compiledopt._validation import check_lr
from compiledopt.apps.backends import check_backends, default_backends
from compiledopt.apps.requirements import require

if TYPE_CHECKING:
    from torch import Tensor, nn

    from compiledopt.export import Artifact

__all__ = ["ADAMW_SWEEP", "BATCH", "MAX_STEPS", "pretrain", "run_finetune"]

ADAMW_SWEEP = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
BATCH = 64
#: The most fine-tuning ``steps``: a run's minibatches are drawn before its first step, 16 KiB
#: each, so 100,000 steps already hold 1.6 GB.
MAX_STEPS = 100_000


def _model(seed: int) -> nn.Module:
    import torch
    from torch import nn

    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def pretrain(seed: int = 0, steps: int = 300) -> nn.Module:
    """The MLP pre-trained with AdamW on digits 0-4."""
    import torch
    import torch.nn.functional as F

    from compiledopt.tasks.digits import digits_split, sample_batches

    x, y, _, _ = digits_split(range(5), seed)
    model = _model(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for inputs, targets in sample_batches(x, y, steps, seed, BATCH):
        optimizer.zero_grad()
        F.cross_entropy(model(inputs), targets).backward()
        optimizer.step()
    return model


def _finetune(
    start: nn.Module, make_optimizer, batches, held: Tuple[Tensor, Tensor], label: str
) -> Dict[str, float]:
    import copy

    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    from compiledopt.schedules import warmup_cosine_lr

    model = copy.deepcopy(start)
    optimizer = make_optimizer(model)
    scheduler = warmup_cosine_lr(optimizer, len(batches))
    step_times, losses = [], []
    for inputs, targets in tqdm(batches, desc=label, leave=False):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(inputs), targets)
        loss.backward()
        begin = time.perf_counter()
        optimizer.step()
        step_times.append(time.perf_counter() - begin)
        scheduler.step()
        losses.append(loss.item())
    with torch.no_grad():
        logits = model(held[0])
        held_loss = F.cross_entropy(logits, held[1]).item()
        accuracy = (logits.argmax(1) == held[1]).float().mean().item()
    warm = step_times[len(step_times) // 10 :] or step_times  # leave out compilation
    return {
        "train_loss": statistics.mean(losses[-20:]),
        "heldout_loss": held_loss,
        "accuracy": accuracy,
        "step_ms": 1000 * statistics.median(warm),
        "first_step_ms": 1000 * step_times[0],
    }


def run_finetune(
    artifact: Artifact | str,
    steps: int = 200,
    backends: Optional[Sequence[str]] = None,
    lr: Optional[float] = None,
    seed: int = 0,
    out: Optional[TextIO] = None,
) -> Dict[str, Dict[str, float]]:
    """Fine-tune the built-in job with ``artifact`` on each backend and with AdamW; print a table.

    Args:
        artifact: a shape-agnostic artifact (or one bound to the 64-64-10 MLP).
        steps: fine-tuning steps per run.
        backends: FrozenOptimizer backends to run (default: eager, compiled and every backend in
            the artifact that it may load:
            :func:`compiledopt.apps.backends.default_backends`).
        lr: the frozen optimizer's learning rate (default: the artifact's).
        seed: seeds the data split, the initialisation and the minibatches.
        out: where the table goes (default: ``sys.stdout``).

    Returns:
        dict: one entry per run (``"frozen/<backend>"``, ``"AdamW (best lr)"`` and
        ``"AdamW (lr 1e-3)"``, each with its ``"lr"``) with ``train_loss``,
        ``heldout_loss``, ``accuracy``, ``step_ms`` (median) and ``first_step_ms``.

    Raises:
        MissingDependencyError: scikit-learn is not installed (checked first).
        ArtifactError: ``artifact`` does not load.
        ValueError: ``steps`` is not an integer in ``[1, MAX_STEPS]``, ``seed`` not an
            integer, ``lr`` not a positive number, or a backend is unknown or not trusted (each
            named).
    """
    require("sklearn", "tasks")  # before the artifact is loaded or anything trained
    import torch

    from compiledopt.export import Artifact, load_artifact
    from compiledopt.pretrained import resolve
    from compiledopt.runtime import FrozenOptimizer
    from compiledopt.tasks.digits import digits_split, sample_batches

    out = out or sys.stdout
    artifact = artifact if isinstance(artifact, Artifact) else load_artifact(resolve(artifact))
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
        raise ValueError(f"Invalid steps: {steps!r} (an integer in [1, {MAX_STEPS:,}])")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"Invalid seed: {seed!r} (needs an integer)")
    lr = None if lr is None else check_lr(lr, "run_finetune")
    backends = list(backends if backends is not None else default_backends(artifact))
    if not backends or not all(isinstance(b, str) for b in backends):
        raise ValueError(f"Invalid backends: {backends!r} (needs one backend name or more)")
    check_backends(artifact, backends)  # before anything is trained
    x, y, held_x, held_y = digits_split(range(5, 10), seed + 1)
    batches = sample_batches(x, y, steps, seed + 2, BATCH)
    start = pretrain(seed)
    results: Dict[str, Dict[str, float]] = {}
    for backend in backends:
        results[f"frozen/{backend}"] = _finetune(
            start,
            lambda m, b=backend: FrozenOptimizer(m.parameters(), artifact, lr=lr, backend=b),
            batches,
            (held_x, held_y),
            f"frozen/{backend}",
        )
    sweep = {
        rate: _finetune(
            start,
            lambda m, r=rate: torch.optim.AdamW(m.parameters(), lr=r),
            batches,
            (held_x, held_y),
            f"AdamW lr={rate:g}",
        )
        for rate in ADAMW_SWEEP
    }
    best = min(sweep, key=lambda rate: sweep[rate]["heldout_loss"])
    results["AdamW (best lr)"] = {**sweep[best], "lr": best}
    results["AdamW (lr 1e-3)"] = {**sweep[1e-3], "lr": 1e-3}
    frozen_lr = lr if lr is not None else float(artifact.manifest["lr"])
    name = artifact.spec.get("name", artifact.spec["kind"])
    _print_table(results, steps, f"{name} artifact, lr {frozen_lr:g}", best, out)
    return results


def _print_table(
    results: Dict[str, Dict[str, float]], steps: int, frozen: str, best: float, out: TextIO
) -> None:
    print(
        f"\nfine-tuning digits 5-9 from an MLP pre-trained on digits 0-4: {steps} steps of {BATCH}",
        file=out,
    )
    print(
        f"  frozen optimizer: {frozen} (untuned); AdamW: best held-out loss over lr "
        f"{list(ADAMW_SWEEP)} at {best:g}; every run: warm-up 5 % + cosine decay",
        file=out,
    )
    print(
        f"  {'optimizer':<20} {'train loss':>10} {'held-out':>9} {'accuracy':>9} "
        f"{'step (ms)':>10} {'1st (ms)':>9}",
        file=out,
    )
    for name, r in results.items():
        print(
            f"  {name:<20} {r['train_loss']:>10.4f} {r['heldout_loss']:>9.4f} "
            f"{100 * r['accuracy']:>8.1f}% {r['step_ms']:>10.3f} {r['first_step_ms']:>9.1f}",
            file=out,
        )
    slow = [n for n, r in results.items() if n.startswith("frozen/") and r["first_step_ms"] > 1e3]
    if slow:
        print(
            f"  ({', '.join(slow)}: the first step built the compiled rule, which later runs on "
            "this machine load; the default backend, auto, never waits for it)",
            file=out,
        )
