#!/usr/bin/env bash
# Set up, then run the test suite (needs the offline CIFAR-10 copy: $CLPOISON_TEST_DATA, default
# ../shared/data/cifar10). Caches go to a temporary folder, never beside the data.
. "$(dirname "$0")/_env.sh" test
export CLPOISON_TEST_DATA="${CLPOISON_TEST_DATA:-$CLPOISON_DATA}"
export CLPOISON_CACHE="$(mktemp -d)"
trap 'rm -rf "$CLPOISON_CACHE"' EXIT
cd "$(dirname "$0")/.."
python -m pytest tests "$@"
