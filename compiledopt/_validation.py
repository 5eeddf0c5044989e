"""Argument checks shared by the public constructors."""

import math
import numbers


def check_lr(lr: object, owner: str) -> float:
    """Return ``lr`` as a float, or raise ``ValueError`` unless it is a finite number > 0."""
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real):
        raise ValueError(f"Invalid lr: {lr!r} ({owner} needs a positive finite number)")
    value = float(lr)
    if not (math.isfinite(value) and value > 0.0):
        raise ValueError(f"Invalid lr: {lr!r} ({owner} needs a positive finite number)")
    return value
