"""The ``compiledopt finetune`` command: fine-tuning with a frozen learned optimizer, against AdamW.

The built-in fine-tuning job needs no downloads: an MLP (64-64-10) is pre-trained with AdamW on
scikit-learn's handwritten digits 0-4, then fine-tuned on digits 5-9 — once with the artifact's
:class:`~compiledopt.FrozenOptimizer` on each requested backend, and once with ``torch.optim.AdamW``
at each learning rate of a sweep — from the same pre-trained weights, on the same minibatches,
every run with the same learning-rate schedule (linear warm-up over 5 % of the steps, then cosine
decay to 0: :func:`compiledopt.schedules.warmup_cosine_lr`). The table reports the final training
loss, the held-out loss and accuracy on digits 5-9, and the median step time (optimizer step only)
of each, with AdamW at its best learning rate and at 1e-3. The digits need scikit-learn (the
``tasks`` extra), checked before any work.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, TextIO, Tuple

from compiledopt.cli.arguments import comma_list, positive_float, positive_int, random_seed
from compiledopt.cli.requirements import require
from compiledopt.cli.trust import add_trust_options, check_loadable, open_trusted

if TYPE_CHECKING:
    from torch import Tensor, nn

    from compiledopt.export import Artifact

__all__ = [
    "ADAMW_SWEEP",
    "BATCH",
    "add_parser",
    "check_backends",
    "default_backends",
    "digits_split",
    "pretrain",
    "run",
    "run_finetune",
]

ADAMW_SWEEP = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
BATCH = 64


def digits_split(classes: Sequence[int], seed: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Train and held-out examples (2/3 : 1/3, shuffled by ``seed``) of the given digit classes."""
    import torch

    from compiledopt.tasks.digits import load_digits

    images, labels = load_digits()
    index = torch.nonzero(torch.isin(labels, torch.tensor(list(classes)))).squeeze(1)
    index = index[torch.randperm(len(index), generator=torch.Generator().manual_seed(seed))]
    cut = 2 * len(index) // 3
    train, held = index[:cut], index[cut:]
    return images[train], labels[train], images[held], labels[held]


def _model(seed: int) -> nn.Module:
    import torch
    from torch import nn

    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def sample_batches(x: Tensor, y: Tensor, steps: int, seed: int) -> List[Tuple[Tensor, Tensor]]:
    """``steps`` minibatches of ``BATCH`` rows of ``(x, y)`` drawn with replacement, seeded."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    picks = [torch.randint(0, len(y), (BATCH,), generator=generator) for _ in range(steps)]
    return [(x[p], y[p]) for p in picks]


def pretrain(seed: int = 0, steps: int = 300) -> nn.Module:
    """The MLP pre-trained with AdamW on digits 0-4."""
    import torch
    import torch.nn.functional as F

    x, y, _, _ = digits_split(range(5), seed)
    model = _model(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for inputs, targets in sample_batches(x, y, steps, seed):
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
            the artifact that it may load: :func:`default_backends`).
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
        ValueError: ``steps`` is not a positive integer.
    """
    require("sklearn", "tasks")  # before the artifact is loaded or anything trained
    import torch

    from compiledopt.export import Artifact, load_artifact
    from compiledopt.pretrained import resolve
    from compiledopt.runtime import FrozenOptimizer

    out = out or sys.stdout
    artifact = artifact if isinstance(artifact, Artifact) else load_artifact(resolve(artifact))
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"Invalid steps: {steps!r}")
    backends = list(backends if backends is not None else default_backends(artifact))
    check_backends(artifact, backends)  # before anything is trained
    x, y, held_x, held_y = digits_split(range(5, 10), seed + 1)
    batches = sample_batches(x, y, steps, seed + 2)
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
    print(
        f"\nfine-tuning digits 5-9 from an MLP pre-trained on digits 0-4: {steps} steps of {BATCH}",
        file=out,
    )
    print(
        f"  frozen optimizer: {artifact.spec.get('name', artifact.spec['kind'])} artifact, "
        f"lr {frozen_lr:g} (untuned); AdamW: best held-out loss over lr "
        f"{list(ADAMW_SWEEP)} at {best:g}; every run: warm-up 5 % + cosine decay",
        file=out,
    )
    print(
        f"  {'optimizer':<20} {'train loss':>10} {'held-out':>9} {'accuracy':>9} "
        f"{'step (ms)':>10} {'1st step':>9}",
        file=out,
    )
    for name, r in results.items():
        print(
            f"  {name:<20} {r['train_loss']:>10.4f} {r['heldout_loss']:>9.4f} "
            f"{100 * r['accuracy']:>8.1f}% {r['step_ms']:>10.3f} {r['first_step_ms']:>9.1f}",
            file=out,
        )
    return results


def default_backends(artifact: Artifact) -> List[str]:
    """``eager``, ``compiled`` and the artifact's backends that it may load (graphs that are
    code only from a trusted artifact)."""
    return ["eager", "compiled", *(b for b in artifact.backends if artifact.may_load(b))]


def check_backends(artifact: Artifact, backends: Sequence[str]) -> None:
    """Refuse a FrozenOptimizer backend that ``artifact`` does not have, or whose graphs are
    code that it is not trusted to run, naming it."""
    from compiledopt.runtime.routing import BUILT_IN_BACKENDS

    available = ["auto", *BUILT_IN_BACKENDS, *artifact.backends]
    unknown = [b for b in backends if b not in available]
    if unknown:
        raise ValueError(
            f"--backends: {artifact.path} has no backend {unknown[0]!r} "
            f"(available: {', '.join(available)})"
        )
    check_loadable(artifact, backends, "--backends")


def add_parser(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    """Add the ``finetune`` subparser."""
    parser = commands.add_parser(
        "finetune",
        help="fine-tune a pre-trained model with an artifact's frozen optimizer vs AdamW",
        description="Pre-train an MLP on digits 0-4, fine-tune it on digits 5-9 with the "
        "artifact's FrozenOptimizer on each backend and with AdamW (best of an lr sweep); print "
        "loss, accuracy and step time.",
    )
    parser.add_argument("artifact", help="an artifact directory or a packaged optimizer's name")
    parser.add_argument("--steps", type=positive_int, default=200)
    parser.add_argument(
        "--backends",
        default=None,
        help="comma-separated FrozenOptimizer backends (default: eager, "
        "compiled and every backend in the artifact)",
    )
    parser.add_argument(
        "--lr",
        type=positive_float,
        default=None,
        help="the frozen optimizer's lr (default: the artifact's)",
    )
    parser.add_argument("--seed", type=random_seed, default=0, help="in [0, 2**31) (default: 0)")
    add_trust_options(parser)
    return parser


def run(args: argparse.Namespace, out: TextIO) -> int:
    """The ``finetune`` command: :func:`run_finetune` with the command's options."""
    backends = comma_list(args.backends) if args.backends is not None else None
    if backends is not None and not backends:
        raise ValueError(f"--backends {args.backends!r}: needs at least one backend")
    require("sklearn", "tasks")  # before the artifact is loaded
    run_finetune(open_trusted(args), args.steps, backends, args.lr, args.seed, out)
    return 0
