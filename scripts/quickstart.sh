#!/usr/bin/env bash
# Set up, then run the main job: the whole Contrastive Poisoning story on this machine's CPU
# (clean SimCLR victim, CP-C poison, victim on the poisoned data, report).
#   scripts/quickstart.sh                  # preset `mini` (a smoke run of minutes)
#   PRESET=cpu scripts/quickstart.sh       # the CPU protocol: 2 seeds, CP-C and CP-S (~60 min;
#                                          # a small, seed-dependent CP-S effect, see README)
# Extra arguments go to `clpoison story` (e.g. --seeds 0,1 --attacks cp-c,cp-s).
. "$(dirname "$0")/_env.sh" test
PRESET="${PRESET:-mini}"
OUT="${OUT:-runs/story-$PRESET}"
download=()
[ -e "$CLPOISON_DATA/cifar10_jpeg.tar.gz" ] || [ -e "$CLPOISON_DATA/cifar-10-python.tar.gz" ] || \
  [ -d "$CLPOISON_DATA/cifar-10-batches-py" ] || download=(--download)
echo "clpoison story, preset $PRESET -> $OUT (data: $CLPOISON_DATA); rerun to resume." >&2
args=("$@")
# the cpu protocol is two seeds of CP-C and CP-S unless told otherwise
[ "$PRESET" = cpu ] && [ $# -eq 0 ] && args=(--seeds 0,1 --attacks cp-c,cp-s)
exec clpoison story --preset "$PRESET" --out "$OUT" "${download[@]}" "${args[@]}"
