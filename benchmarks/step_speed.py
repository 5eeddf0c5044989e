"""Step speed of frozen learned optimizers per backend, against AdamW, with a roofline.

Runs :func:`compiledopt.bench.main` (the same as ``compiledopt bench``); results go to
``benchmarks/results/`` (``benchmarks/results/quick/`` with ``--quick``) unless ``--out`` is given.

    python benchmarks/step_speed.py            # full run (~40 min on 2 cores; compiles dominate)
    python benchmarks/step_speed.py --quick    # ~1 min with a warm Inductor cache
"""

import sys
from pathlib import Path

from compiledopt.bench import main

if __name__ == "__main__":
    argv = sys.argv[1:]
    if "--out" not in argv and not any(a.startswith("--out=") for a in argv):
        results = Path(__file__).resolve().parent / "results"
        argv += ["--out", str(results / "quick" if "--quick" in argv else results)]
    main(argv)
