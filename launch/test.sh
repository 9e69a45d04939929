#!/usr/bin/env bash
# The project's test command (README, .ci/run): set up .venv if needed, then run the suite on CPU.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/launch/setup_env.sh"
cd "$ROOT"
export PJRT_DEVICE=CPU
exec "$PY" -m pytest -q tests "$@"
