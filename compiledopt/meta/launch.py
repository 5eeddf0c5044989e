"""One evolution-strategies run from plain settings, in one process or several.

:func:`train_es` is what ``compiledopt train --estimator pes|es`` calls: it builds the transform
from the catalog and the family by name (both from JSON-able settings, so the function can be
handed to spawned processes), resumes from the checkpoint when asked, trains, and leaves the
result in the checkpoint file. :func:`run_es` runs it in ``processes`` ranks.
"""

import os
import platform
from typing import Any, Dict, Optional

import torch

from compiledopt.learned.catalog import build_transform
from compiledopt.meta.es import ESConfig, ESTrainer
from compiledopt.meta.processes import run_processes
from compiledopt.tasks.families import FAMILIES


def make_family(name: str, seed: int, device: str, kwargs: Optional[Dict[str, Any]] = None):
    """The built-in family ``name`` with extra constructor ``kwargs`` (e.g. augmentation)."""
    if name not in FAMILIES:
        raise ValueError(f"Unknown task family: {name!r} (choose from {sorted(FAMILIES)})")
    try:
        return FAMILIES[name](seed=seed, device=device, **dict(kwargs or {}))
    except TypeError as error:
        raise ValueError(f"Invalid family_kwargs for {name!r}: {kwargs!r} ({error})") from None


def train_es(settings: Dict[str, Any], progress: bool = True) -> None:
    """Train (or resume) the run described by ``settings`` and save its checkpoint.

    ``settings`` keys: ``transform`` and ``transform_kwargs`` (catalog), ``family``,
    ``family_kwargs``, ``seed``, ``device``, ``config`` (an :class:`ESConfig` as a dict),
    ``output`` (checkpoint path), ``resume`` (bool), ``processes`` and ``config_file`` (recorded).
    """
    torch.manual_seed(settings["seed"])
    spec = {"name": settings["transform"], "kwargs": settings["transform_kwargs"]}
    transform = build_transform(spec["name"], spec["kwargs"])
    family = make_family(
        settings["family"], settings["seed"], settings["device"], settings["family_kwargs"]
    )
    config = ESConfig.from_dict(settings["config"])
    training = {
        "task_family": settings["family"],
        "family_kwargs": settings["family_kwargs"],
        "estimator": config.estimator,
        "objective": config.objective,
        "meta_steps": config.outer_steps,
        "truncation": config.truncation,
        "unroll_lengths": [config.min_unroll, config.max_unroll],
        "perturbations_per_task": config.pairs,
        "tasks_per_step": config.tasks_per_step,
        "seed": settings["seed"],
        "config": settings.get("config_file"),
        "processes": settings["processes"],
        "cpu_count": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "torch": str(torch.__version__),
        "lr": config.inner_lr,
        "schedule": {"warmup_fraction": config.warmup_fraction, "decay": "cosine"},
    }
    metadata: Dict[str, Any] = {"transform_spec": spec, "training": training}
    if config.routes is not None:  # what `compiledopt export` writes as the manifest's routes
        training["routes"] = dict(config.routes)
        metadata["routes"] = dict(config.routes)
    trainer = ESTrainer(transform, family, config, seed=settings["seed"], metadata=metadata)
    if settings["resume"]:
        trainer.load(settings["output"])
    trainer.train(checkpoint=settings["output"], progress=progress)
    training = trainer.metadata["training"]
    # Wall time of the training loop summed over resumed runs; CPU time as wall time x the cores
    # the ranks were given (processes x threads each), an upper bound of the CPU time used.
    training["wall_time_s"] = round(trainer.elapsed, 1)
    training["cpu_time_s"] = round(trainer.elapsed * torch.get_num_threads() * trainer.world, 1)
    training["meta_steps_done"] = trainer.outer_step
    if trainer.evaluations:
        training["heldout_final_loss"] = trainer.evaluations[-1]["final_loss"]
    trainer.save(settings["output"])


def run_es(settings: Dict[str, Any], progress: bool = True) -> None:
    """:func:`train_es` in ``settings["processes"]`` ranks (gloo on CPU, NCCL on CUDA)."""
    run_processes(settings["processes"], train_es, settings, progress, device=settings["device"])
