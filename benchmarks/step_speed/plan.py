"""What the benchmark runs: the families, the backends, the configurations and what is left out.

The learned families are read from :data:`compiledopt.learned.catalog.CATALOG` (every entry
with ``learned``): each is benchmarked with the kwargs of :data:`LEARNED_KWARGS` (its defaults
when it has none there) unless :data:`SKIPPED` gives a reason to leave it out, so a newly
registered family shows up in the results. The shape-bound families (:data:`BOUND`: Kronecker,
Meta-Curvature) are export specs of one transform per parameter. The exported backends are
:data:`compiledopt.export.BACKENDS` (the export registry's names), after the runtime's ``eager``
and ``compiled`` and the benchmark's ``compiled-bf16`` (compiled with bfloat16 state).
"""

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from compiledopt.bench import ADAMW, COMPILED_BF16
from compiledopt.export import BACKENDS as EXPORTED
from compiledopt.learned.catalog import CATALOG, build_transform

BACKENDS: Tuple[str, ...] = ("eager", "compiled", COMPILED_BF16, *EXPORTED)
#: ``compiled-bf16`` runs only for families whose state is per coordinate.
BF16_FAMILIES = ("coordinate-mlp",)
#: Backends of the quick run, those of them that exist.
QUICK_BACKENDS = ("eager", "compiled", "torchscript", "onnx")

#: Benchmark kwargs of learned catalog families; a family not listed runs with its defaults.
LEARNED_KWARGS: Dict[str, Dict[str, Any]] = {"coordinate-lstm": {"hidden_size": 20}}
#: Learned catalog families left out of the benchmark, with the reason (written in the notes).
SKIPPED: Dict[str, str] = {
    "celo2": "its ONNX and AOTInductor graphs exist for ranks 0-2 only (the factored axes of a "
    "rank >= 3 tensor depend on its sizes), and the benchmark's convnet has rank-4 kernels",
}
#: The shape-bound families: the artifact spec of each.
BOUND: Dict[str, Dict[str, Any]] = {
    "kronecker": {"kind": "kronecker", "layer": "KroneckerLinear", "bias": False, "psd": True},
    "metacurvature": {"kind": "metacurvature", "lr": 1.0},
}


def learned_families() -> Dict[str, Dict[str, Any]]:
    """The artifact spec of every learned catalog family that is not in :data:`SKIPPED`."""
    return {
        name: {"kind": "shape_agnostic", "name": name, "kwargs": LEARNED_KWARGS.get(name, {})}
        for name, entry in CATALOG.items()
        if entry.learned and name not in SKIPPED
    }


#: Every benchmarked family: its artifact spec.
FAMILIES: Dict[str, Dict[str, Any]] = {**learned_families(), **BOUND}
#: The families of the quick run.
QUICK_FAMILIES = ("coordinate-mlp", "metacurvature")

#: Configurations a full run leaves out to stay near 25 minutes on 2 busy cores: ``(family,
#: backend, minimum parameters, why)``. ``--no-cuts`` runs them.
CUTS: Tuple[Tuple[str, str, int, str], ...] = (
    (
        "coordinate-lstm",
        "torchscript",
        4_000_000,
        "time budget: the TorchScript LSTM runs at the eager reference's speed and takes ~80 s "
        "here at 4M parameters",
    ),
)

#: What runs on the ResNet-18 list: it is there for the compile-time target.
RESNET_PLAN = {"families": ("coordinate-mlp", "metacurvature"), "backends": ("compiled",)}


def is_shape_agnostic(family: str) -> bool:
    return FAMILIES[family]["kind"] == "shape_agnostic"


def plan(settings: Dict[str, Any]) -> List[Tuple[str, ...]]:
    """The configurations, in order: ``("adamw", model, variant)``, ``("export", family, model
    or "", backend)``, ``("run", model, family, backend)``, ``("whole-model",)``,
    ``("bottleneck", model)``."""
    configs: List[Tuple[str, ...]] = []
    for family in [f for f in settings["families"] if is_shape_agnostic(f)]:
        for backend in EXPORTED:
            wanted = backend in settings["backends"] and (
                backend != "aoti" or family in settings["aoti_families"]
            )
            if wanted:
                configs.append(("export", family, "", backend))
    for model in settings["models"]:
        configs += [("adamw", model, variant) for variant in ADAMW]
        for family in settings["families"]:
            if model == "resnet18" and family not in RESNET_PLAN["families"]:
                continue
            backends = [
                b
                for b in settings["backends"]
                if (b != "aoti" or family in settings["aoti_families"])
                and (b != COMPILED_BF16 or family in BF16_FAMILIES)
                and (model != "resnet18" or b in RESNET_PLAN["backends"])
            ]
            if not is_shape_agnostic(family):
                configs += [("export", family, model, b) for b in backends if b in EXPORTED]
            configs += [("run", model, family, b) for b in backends]
    if settings["whole_model"]:
        configs.append(("whole-model",))
    if "coordinate-mlp" in settings["families"] and "compiled" in settings["backends"]:
        sized = [m for m in settings["models"] if m != "resnet18"] or settings["models"]
        configs.append(("bottleneck", "convnet" if "convnet" in sized else sized[0]))
    return configs


def memory_skip(
    family: str, named: Sequence[Tuple[str, Any]], settings: Dict[str, Any]
) -> Optional[str]:
    """A reason to skip ``family`` on this model for memory (its optimizer state, or Kronecker's
    factors, above ``settings["max_state_bytes"]``), or ``None``."""
    from compiledopt.transforms.shapes import kronecker_factors

    numel = sum(p.numel() for _, p in named)
    spec = FAMILIES[family]
    if spec["kind"] == "shape_agnostic":
        # The state of a 64-coordinate vector, per coordinate (a float32 value each).
        probe = torch.zeros(64)
        transform = build_transform(spec["name"], spec["kwargs"])
        per = sum(s.numel() for s in transform.init_state(probe)) / probe.numel()
        need = 4 * per * numel
        what = f"state {need / 2**30:.2f} GiB ({per:.3g} floats a parameter)"
    elif family == "kronecker":
        factors = (kronecker_factors(p.shape) for _, p in named)
        need = sum(4 * (n * n + m * m) for n, m in factors)
        what = f"Kronecker factors {need / 2**30:.2f} GiB"
    else:
        return None
    if need > settings["max_state_bytes"]:
        return f"skipped: memory ({what} > {settings['max_state_bytes'] / 2**30:.1f} GiB)"
    return None


def cut(settings: Dict[str, Any], family: str, backend: str, params: int) -> Optional[str]:
    """The reason of the cut that leaves this configuration out, or ``None``."""
    for cut_family, cut_backend, minimum, why in settings["cuts"]:
        if (family, backend) == (cut_family, cut_backend) and params >= minimum:
            return f"skipped: {why}"
    return None
