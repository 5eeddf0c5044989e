#!/usr/bin/env bash
# The checks that need a CUDA device, as one command: the tests marked `gpu`, then the GPU
# section of the production targets (ResNet-18 and the 16.8M-parameter case, each backend
# against fused AdamW, the card's name recorded). Logs and results go to $OUT (default
# runs/gpu_check): tests.log, targets.log and targets/targets.{json,md,png}.
#
#   bash scripts/gpu_check.sh            # minutes: the compiled rules build their kernels first
#   PYTHON=.venv/bin/python bash scripts/gpu_check.sh
#
# It runs the checkout in place (PYTHONPATH), with whatever torch the interpreter holds: a GPU
# machine's image may carry another torch than the pinned one (torch 2.11 on the lent machines,
# whose differences from the pinned torch tests/test_torch_versions.py covers); the logs name it.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-runs/gpu_check}
python=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

if ! "$python" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check: $python sees no CUDA device (torch.cuda.is_available() is False)" >&2
    exit 2
fi
"$python" -c 'import torch; print("torch", torch.__version__, "on", torch.cuda.get_device_name())' |
    tee "$out/tests.log"

status=0
"$python" -m pytest -q -p no:cacheprovider -m gpu tests 2>&1 | tee -a "$out/tests.log" || status=1
"$python" -m benchmarks.step_speed.targets --gpu-only --backends eager compiled auto \
    --reps 20 --warmup 5 --out "$out/targets" 2>&1 | tee "$out/targets.log" || status=1
exit $status
