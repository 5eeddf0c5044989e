"""The order in which ``backend="auto"`` tries the backends: measured, per machine.

Which backend is fastest depends on the rule, the device, the thread count and the model: on two
CPU cores the compiled backend beats AOTInductor on a ResNet-18 while onnxruntime wins on some
small bound rules. :func:`compiledopt.runtime.measure.measure_backends` times one optimizer step of
every backend an artifact can run, on a parameter list the caller gives (by default a small mixed
model), and records the medians here in a cache file (:func:`record_timings`); ``auto`` then tries
the backends fastest first for that artifact, device type, thread count and size class
(:func:`size_class`: the parameters' total elements within a factor of 16, so a timing taken on a
small model never chooses for a large one, where the ranking differs: per-call overheads dominate
small steps, bandwidth large ones). Without a recording it uses :func:`default_order`:
:data:`DEFAULT_ORDER`, measured on two-core x86 machines with the packaged optimizer, with any
other export backend registered at the time before ``eager``.

The cache is ``$COMPILEDOPT_CACHE/backend-timings.json`` (default
``$XDG_CACHE_HOME/compiledopt`` or ``~/.cache/compiledopt``): a cache, safe to delete; an
unreadable or malformed file is ignored (and replaced by the next recording; see
:mod:`~compiledopt.runtime.timings`).
"""

import math
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch

from compiledopt.cache import CACHE_VARIABLE, cache_root
from compiledopt.runtime.backends import runtime_backends
from compiledopt.runtime.timings import MAX_CACHE_BYTES, digest, read_timings, write_timings

__all__ = [
    "CACHE_VARIABLE",
    "DEFAULT_ELEMENTS",
    "DEFAULT_ORDER",
    "DEFAULT_SHAPES",
    "MAX_CACHE_BYTES",
    "cache_file",
    "default_order",
    "digest",
    "measured_order",
    "record_timings",
    "size_class",
]


#: ``auto``'s order where nothing was measured (fastest first, ``eager`` always last): the
#: compiled backend batches small tensors and fuses each rule into one loop; AOTInductor runs one
#: exported graph per tensor; onnxruntime and TorchScript do not fuse on the CPU.
DEFAULT_ORDER = ("compiled", "aoti", "onnx", "torchscript", "eager")


def default_order() -> Tuple[str, ...]:
    """``auto``'s order where nothing was measured, for the backends registered now: those of
    :data:`DEFAULT_ORDER` that are, then every other registered export backend (in registration
    order), ``eager`` last."""
    known = runtime_backends()
    first = [b for b in DEFAULT_ORDER if b in known and b != "eager"]
    return (*first, *(b for b in known if b not in first and b != "eager"), "eager")


def cache_file() -> Path:
    """The file that holds the recorded timings (not created here)."""
    return cache_root() / "backend-timings.json"


def size_class(elements: int) -> str:
    """The size class of parameters holding ``elements`` elements in all: ``"2^k"`` for the
    classes ``[2^k, 2^(k+4))`` with ``k`` a multiple of 4 (``"2^0"`` up to 15 elements, ``"2^16"``
    from 65,536 to about a million, ...)."""
    if not isinstance(elements, int) or isinstance(elements, bool) or elements < 0:
        raise ValueError(f"Invalid elements: {elements!r} (an integer >= 0)")
    return f"2^{(max(elements, 1).bit_length() - 1) // 4 * 4}"


def _key(artifact, device: torch.device, threads: int, elements: int) -> str:
    """One recording's key: the artifact, the device type, the thread count, the torch version
    (a new torch may change every timing) and the parameters' size class."""
    device_type = torch.device(device).type
    return f"{digest(artifact)}|{device_type}|{threads}|{torch.__version__}|{size_class(elements)}"


def measured_order(
    artifact,
    device: "torch.device | str",
    threads: Optional[int] = None,
    elements: Optional[int] = None,
) -> Tuple[str, ...]:
    """The backends in ``auto``'s order for ``artifact`` on ``device`` with ``threads`` threads
    (default: torch's current count) and parameters of ``elements`` elements in all (default:
    those ``measure_backends`` times when given none): those recorded by
    :func:`~compiledopt.runtime.measure.measure_backends` for that size class
    (:func:`size_class`), fastest first, then the others in :func:`default_order` (which reads
    the backends registered now); ``eager``, which always runs, last. A recording from another
    size class is never used."""
    threads = torch.get_num_threads() if threads is None else threads
    elements = DEFAULT_ELEMENTS if elements is None else elements
    timings = read_timings(cache_file()).get(
        _key(artifact, torch.device(device), threads, elements), {}
    )
    default = default_order()
    measured = sorted((t, b) for b, t in timings.items() if b in default and b != "eager")
    order = [b for _, b in measured]
    return (*order, *(b for b in default if b not in order and b != "eager"), "eager")


DEFAULT_SHAPES = [(256, 256)] * 4 + [(64, 32, 3, 3)] * 2 + [(256,)] * 24 + [(1 << 18,)]
#: The parameter shapes (and their elements in all) ``measure_backends`` times when given none.
DEFAULT_ELEMENTS = sum(math.prod(s) for s in DEFAULT_SHAPES)


def record_timings(
    artifact, device: torch.device, elements: int, timings: Dict[str, float]
) -> None:
    """Record ``timings`` (backend -> median seconds of one step) of ``artifact`` on ``device``
    with this thread count, for parameters of ``elements`` elements in all (what
    :func:`compiledopt.runtime.measure.measure_backends` measured)."""
    write_timings(cache_file(), _key(artifact, device, torch.get_num_threads(), elements), timings)
