"""``python -m benchmarks.learning_quality [options]``: run the learning-quality suite
(``--help``)."""

import sys

from benchmarks.learning_quality.runner import main

if __name__ == "__main__":
    sys.exit(main())
