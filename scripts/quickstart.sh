#!/usr/bin/env bash
# Set up, then run the main job: the whole Contrastive Poisoning story on this machine's CPU
# (clean SimCLR victims, CP-C and CP-S poisons, victims on the poisoned data, random-noise
# control, random-init floor, report; then `clpoison report` draws it in $OUT-report/).
#   scripts/quickstart.sh                  # preset `cpu`: 2 seeds, CP-C and CP-S (50-75 min on 2
#                                          # cores with native bf16; see docs/results.md)
#   PRESET=mini scripts/quickstart.sh      # a smoke run of the pipeline (CP-C and CP-S, 1 seed,
#                                          # ~11 min, no effect)
# Extra arguments go to `clpoison story` (e.g. --seeds 0,1 --attacks cp-c,cp-s).
. "$(dirname "$0")/_env.sh" test
PRESET="${PRESET:-cpu}"
OUT="${OUT:-runs/story-$PRESET}"
download=()
[ -e "$CLPOISON_DATA/cifar10_jpeg.tar.gz" ] || [ -e "$CLPOISON_DATA/cifar-10-python.tar.gz" ] || \
  [ -d "$CLPOISON_DATA/cifar-10-batches-py" ] || download=(--download)
echo "clpoison story, preset $PRESET -> $OUT (data: $CLPOISON_DATA); rerun to resume." >&2
args=("$@")
# the cpu protocol is two seeds of CP-C and CP-S, the mini smoke run one seed of both, unless told
# otherwise
if [ $# -eq 0 ]; then
  case "$PRESET" in
    cpu) args=(--seeds 0,1 --attacks cp-c,cp-s) ;;
    mini) args=(--seeds 0 --attacks cp-c,cp-s) ;;
  esac
fi
clpoison story --preset "$PRESET" --out "$OUT" "${download[@]}" "${args[@]}"
# the same results as one page of tables and figures (bar chart, loss curves, poison pictures,
# the paper's numbers beside ours)
clpoison report "$OUT" --out "$OUT-report"
