#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite, slow tests included.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] && .venv/bin/python -c "import compiledopt" 2>/dev/null || bash scripts/setup.sh
.venv/bin/python -m pytest "$@"
