"""The metrics, as pure functions of numbers: divergence, normalisation, speed-up, IQM.

* A run **diverges** when a loss becomes non-finite or exceeds :data:`DIVERGENCE_FACTOR` times
  the initial loss; for aggregates its final loss is the initial loss (:func:`counted_final`).
* The **normalised final loss** of a learned optimizer on a task is its final validation loss over
  tuned AdamW's (:func:`normalized`): below 1 the learned optimizer ends lower.
* The **speed-up** is tuned AdamW's steps to reach its own final validation loss over the learned
  optimizer's steps to reach that same loss (:func:`speedup`): 0 when the learned optimizer never
  reaches it, ``inf`` when it starts there and AdamW does not.
* The **IQM** is the interquartile mean (:func:`iqm`): the mean of the values left after cutting
  ``floor(n / 4)`` from each end of the sorted list, as ``scipy.stats.trim_mean(x, 0.25)`` and
  rliable compute it.
"""

import math
from typing import Dict, Iterable, Optional, Sequence

#: A loss above this multiple of the initial loss counts as divergence.
DIVERGENCE_FACTOR = 10.0
#: Relative tolerance of "ties": ``a <= b * (1 + TIE_TOLERANCE)``.
TIE_TOLERANCE = 1e-3


def is_diverged(loss: float, initial: float, factor: float = DIVERGENCE_FACTOR) -> bool:
    """Whether ``loss`` marks a diverged run: non-finite, or above ``factor × initial``."""
    if not math.isfinite(loss) or not math.isfinite(initial):
        return True
    return loss > factor * initial


def counted_final(final: float, initial: float, diverged: bool) -> float:
    """The final loss a run counts with in aggregates: the initial loss if it diverged."""
    return initial if diverged or not math.isfinite(final) else final


def normalized(learned: float, baseline: float) -> float:
    """``learned / baseline`` (both losses ≥ 0); a zero baseline gives 1 for a zero ``learned``
    and ``inf`` otherwise."""
    if baseline == 0.0:
        return 1.0 if learned == 0.0 else math.inf
    return learned / baseline


def steps_to_reach(steps: Sequence[int], losses: Sequence[float], target: float) -> Optional[int]:
    """The first of ``steps`` whose loss is at most ``target`` (``None``: never)."""
    for step, loss in zip(steps, losses):
        if math.isfinite(loss) and loss <= target:
            return int(step)
    return None


def speedup(baseline_steps: Optional[int], learned_steps: Optional[int]) -> float:
    """``baseline_steps / learned_steps``: how many times fewer steps the learned optimizer needs
    to reach the baseline's final loss.

    0 when the learned optimizer never reaches it (``learned_steps is None``); ``nan`` when the
    baseline never does; at step 0 (the loss already at the target) 1 if both start there and
    ``inf`` if only the learned optimizer's count is 0.
    """
    if learned_steps is None:
        return 0.0
    if baseline_steps is None:
        return math.nan
    if learned_steps == 0:
        return 1.0 if baseline_steps == 0 else math.inf
    return baseline_steps / learned_steps


def iqm(values: Iterable[float]) -> float:
    """Interquartile mean: the mean of the sorted values without ``floor(n / 4)`` at each end
    (``nan`` values are left out; ``nan`` for none). ``inf`` among the middle half gives
    ``inf``."""
    ordered = sorted(v for v in values if not math.isnan(v))
    if not ordered:
        return math.nan
    cut = len(ordered) // 4
    middle = ordered[cut : len(ordered) - cut]
    return sum(middle) / len(middle)


def geomean(values: Iterable[float]) -> float:
    """Geometric mean of non-negative values (``nan`` left out; 0 if any is 0, ``inf`` if any is
    ``inf``; ``nan`` for none)."""
    kept = [v for v in values if not math.isnan(v)]
    if not kept:
        return math.nan
    if any(v == 0.0 for v in kept):
        return 0.0
    if any(math.isinf(v) for v in kept):
        return math.inf
    return math.exp(math.fsum(math.log(v) for v in kept) / len(kept))


def mean(values: Iterable[float]) -> float:
    kept = list(values)
    return math.fsum(kept) / len(kept) if kept else math.nan


def beats(a: float, b: float) -> bool:
    """Whether loss ``a`` is strictly below loss ``b``."""
    return a < b


def beats_or_ties(a: float, b: float, tolerance: float = TIE_TOLERANCE) -> bool:
    """Whether loss ``a`` is at most ``b`` within a relative ``tolerance``."""
    return a <= b * (1.0 + tolerance)


def best_lr(finals: Dict[float, Sequence[float]]) -> float:
    """The learning rate with the lowest mean final loss (over seeds); the smaller lr on a tie.

    Args:
        finals: lr -> the counted final losses (:func:`counted_final`) of its runs, one per seed.
    """
    if not finals:
        raise ValueError("no learning rates to choose from")
    return min(sorted(finals), key=lambda lr: mean(finals[lr]))


def fraction(flags: Iterable[bool]) -> float:
    """The fraction of true flags (``nan`` for none)."""
    values = list(flags)
    return sum(values) / len(values) if values else math.nan
