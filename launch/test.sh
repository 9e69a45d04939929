#!/usr/bin/env bash
# The project's test command (README, .ci/run): set up .venv if needed, refuse unformatted or lint-failing
# code (ruff, configured in pyproject.toml), then run the suite on CPU. Extra arguments go to pytest:
#   bash launch/test.sh -m "not slow"     # the fast loop (no subprocess, no end-to-end training)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/launch/setup_env.sh"
cd "$ROOT"
"$PY" -m ruff format --check .
"$PY" -m ruff check .
export PJRT_DEVICE=CPU
exec "$PY" -m pytest -q "$@"  # pytest.ini: testpaths = tests
