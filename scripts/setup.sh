#!/usr/bin/env bash
# Create .venv with the pinned CPU torch and compiledopt (editable) with its dev extras.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -c constraints.txt -e ".[dev]"
