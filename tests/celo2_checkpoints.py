"""Celo2 checkpoints in PyLO's ``state_dict`` layouts, random weights built here (nothing is
downloaded): shared by tests/test_celo2.py and tests/test_celo2_integrations.py."""

import math
from typing import Dict

import torch
from torch import Tensor

WIDTHS = [1, 1, 1, 3, 1, 3, 1, 3, 1, 3, 3, 3, 3, 3]  # PyLO's 14 feature groups


def old_checkpoint(dense: bool = False, hidden: int = 8, seed: int = 0) -> Dict[str, Tensor]:
    """A ``Celo2MLP`` state_dict (per feature group, or the later dense first layer)."""
    gen = torch.Generator().manual_seed(seed)
    scale = 1 / math.sqrt(sum(WIDTHS))
    sd = {f"first_layer_weights.{i}": torch.randn(hidden, w, generator=gen) * scale
          for i, w in enumerate(WIDTHS)}  # fmt: skip
    sd["first_layer_bias"] = torch.randn(hidden, generator=gen) * 0.1
    if dense:
        parts = [sd.pop(f"first_layer_weights.{i}") for i in range(len(WIDTHS))]
        sd = {
            "first_layer.weight": torch.cat(parts, 1),
            "first_layer.bias": sd.pop("first_layer_bias"),
        }
    sd["hidden.weight"] = torch.randn(hidden, hidden, generator=gen) / math.sqrt(hidden)
    sd["hidden.bias"] = torch.randn(hidden, generator=gen) * 0.1
    sd["output.weight"] = torch.randn(3, hidden, generator=gen) / math.sqrt(hidden)
    sd["output.bias"] = torch.randn(3, generator=gen) * 0.1
    return sd


def new_checkpoint(hidden: int = 8, layers: int = 2, seed: int = 1) -> Dict[str, Tensor]:
    """A ``CELO2MLP`` state_dict: ``w0.i`` (in, out), ``dense_w.j`` (in, out)."""
    gen = torch.Generator().manual_seed(seed)
    scale = 1 / math.sqrt(sum(WIDTHS))
    sd = {f"w0.{i}": torch.randn(w, hidden, generator=gen) * scale for i, w in enumerate(WIDTHS)}
    sd["b0"] = torch.randn(hidden, generator=gen) * 0.1
    for j in range(layers):
        width = 3 if j == layers - 1 else hidden
        sd[f"dense_w.{j}"] = torch.randn(hidden, width, generator=gen) / math.sqrt(hidden)
        sd[f"dense_b.{j}"] = torch.randn(width, generator=gen) * 0.1
    return sd
