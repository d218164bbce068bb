#!/usr/bin/env bash
# Set up, then run the test suite (GPU-only and slow tests are skipped on a CPU machine).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
python3 -m pytest -q -m "not slow" "$@"
