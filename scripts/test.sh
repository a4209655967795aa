#!/usr/bin/env bash
# Sets up the environment (scripts/setup_env.sh) and runs the whole test suite on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 PATH="$PWD/.venv/bin:$PATH"
exec .venv/bin/python -m pytest tests -q -p no:cacheprovider --timeout=600 --durations=15 "$@"
