#!/usr/bin/env bash
# Set up, then check this device for the `paper` preset (a few minutes on a GPU): every verb a few
# steps at width 64, the step benchmark as ratios to a plain step with the host synchronisations
# inside steps, peak memory, and the projected wall time of the paper runs; writes
# runs/gpu-check/gpu_check.{json,md}.
#   scripts/gpu_check.sh              # on a GPU
#   scripts/gpu_check.sh --quick      # small sizes, on a CPU (CI runs this)
. "$(dirname "$0")/_env.sh" test
cd "$(dirname "$0")/.."
exec python bench/gpu_check.py "$@"
