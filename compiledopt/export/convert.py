"""Importing published Celo2 weights: a PyLO ``state_dict`` → a compiledopt Celo2 artifact.

PyLO (github.com/Belilovsky-Lab/pylo) runs Celo2 in PyTorch with one of two network classes,
whose ``state_dict`` layouts this module reads (``H`` the hidden width, ``w_i`` the width of
feature group ``i``, :func:`compiledopt.learned.celo2.feature_widths`):

* ``Celo2MLP`` (used by ``Celo2_naive``): ``first_layer_weights.{i}`` ``(H, w_i)`` for the 14
  feature groups, ``first_layer_bias`` ``(H,)``, ``hidden.weight`` ``(H, H)``, ``hidden.bias``,
  ``output.weight`` ``(3, H)``, ``output.bias`` (``torch.nn.Linear`` orientation). A later
  revision of the same class stores the first layer dense, ``first_layer.weight`` ``(H, Σ w_i)``
  and ``first_layer.bias``: both forms are read (never both at once).
* ``CELO2MLP`` (used by ``CELO2_naive``, published on the Hugging Face Hub): ``w0.{i}``
  ``(w_i, H)``, ``b0`` ``(H,)``, ``dense_w.{j}`` ``(H, H)`` and a last ``(H, out)``,
  ``dense_b.{j}`` (inputs-by-outputs orientation, as the JAX original stores them). The
  activation is not in the ``state_dict``: it is read from the ``config.json`` beside the
  weights when there is one, else given (``relu`` by default).

Every tensor is mapped exactly (transposed where the orientation differs) onto a
:class:`~compiledopt.learned.celo2.Celo2`; a key that does not belong, a missing key, a wrong
shape, a non-floating or non-finite tensor, or keys of both layouts, are refused with a
``ValueError`` naming it. Each layout also fixes what PyLO's optimizer around it does:
``Celo2_naive`` runs Adam on raw gradients (``adam_clip=False``) for vectors, embeddings and
the first and last matrices; ``CELO2_naive`` on gradients clipped like the learned path's, for
vectors and embeddings. These become the artifact's ``routes``.
"""

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from compiledopt.export.writer import export_shape_agnostic
from compiledopt.learned.celo2 import ACTIVATIONS, FEATURE_GROUPS, Celo2

__all__ = [
    "LAYOUTS",
    "ROUTES",
    "Imported",
    "convert_celo2",
    "detect_layout",
    "import_celo2",
    "read_state_dict",
]

LAYOUTS = ("Celo2MLP", "CELO2MLP")
#: The rule of each parameter role in PyLO's optimizer of each layout.
ROUTES: Dict[str, Dict[str, str]] = {
    "Celo2MLP": {"embedding": "adam", "input": "adam", "head": "adam"},
    "CELO2MLP": {"embedding": "adam"},
}
#: The Celo2 options each layout's optimizer implies (see the module doc).
_LAYOUT_OPTIONS: Dict[str, Dict[str, Any]] = {
    "Celo2MLP": {"adam_clip": False},
    "CELO2MLP": {"adam_clip": True},
}
#: Options that the weights decide (refused in ``options``).
_ARCHITECTURE = ("hidden_size", "hidden_layers", "output_size", "activation")
#: A Celo2 network holds a few thousand numbers: a larger file is not one.
MAX_BYTES = 64 << 20
_OLD_GROUPED = re.compile(r"first_layer_weights\.(\d+)")
_OLD_FIXED = (
    "first_layer_bias",
    "first_layer.weight",
    "first_layer.bias",
    "hidden.weight",
    "hidden.bias",
    "output.weight",
    "output.bias",
)
_NEW = re.compile(r"(w0|dense_w|dense_b)\.(\d+)|b0")

Source = Union[Mapping[str, Any], str, "os.PathLike[str]"]


class Imported(NamedTuple):
    """A Celo2 network read from a PyLO ``state_dict``.

    Attributes:
        transform (Celo2): the transform with the weights mapped in (float32).
        layout (str): ``"Celo2MLP"`` or ``"CELO2MLP"``.
        kwargs (dict): the constructor keywords that rebuild ``transform`` (JSON values).
        routes (dict): the rule of each parameter role in PyLO's optimizer of that layout.
        provenance (dict): where the weights came from (layout, file, its sha256).
    """

    transform: Celo2
    layout: str
    kwargs: Dict[str, Any]
    routes: Dict[str, str]
    provenance: Dict[str, Any]


class _Recorded(dict):
    """A state_dict that records the keys a mapping reads (``[]`` and ``get``)."""

    def __init__(self, data: Mapping[str, Any]) -> None:
        super().__init__(data)
        self.read: set = set()

    def __getitem__(self, key: str) -> Any:
        self.read.add(key)
        return super().__getitem__(key)

    def get(self, key: str, default: Any = None) -> Any:
        self.read.add(key)
        return super().get(key, default)


def _layout_of(key: str) -> Optional[str]:
    if key in _OLD_FIXED or _OLD_GROUPED.fullmatch(key):
        return "Celo2MLP"
    if _NEW.fullmatch(key):
        return "CELO2MLP"
    return None


def detect_layout(state_dict: Mapping[str, Any]) -> str:
    """The layout (:data:`LAYOUTS`) of ``state_dict``'s keys; ``ValueError`` when its keys
    belong to neither, or to both (naming one of each)."""
    found: Dict[str, str] = {}
    for key in state_dict:
        layout = _layout_of(str(key))
        if layout is not None:
            found.setdefault(layout, str(key))
    if len(found) == 2:
        raise ValueError(
            f"ambiguous layout: {found['Celo2MLP']!r} is a Celo2MLP key and "
            f"{found['CELO2MLP']!r} a CELO2MLP key; pass a state_dict of one network"
        )
    if not found:
        keys = sorted(str(k) for k in state_dict)
        shown = ", ".join(repr(k) for k in keys[:6]) + (", ..." if len(keys) > 6 else "")
        raise ValueError(
            "not a PyLO Celo2 state_dict: no key of Celo2MLP (first_layer_weights.N, "
            f"first_layer_bias, hidden.*, output.*) nor of CELO2MLP (w0.N, b0, dense_w.N, "
            f"dense_b.N); its keys: {shown or 'none'}"
        )
    return next(iter(found))


def read_state_dict(source: Source) -> Tuple[Dict[str, Any], Dict[str, Any], Dict[str, Any]]:
    """``(state_dict, config, provenance)`` from a mapping or a path.

    A path may be a ``.safetensors`` file, a file ``torch.load`` reads with ``weights_only=True``
    (``.pt``, ``.pth``, ``.bin``), or a folder as the Hugging Face Hub stores a model
    (``model.safetensors``, else ``pytorch_model.bin``). ``config`` is the ``config.json``
    beside a file of those two names (``{}`` if none, or for other files). A file that cannot
    be read, or is larger than :data:`MAX_BYTES`, is a ``ValueError`` naming it.
    """
    if isinstance(source, Mapping):
        return dict(source), {}, {"source": "state_dict"}
    if not isinstance(source, (str, os.PathLike)):
        raise ValueError(f"expected a state_dict or a path, got {type(source).__name__}")
    path = Path(source)
    if path.is_dir():
        candidates = [path / "model.safetensors", path / "pytorch_model.bin"]
        found = [c for c in candidates if c.is_file()]
        if not found:
            raise ValueError(f"{path}: holds neither model.safetensors nor pytorch_model.bin")
        path = found[0]
    if not path.is_file():
        raise FileNotFoundError(f"{path}: No such file")
    size = path.stat().st_size
    if size > MAX_BYTES:
        raise ValueError(f"{path}: {size:,} bytes, too large for a Celo2 network's weights")
    data = path.read_bytes()
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load

            loaded: Any = load(data)
        else:
            import io

            loaded = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as error:
        first = (str(error).strip().splitlines() or [""])[0]
        raise ValueError(
            f"{path}: cannot be read as a state_dict ({type(error).__name__}: {first[:200]})"
        ) from None
    if not isinstance(loaded, Mapping):
        raise ValueError(f"{path}: holds a {type(loaded).__name__}, not a state_dict")
    provenance = {"file": path.name, "sha256": hashlib.sha256(data).hexdigest()}
    hub = path.name in ("model.safetensors", "pytorch_model.bin")  # its config.json beside it
    config = _read_config(path.parent / "config.json") if hub else {}
    return dict(loaded), config, provenance


def _read_config(path: Path) -> Dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_bytes()[: 1 << 20])
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(config).__name__}")
    return config


def _tensor(state_dict: Mapping[str, Any], key: str, shape: Sequence[int], what: str) -> Tensor:
    """``state_dict[key]``, checked: a floating tensor of ``shape`` with finite values."""
    if key not in state_dict:
        raise ValueError(f"missing key {key!r} ({what}, shape {tuple(shape)})")
    value = state_dict[key]
    if not isinstance(value, Tensor) or not value.is_floating_point():
        kind = value.dtype if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(f"key {key!r} is {kind}, not a floating-point tensor")
    if tuple(value.shape) != tuple(shape):
        raise ValueError(
            f"key {key!r} has shape {tuple(value.shape)}, expected {tuple(shape)} ({what})"
        )
    value = value.detach().to("cpu", torch.float32)
    if not bool(torch.isfinite(value).all()):
        raise ValueError(f"key {key!r} holds NaN or infinite values")
    return value


def _length(state_dict: Mapping[str, Any], key: str, what: str, least: int) -> int:
    """The length of the 1-d floating tensor ``state_dict[key]`` (at least ``least``)."""
    value = state_dict.get(key)
    if key not in state_dict:
        raise ValueError(f"missing key {key!r} ({what})")
    if not isinstance(value, Tensor) or not value.is_floating_point():
        kind = value.dtype if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(f"key {key!r} is {kind}, not a floating-point tensor")
    if value.dim() != 1 or value.shape[0] < least:
        raise ValueError(
            f"key {key!r} has shape {tuple(value.shape)}, expected (n,) with n >= {least} ({what})"
        )
    return int(value.shape[0])


def _indices(keys: Sequence[str], pattern: "re.Pattern[str]", what: str) -> int:
    """How many keys ``pattern`` numbers ``0 … n-1``; ``ValueError`` naming a gap."""
    numbers = sorted(int(m.group(m.lastindex or 0)) for k in keys if (m := pattern.fullmatch(k)))
    for expected, number in enumerate(numbers):
        if number != expected:
            raise ValueError(f"missing key {what.format(expected)!r} (keys are numbered from 0)")
    return len(numbers)


def _check_known(state_dict: Mapping[str, Any], layout: str) -> None:
    for key in state_dict:
        if not isinstance(key, str) or _layout_of(key) != layout:
            raise ValueError(f"unknown key {key!r} for a {layout} state_dict")


def _map_old(state_dict: Mapping[str, Any], widths: List[int]) -> Tuple[Dict[str, Tensor], dict]:
    """Celo2MLP → Celo2's state_dict, and the architecture."""
    grouped = [k for k in state_dict if _OLD_GROUPED.fullmatch(k)]
    dense = [k for k in ("first_layer.weight", "first_layer.bias") if k in state_dict]
    if grouped and dense:
        raise ValueError(
            f"ambiguous first layer: both {grouped[0]!r} (per feature group) and {dense[0]!r} "
            "(dense) are present"
        )
    bias_key = "first_layer.bias" if dense else "first_layer_bias"
    hidden = _length(state_dict, bias_key, "the first layer's bias", 1)
    out = _length(state_dict, "output.bias", "the output layer's bias", 2)
    if dense:
        weight = _tensor(state_dict, "first_layer.weight", (hidden, sum(widths)), "first layer")
    else:
        count = _indices(grouped, _OLD_GROUPED, "first_layer_weights.{}")
        if count != len(widths):
            key = f"first_layer_weights.{min(count, len(widths))}"
            raise ValueError(
                f"{'missing' if count < len(widths) else 'unknown'} key {key!r} (Celo2MLP has "
                f"{len(widths)} feature groups)"
            )
        parts = [
            _tensor(state_dict, f"first_layer_weights.{i}", (hidden, w), f"group {name!r}")
            for i, (name, w) in enumerate(zip(FEATURE_GROUPS, widths))
        ]
        weight = torch.cat(parts, dim=1)
    mapped = {
        "input_layer.weight": weight,
        "input_layer.bias": _tensor(state_dict, bias_key, (hidden,), "first layer bias"),
        "hidden.0.weight": _tensor(state_dict, "hidden.weight", (hidden, hidden), "hidden"),
        "hidden.0.bias": _tensor(state_dict, "hidden.bias", (hidden,), "hidden bias"),
        "head.weight": _tensor(state_dict, "output.weight", (out, hidden), "output layer"),
        "head.bias": _tensor(state_dict, "output.bias", (out,), "output bias"),
    }
    return mapped, {"hidden_size": hidden, "hidden_layers": 2, "output_size": out}


def _map_new(state_dict: Mapping[str, Any], widths: List[int]) -> Tuple[Dict[str, Tensor], dict]:
    """CELO2MLP → Celo2's state_dict (weights transposed), and the architecture."""
    hidden = _length(state_dict, "b0", "the first layer's bias", 1)
    keys = list(state_dict)
    groups = _indices(keys, re.compile(r"w0\.(\d+)"), "w0.{}")
    if groups != len(widths):
        key = f"w0.{min(groups, len(widths))}"
        raise ValueError(
            f"{'missing' if groups < len(widths) else 'unknown'} key {key!r} (CELO2MLP has "
            f"{len(widths)} feature groups)"
        )
    layers = _indices(keys, re.compile(r"dense_w\.(\d+)"), "dense_w.{}")
    if layers == 0:
        raise ValueError("missing key 'dense_w.0' (CELO2MLP has at least one dense layer)")
    if _indices(keys, re.compile(r"dense_b\.(\d+)"), "dense_b.{}") != layers:
        raise ValueError(f"dense_b.N keys do not match the {layers} dense_w.N keys")
    last = state_dict[f"dense_w.{layers - 1}"]
    if not isinstance(last, Tensor) or last.dim() != 2 or last.shape[1] < 2:
        shape = tuple(last.shape) if isinstance(last, Tensor) else type(last).__name__
        raise ValueError(
            f"key 'dense_w.{layers - 1}' has shape {shape}, expected ({hidden}, out), out >= 2"
        )
    out = int(last.shape[1])
    parts = [
        _tensor(state_dict, f"w0.{i}", (w, hidden), f"group {name!r}").t()
        for i, (name, w) in enumerate(zip(FEATURE_GROUPS, widths))
    ]
    mapped = {
        "input_layer.weight": torch.cat(parts, dim=1).contiguous(),
        "input_layer.bias": _tensor(state_dict, "b0", (hidden,), "first layer bias"),
    }
    for j in range(layers):
        width = out if j == layers - 1 else hidden
        name = "head" if j == layers - 1 else f"hidden.{j}"
        w = _tensor(state_dict, f"dense_w.{j}", (hidden, width), "dense layer")
        mapped[f"{name}.weight"] = w.t().contiguous()
        mapped[f"{name}.bias"] = _tensor(state_dict, f"dense_b.{j}", (width,), "dense bias")
    return mapped, {"hidden_size": hidden, "hidden_layers": layers, "output_size": out}


def _check_config(config: Mapping[str, Any], found: Dict[str, Any], widths: List[int]) -> None:
    """The ``config.json`` beside CELO2MLP weights agrees with what the weights say."""
    for key, value in found.items():
        if key in config and config[key] != value:
            raise ValueError(f"config.json says {key}={config[key]!r}, the weights {value!r}")
    dims = config.get("feature_dims")
    if dims is not None and list(dims) != widths:
        raise ValueError(f"config.json says feature_dims={dims!r}, Celo2 reads {widths}")


def import_celo2(
    source: Source,
    layout: str = "auto",
    activation: Optional[str] = None,
    options: Optional[Mapping[str, Any]] = None,
) -> Imported:
    """Read a PyLO Celo2 ``state_dict`` (a mapping, a file or a Hub folder, see
    :func:`read_state_dict`) into a :class:`~compiledopt.learned.celo2.Celo2`.

    Args:
        source: the weights.
        layout (str, optional): ``"auto"`` (from the keys), ``"Celo2MLP"`` or ``"CELO2MLP"``.
        activation (str, optional): ``"relu"`` or ``"tanh"``; ``None``: the ``config.json``'s,
            else ``"relu"`` (Celo2MLP is always ReLU).
        options (mapping, optional): other :class:`Celo2` keywords (decays, ``exp_mult``,
            ``orthogonalize`` …) over the layout's (the architecture comes from the weights).

    Raises:
        ValueError: an unknown, missing or mis-shaped key, keys of both layouts, an option
            that contradicts the weights, an unreadable file; each names what is wrong.
    """
    state_dict, config, provenance = read_state_dict(source)
    if layout == "auto":
        layout = detect_layout(state_dict)
    elif layout not in LAYOUTS:
        raise ValueError(f"Invalid layout: {layout!r} (one of {('auto', *LAYOUTS)})")
    _check_known(state_dict, layout)
    options = dict(options or {})
    fixed = [key for key in options if key in _ARCHITECTURE]
    if fixed:
        raise ValueError(f"option {fixed[0]!r} is decided by the weights (or activation=)")
    kwargs: Dict[str, Any] = {**_LAYOUT_OPTIONS[layout], **options}
    probe = Celo2(hidden_size=1, hidden_layers=1, **kwargs)  # the options checked, the widths
    widths = list(probe.widths)
    mapper = _map_old if layout == "Celo2MLP" else _map_new
    recorded = _Recorded(state_dict)
    mapped, architecture = mapper(recorded, widths)
    unused = sorted(set(state_dict) - recorded.read)
    if unused:  # e.g. first_layer_bias beside a dense first layer: nothing may be dropped
        raise ValueError(f"unknown key {unused[0]!r} for this {layout} state_dict (unused)")
    if layout == "CELO2MLP":
        _check_config(config, architecture, widths)
    chosen = activation if activation is not None else config.get("activation", "relu")
    if chosen not in ACTIVATIONS:
        raise ValueError(f"Invalid activation: {chosen!r} (one of {ACTIVATIONS})")
    if layout == "Celo2MLP" and chosen != "relu":
        raise ValueError(f"Invalid activation: {chosen!r} (Celo2MLP is always 'relu')")
    if layout == "CELO2MLP" and "activation" in config and config["activation"] != chosen:
        raise ValueError(f"activation {chosen!r} given, config.json says {config['activation']!r}")
    kwargs = {**architecture, "activation": chosen, **kwargs}
    kwargs = json.loads(json.dumps(kwargs))  # tuples as lists: the manifest's form
    transform = Celo2(**kwargs)
    transform.load_state_dict(mapped, strict=True)
    provenance = {"layout": layout, **provenance}
    return Imported(transform, layout, kwargs, dict(ROUTES[layout]), provenance)


def convert_celo2(
    source: Source,
    out_dir: Union[str, "os.PathLike[str]"],
    layout: str = "auto",
    *,
    activation: Optional[str] = None,
    options: Optional[Mapping[str, Any]] = None,
    routes: Optional[Mapping[str, str]] = None,
    backends: Optional[Sequence[str]] = ("torchscript", "onnx"),
    ranks: Sequence[int] = (0, 1, 2),
    lr: float = 1e-3,
    dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
) -> Path:
    """Convert a PyLO Celo2 checkpoint into a compiledopt artifact (see :func:`import_celo2`).

    The artifact's spec is ``{"kind": "shape_agnostic", "name": "celo2", "kwargs": ...}``, its
    routes those of PyLO's optimizer of the layout (:data:`ROUTES`) unless ``routes`` is given,
    its ``training`` block the provenance (layout, file name, sha256). TorchScript serves every
    rank; ONNX and AOTInductor graphs are written for ``ranks``, which must be within 0 to 2
    (above that, which two axes are the largest depends on the sizes: a dynamic graph cannot
    hold it). ``backends`` ``None`` means every registered backend.

    Returns:
        The artifact's path; ``compiledopt verify`` checks it.
    """
    imported = import_celo2(source, layout, activation, options)
    ranks = sorted({int(r) for r in ranks})
    if ranks and ranks[-1] > 2:
        raise ValueError(
            f"Invalid ranks: {ranks} (Celo2 graphs of rank 3 and above cannot have dynamic "
            "sizes; TorchScript, which serves every rank, needs none)"
        )
    spec = {"kind": "shape_agnostic", "name": "celo2", "kwargs": imported.kwargs}
    training = {"source": "PyLO Celo2 weights", **imported.provenance}
    return export_shape_agnostic(
        out_dir,
        spec,
        imported.transform,
        backends=backends,
        ranks=ranks,
        lr=lr,
        dtype=dtype,
        overwrite=overwrite,
        training=training,
        routes=imported.routes if routes is None else routes,
    )
