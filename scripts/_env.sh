# Shared set-up for the two quick-start scripts: a virtual environment with clpoison installed,
# and data/cache locations. Sourced, not run.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${CLPOISON_VENV:-$ROOT/.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
stamp="$VENV/.clpoison-installed-$1"
if [ ! -f "$stamp" ] || [ "$ROOT/pyproject.toml" -nt "$stamp" ]; then
  # torch 2.13.0 first: on machines with a local CPU wheel pip takes it from there; elsewhere PyPI.
  python -m pip install -q "torch==2.13.0" 2>/dev/null || python -m pip install -q torch
  python -m pip install -q -e "$ROOT[$1]"
  touch "$stamp"
fi
# Data: $CLPOISON_DATA if set; else the offline CIFAR-10 copy beside the project; else ./data.
if [ -z "${CLPOISON_DATA:-}" ]; then
  if [ -d "$ROOT/../shared/data/cifar10" ]; then
    export CLPOISON_DATA="$(cd "$ROOT/../shared/data/cifar10" && pwd)"
  else
    export CLPOISON_DATA="$ROOT/data"
  fi
fi
export CLPOISON_CACHE="${CLPOISON_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/clpoison}"
