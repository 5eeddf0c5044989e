#!/usr/bin/env bash
# Rebuild the shipped general-purpose learned optimizer, export/coordinate-mlp/, end to end:
# meta-train a CoordinateMLP with `compiledopt train` on the regression task family (MLPs fitting
# random teacher networks; the fastest family to meta-train on 2 CPU cores), export it to every
# backend for parameters of rank 0-5, and verify every backend against the eager reference.
# About 5 minutes on 2 idle CPU cores (AOTInductor builds one graph per rank).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || bash scripts/setup.sh
CO=".venv/bin/python -m compiledopt"
$CO train --transform coordinate-mlp --family regression --seed 0 \
    --meta-steps 1000 --unroll 10 --horizon 100 --tasks-per-step 4 --meta-lr 3e-3 \
    --eval-every 250 --eval-tasks 6 --eval-steps 100 \
    --output export/coordinate-mlp.checkpoint.pt
$CO export export/coordinate-mlp.checkpoint.pt --output export/coordinate-mlp --overwrite
$CO inspect export/coordinate-mlp
$CO verify export/coordinate-mlp
