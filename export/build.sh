#!/usr/bin/env bash
# Rebuild the shipped general-purpose learned optimizer, export/coordinate-mlp/, end to end:
# meta-train a CoordinateMLP with `compiledopt train` on the mixed task family (regression MLPs,
# CNNs on generated images, MLPs on scikit-learn's digits), export it to every backend for
# parameters of rank 0-5, and verify every backend against the eager reference.
# About 10 minutes on 2 CPU cores (AOTInductor builds one graph per rank).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || bash scripts/setup.sh
CO=".venv/bin/python -m compiledopt"
$CO train --transform coordinate-mlp --family mixed --seed 0 \
    --meta-steps 1500 --unroll 10 --horizon 100 --tasks-per-step 4 --meta-lr 3e-3 \
    --eval-every 250 --eval-tasks 6 --eval-steps 100 --no-progress \
    --output export/coordinate-mlp.checkpoint.pt
$CO export export/coordinate-mlp.checkpoint.pt --output export/coordinate-mlp --overwrite
$CO inspect export/coordinate-mlp
$CO verify export/coordinate-mlp
