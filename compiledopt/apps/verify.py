"""Every backend of an artifact against the eager reference rebuilt from its weights: what
``compiledopt verify`` runs (:func:`compiledopt.export.verify.verify_artifact`), with its table.

Graphs that are code are run only from a trusted artifact (``trust_code``, a signature by one of
``trusted_keys``, or a packaged optimizer); the others are listed as not run, and an artifact of
which no backend could run fails: nothing was verified. A backend whose directions (or the
reference's) are not finite fails whatever the tolerance; a bound artifact too large to replay
is refused before anything is allocated.
"""

import math
from typing import IO, Optional, Sequence

from compiledopt.apps.trust import open_trusted

__all__ = ["run_verify"]


def run_verify(
    artifact: str,
    steps: int = 10,
    seed: int = 0,
    tolerance: float = 1e-5,
    trust_code: bool = False,
    trusted_keys: Optional[Sequence[str]] = None,
    out: Optional[IO[str]] = None,
) -> bool:
    """Replay ``steps`` steps of random gradients (drawn from ``seed``), state carried, through
    every backend of ``artifact`` (a directory or a packaged name) and the reference; print
    each backend's largest relative error to ``out``. Returns whether at least one backend ran
    and every one that ran is finite and within ``tolerance``."""
    from compiledopt.export.verify import check_probe_size, verify_artifact

    opened = open_trusted(artifact, trust_code, trusted_keys)
    check_probe_size(opened)
    skipped = [b for b in opened.backends if not opened.may_load(b)]
    errors = verify_artifact(opened, steps=steps, seed=seed)
    print(f"{artifact}: {steps} steps with state carried, vs the eager reference", file=out)
    print(f"  {'backend':<12} {'max rel error':>14}  result", file=out)
    failed = False
    for backend, error in errors.items():
        ok = math.isfinite(error) and error <= tolerance
        failed |= not ok
        result = "ok" if ok else "FAIL"
        if not math.isfinite(error):
            result += ": non-finite directions (NaN or inf, from it or from the reference)"
        print(f"  {backend:<12} {error:>14.3g}  {result}", file=out)
    for backend in skipped:
        note = "not run: code, from an artifact not trusted (--trust-code, --trusted-key)"
        print(f"  {backend:<12} {'-':>14}  {note}", file=out)
    if not errors:
        print("  no backend was verified: nothing here runs without trusting code", file=out)
    return bool(errors) and not failed
