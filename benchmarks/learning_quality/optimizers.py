"""The optimizers compared, their learning-rate sweeps, and the schedule they all share.

Four kinds, each run at every lr of its sweep:

* ``learned``: the artifact under test (``--optimizer``) through
  :class:`~compiledopt.runtime.FrozenOptimizer`, at its default lr (``--optimizer-lr``, else the
  manifest's) times :data:`LEARNED_FACTORS` (1 is the untuned default);
* ``old``: the repository's earlier ``export/coordinate-mlp`` artifact at its manifest lr times
  :data:`OLD_FACTORS`;
* ``adamw``: ``torch.optim.AdamW`` over :data:`ADAMW_LRS` (1e-3 is the untuned default, and
  3e-3 a second untuned baseline reported beside it: :data:`ADAMW_UNTUNED_LRS`);
* ``sgd``: ``torch.optim.SGD`` with momentum 0.9 over :data:`SGD_LRS`.

The learned kinds get the model's parameter groups with roles (``compiledopt.param_groups``,
where it exists) unless ``--roles none`` (:func:`learned_params`).

Every run uses the same weight decay (``--weight-decay``, default 0: decoupled for the learned kinds
and AdamW, torch's L2 term for SGD) and the same schedule (:func:`warmup_cosine`): a linear
warm-up over the first 5% of the steps, then a cosine decay to 0, through
``torch.optim.lr_scheduler.LambdaLR``. With ``--default-lr-only`` each kind runs at its untuned
default lr alone (:func:`plan`; SGD has none and is left out). ``--lrs KIND=LR[,LR...]`` replaces
a kind's sweep by the given lrs, its untuned baselines added where missing.
"""

import functools
import importlib
import math
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Union

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from benchmarks.learning_quality import scaling

KINDS = ("learned", "old", "adamw", "sgd")
LABELS = {
    "learned": "learned",
    "old": "coordinate-mlp (old)",
    "adamw": "AdamW",
    "sgd": "SGD+momentum",
}
ADAMW_LRS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
ADAMW_DEFAULT_LR = 1e-3
#: Untuned AdamW baselines reported for every task (the first is the default).
ADAMW_UNTUNED_LRS = (1e-3, 3e-3)
SGD_LRS = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)
SGD_MOMENTUM = 0.9
#: Multiples of the learned optimizer's default lr (with lr 1e-3: 3e-4, 1e-3, ..., 3e-2).
LEARNED_FACTORS = (0.3, 1.0, 3.0, 10.0, 30.0)
OLD_FACTORS = (0.3, 1.0, 3.0)
#: ``--quick``: two learning rates per sweep (factors for the learned kinds).
QUICK_SWEEPS = {
    "learned": (1.0, 3.0),
    "old": (1.0, 0.3),
    "adamw": (1e-3, 3e-3),
    "sgd": (1e-2, 1e-1),
}
WARMUP_FRACTION = 0.05
#: ``--roles``: how the learned kinds get the parameters (see :func:`learned_params`).
ROLES = ("auto", "none")
DEFAULT_ROLES = "auto"
#: The earlier learned optimizer of the repository, compared at its manifest lr.
OLD_ARTIFACT = Path(__file__).resolve().parents[2] / "export" / "coordinate-mlp"


def clean_lr(lr: float) -> float:
    """``lr`` to 4 significant digits, so that ``1e-3 * 3`` and ``3e-3`` are one lr."""
    return float(f"{lr:.4g}")


def resolve_artifact(name_or_path: str) -> str:
    """The artifact folder ``name_or_path`` names: the folder itself if it exists, else what
    ``compiledopt.pretrained.resolve`` returns for the name, where that module exists."""
    path = Path(name_or_path)
    if path.is_dir():
        return str(path)
    try:
        pretrained = importlib.import_module("compiledopt.pretrained")
    except ModuleNotFoundError as error:
        if error.name not in ("compiledopt.pretrained", "compiledopt"):
            raise
        pretrained = None
    if pretrained is not None and hasattr(pretrained, "resolve"):
        return str(pretrained.resolve(name_or_path))
    raise FileNotFoundError(f"no artifact folder {name_or_path!r} (and no packaged optimizers)")


@functools.lru_cache(maxsize=4)
def artifact(path: str) -> Any:
    """The artifact at ``path``, loaded once per process. Trusted to run its code graphs: the
    benchmark runs only the artifacts and backends its user names on the command line."""
    from compiledopt.export import load_artifact

    return load_artifact(path, trust_code=True)


def manifest_lr(path: str) -> float:
    return float(artifact(path).manifest["lr"])


def artifact_name(path: str) -> str:
    spec = artifact(path).spec
    return str(spec.get("name", spec.get("kind")))


def backend_for(path: str, requested: str) -> str:
    """``requested``, or for ``auto`` TorchScript where the artifact has it, else eager (both
    deterministic and free of compile time)."""
    if requested != "auto":
        return requested
    return "torchscript" if "torchscript" in artifact(path).backends else "eager"


def warmup_cosine(step: int, total: int, warmup_fraction: float = WARMUP_FRACTION) -> float:
    """The lr multiplier of ``step`` (0-based) of ``total``: ``(step + 1) / w`` over the first
    ``w = max(1, round(warmup_fraction · total))`` steps, then ``(1 + cos(π·t)) / 2`` with ``t``
    going from 0 after the warm-up to 1 at step ``total``."""
    warmup = max(1, round(warmup_fraction * total))
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def schedule(optimizer: Optimizer, total: int) -> LambdaLR:
    """The shared schedule (:func:`warmup_cosine`) of a run of ``total`` steps."""
    return LambdaLR(optimizer, lambda step: warmup_cosine(step, total))


def learned_params(model: Union[nn.Module, Iterable[torch.Tensor]], roles: str) -> Any:
    """What a learned optimizer is given: with ``roles="auto"`` and a model, the parameter groups
    of ``compiledopt.param_groups(model)`` (dicts with ``params``, ``param_names`` and ``role``)
    where compiledopt has that function; otherwise the plain parameters."""
    if roles not in ROLES:
        raise ValueError(f"Unknown roles: {roles!r} (one of {ROLES})")
    if not isinstance(model, nn.Module):
        return model
    if roles == "auto":
        import compiledopt

        if hasattr(compiledopt, "param_groups"):
            return compiledopt.param_groups(model)
    return model.parameters()


def build(
    kind: str,
    model: Union[nn.Module, Iterable[torch.Tensor]],
    lr: float,
    paths: Dict[str, str],
    backends: Dict[str, str],
    roles: str = DEFAULT_ROLES,
    weight_decay: float = 0.0,
    matrix_scale: str = "none",
) -> Optimizer:
    """An optimizer of ``kind`` at ``lr`` over ``model``'s parameters.

    Args:
        model: the model (or its parameters): the learned kinds take it through
            :func:`learned_params`, the others take ``model.parameters()``.
        paths: artifact folder of each learned kind (``learned``, ``old``).
        backends: FrozenOptimizer backend of each learned kind.
        roles: ``auto`` (parameter groups with roles, where compiledopt builds them) or
            ``none`` (plain parameters) for the learned kinds.
        weight_decay: decoupled (``p ← p − lr·wd·p``) for the learned kinds and AdamW; for SGD
            torch's L2 term added to the gradient.
        matrix_scale: for the learned kinds, how their matrices' steps are scaled (see
            :mod:`~benchmarks.learning_quality.scaling`; ``none``: not at all).
    """
    params = model.parameters() if isinstance(model, nn.Module) else model
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=SGD_MOMENTUM, weight_decay=weight_decay)
    if kind in ("learned", "old"):
        from compiledopt.runtime import FrozenOptimizer

        groups = learned_params(model, roles)
        learned = FrozenOptimizer(
            groups,
            artifact(paths[kind]),
            lr=lr,
            backend=backends[kind],
            weight_decay=weight_decay,
        )
        return scaling.attach(learned, matrix_scale)
    raise ValueError(f"Unknown optimizer kind: {kind!r} (one of {KINDS})")


def sweep(kind: str, default_lr: Optional[float], quick: bool) -> List[float]:
    """The learning rates ``kind`` runs at (for the learned kinds, multiples of ``default_lr``)."""
    values: Sequence[float]
    if quick:
        values = QUICK_SWEEPS[kind]
    else:
        values = {
            "learned": LEARNED_FACTORS,
            "old": OLD_FACTORS,
            "adamw": ADAMW_LRS,
            "sgd": SGD_LRS,
        }[kind]
    if kind in ("learned", "old"):
        if default_lr is None:
            raise ValueError(f"{kind} needs its default lr")
        values = [default_lr * factor for factor in values]
    return sorted({clean_lr(v) for v in values})


def defaults(learned_lr: float, old_lr: Optional[float]) -> Dict[str, float]:
    """The untuned lr of each kind that has one."""
    result = {"learned": clean_lr(learned_lr), "adamw": ADAMW_DEFAULT_LR}
    if old_lr is not None:
        result["old"] = clean_lr(old_lr)
    return result


def plan(
    learned_lr: float,
    old_lr: Optional[float],
    quick: bool,
    default_only: bool = False,
    grids: Optional[Dict[str, List[float]]] = None,
) -> Dict[str, List[float]]:
    """Every kind's sweep (the ``old`` kind only when ``old_lr`` is given); each includes the
    kind's default lr. ``default_only``: each kind with a default lr at that lr alone (no SGD).
    ``grids`` (``--lrs``): kind -> the lrs replacing its sweep; the untuned baselines (each
    kind's default lr, AdamW's :data:`ADAMW_UNTUNED_LRS`) are still added where missing."""
    if default_only:
        untuned = defaults(learned_lr, old_lr)
        return {kind: [untuned[kind]] for kind in KINDS if kind in untuned}
    grids = grids or {}
    result = {"learned": sweep("learned", learned_lr, quick)}
    if old_lr is not None:
        result["old"] = sweep("old", old_lr, quick)
    result["adamw"] = sweep("adamw", None, quick)
    result["sgd"] = sweep("sgd", None, quick)
    for kind in result:
        if kind in grids:
            result[kind] = sorted({clean_lr(lr) for lr in grids[kind]})
    wanted = [(kind, lr) for kind, lr in defaults(learned_lr, old_lr).items()]
    wanted += [("adamw", lr) for lr in ADAMW_UNTUNED_LRS]
    for kind, lr in wanted:
        if lr not in result[kind]:
            result[kind] = sorted([*result[kind], lr])
    return result
