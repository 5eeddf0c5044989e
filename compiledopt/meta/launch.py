"""One meta-training run from plain settings, in one process or several.

:func:`train_run` is what ``compiledopt train`` calls: it builds the transform from the catalog
and the family by name (both from JSON-able settings, so the function can be handed to spawned
processes), resumes from the checkpoint when asked, trains with :class:`~compiledopt.meta.MetaLoop`
and leaves the result in the checkpoint file. :func:`run_meta` runs it in ``processes`` ranks.
"""

import os
import platform
from typing import Any, Dict, Optional

import torch

from compiledopt.learned.catalog import build_transform
from compiledopt.meta.estimator import MetaConfig
from compiledopt.meta.loop import MetaLoop
from compiledopt.meta.processes import run_processes
from compiledopt.meta.stopping import StopRequest
from compiledopt.tasks.families import FAMILIES


def make_family(name: str, seed: int, device: str, kwargs: Optional[Dict[str, Any]] = None):
    """The built-in family ``name`` with extra constructor ``kwargs`` (e.g. augmentation)."""
    if name not in FAMILIES:
        raise ValueError(f"Unknown task family: {name!r} (choose from {sorted(FAMILIES)})")
    try:
        return FAMILIES[name](seed=seed, device=device, **dict(kwargs or {}))
    except TypeError as error:
        raise ValueError(f"Invalid family_kwargs for {name!r}: {kwargs!r} ({error})") from None


def _training(settings: Dict[str, Any], config: MetaConfig) -> Dict[str, Any]:
    """How the run was produced, as the checkpoint's ``metadata["training"]`` records it."""
    training = {
        "task_family": settings["family"],
        "family_kwargs": settings["family_kwargs"],
        **{k: v for k, v in settings["config"].items() if v is not None and k != "routes"},
        "config": settings.get("config_file"),
        "processes": settings["processes"],
        "cpu_count": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "torch": str(torch.__version__),
        "lr": config.inner_lr,
    }
    if config.warmup_fraction is not None:  # pes, es: the inner lr's schedule
        training["schedule"] = {"warmup_fraction": config.warmup_fraction, "decay": "cosine"}
    return training


def train_run(settings: Dict[str, Any], progress: bool = True) -> None:
    """Train (or resume) the run described by ``settings`` and save its checkpoint.

    ``settings`` keys: ``transform`` and ``transform_kwargs`` (catalog), ``family``,
    ``family_kwargs``, ``device``, ``config`` (a :class:`MetaConfig` as a dict), ``output``
    (checkpoint path), ``resume`` (bool), ``allow_changes`` (config settings a resumed run may
    change), ``changes`` (changes of other settings to record), ``processes`` and
    ``config_file`` (recorded).
    """
    config = MetaConfig.from_dict(settings["config"])
    torch.manual_seed(config.seed)
    spec = {"name": settings["transform"], "kwargs": settings["transform_kwargs"]}
    transform = build_transform(spec["name"], spec["kwargs"])
    family = make_family(
        settings["family"], config.seed, settings["device"], settings["family_kwargs"]
    )
    training = _training(settings, config)
    metadata: Dict[str, Any] = {
        "transform_spec": spec,
        "family_kwargs": settings["family_kwargs"],
        "training": training,
    }
    if config.routes is not None:  # what `compiledopt export` writes as the manifest's routes
        metadata["routes"] = dict(config.routes)
    loop = MetaLoop(transform, family, config, metadata=metadata)
    if settings["resume"]:
        loop.load(settings["output"], settings.get("allow_changes", ()))
        loop.metadata["training"] = training
        changes = settings.get("changes") or []
        if changes:  # settings outside the config, e.g. family_kwargs
            loop.metadata["config_changes"] = loop.metadata.get("config_changes", []) + [
                {"meta_step": loop.meta_step, **change} for change in changes
            ]
    # SIGTERM or Ctrl-C ends the run at a meta-step boundary, checkpointed (see meta.stopping).
    with StopRequest() as stop:
        result = loop.train(checkpoint=settings["output"], progress=progress, stop=stop)
    if result.stopped:  # what the summary says, and no final evaluation: asked to end
        training["stopped_by"] = stop.received or "another rank"
    elif not result.evaluations or result.evaluations[-1]["step"] != result.meta_step:
        loop.evaluate()  # the summary reports the trained weights' held-out loss
    # Wall time of the training loop summed over resumed runs; CPU time as wall time x the cores
    # the ranks were given (processes x threads each), an upper bound of the CPU time used.
    training["wall_time_s"] = round(loop.elapsed, 1)
    training["cpu_time_s"] = round(loop.elapsed * torch.get_num_threads() * loop.world, 3)
    training["meta_steps_done"] = loop.meta_step
    if loop.evaluations:
        training["heldout_final_loss"] = loop.evaluations[-1]["final_loss"]
    loop.save(settings["output"])


def run_meta(settings: Dict[str, Any], progress: bool = True) -> None:
    """:func:`train_run` in ``settings["processes"]`` ranks (gloo on CPU, NCCL on CUDA)."""
    run_processes(settings["processes"], train_run, settings, progress, device=settings["device"])
