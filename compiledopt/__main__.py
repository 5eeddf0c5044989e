"""``python -m compiledopt``: the command line (see :mod:`compiledopt.cli`)."""

import sys

from compiledopt.cli import main

if __name__ == "__main__":
    sys.exit(main())
