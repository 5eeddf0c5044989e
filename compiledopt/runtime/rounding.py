"""Stochastic rounding of optimizer state to bfloat16.

Keeping an accumulator such as ``v ← 0.999·v + 0.001·g²`` in bfloat16 with round-to-nearest
does not work: each step changes ``v`` by 0.1%, less than half of bfloat16's spacing (2⁻⁷ ≈ 0.8%
relative), so most updates round back to the old value and ``v`` stops following the gradients.
Stochastic rounding rounds up with probability equal to the discarded fraction, so the stored
value equals the exact one in expectation and the accumulator keeps tracking.

The random bits come from a hash of the element index and a seed, not from a generator: the
rounding is a pure function of ``(value, index, seed)``, so it fuses into a compiled graph (no
extra pass, no random-number state), gives identical results on every backend, and a resumed run
(``state_dict``) rounds exactly as an uninterrupted one.
"""

from typing import Optional

import torch
from torch import Tensor

__all__ = ["STATE_DTYPES", "round_state", "stochastic_round_bfloat16"]

#: Storage dtypes a FrozenOptimizer accepts for its state, besides the artifact's own dtype.
STATE_DTYPES = (torch.bfloat16,)

_MASK32 = 0xFFFFFFFF
_MIX = 0x45D9F3B  # an odd 27-bit multiplier of a well-mixing 32-bit integer hash
_GOLDEN = 0x9E3779B1 >> 1  # spreads consecutive seeds apart (31 bits, so products fit int64)


def _hash16(index: Tensor, seed: Tensor) -> Tensor:
    """16 pseudo-random bits per element of ``index`` (int64), from ``seed`` (0-d int64)."""
    h = (index + (seed % 2**31) * _GOLDEN) & _MASK32
    # torch.bitwise_right_shift, not ``>>``: DTensor's ``>>`` with a Python int returns its
    # input unchanged (torch 2.13).
    h = ((torch.bitwise_right_shift(h, 16) ^ h) * _MIX) & _MASK32
    h = ((torch.bitwise_right_shift(h, 16) ^ h) * _MIX) & _MASK32
    h = torch.bitwise_right_shift(h, 16) ^ h
    return h & 0xFFFF


def stochastic_round_bfloat16(x: Tensor, seed: Tensor, sides: Optional[Tensor] = None) -> Tensor:
    """``x`` (float32) rounded to bfloat16, up or down with probabilities that make the result
    unbiased: ``E[result] = x``. Exactly representable values, infinities and NaNs are kept.

    Args:
        x (Tensor): float32 values.
        seed (Tensor): 0-d int64 tensor; equal seeds give equal roundings.
        sides (Tensor, optional): for ``x`` a vector or matrix zero-padded from a smaller one,
            that one's sides (1-d int64): each element then draws the bits of its place in the
            unpadded tensor, so padding changes no rounding.
    """
    if x.dtype != torch.float32:
        raise ValueError(f"stochastic_round_bfloat16 rounds float32 tensors, got {x.dtype}")
    index = torch.arange(x.numel(), dtype=torch.int64, device=x.device).reshape(x.shape)
    if sides is not None and x.dim() == 2:
        rows = torch.arange(x.shape[0], dtype=torch.int64, device=x.device)
        columns = torch.arange(x.shape[1], dtype=torch.int64, device=x.device)
        index = rows.unsqueeze(1) * sides[1] + columns.unsqueeze(0)
    bits = x.view(torch.int32).to(torch.int64)
    # Adding 16 random bits to the magnitude (the low bits of the pattern) and truncating rounds
    # the magnitude up with probability (discarded bits) / 2¹⁶.
    truncated = torch.bitwise_right_shift(bits + _hash16(index, seed), 16)
    rounded = torch.bitwise_left_shift(truncated, 16)
    finite = torch.isfinite(x)
    kept = torch.where(finite, rounded, bits).to(torch.int32).view(torch.float32)
    return kept.to(torch.bfloat16)


def round_state(
    values: list, dtype: torch.dtype, seed: Tensor, sides: Optional[Tensor] = None
) -> list:
    """Each float32 tensor of ``values`` stored as ``dtype`` (bfloat16: stochastically rounded,
    tensor ``k`` with seed ``seed + k``; ``sides``: see :func:`stochastic_round_bfloat16`);
    anything else is returned as it is."""
    if dtype != torch.bfloat16:
        return list(values)
    return [
        stochastic_round_bfloat16(v, seed + k, sides) if v.dtype == torch.float32 else v
        for k, v in enumerate(values)
    ]
