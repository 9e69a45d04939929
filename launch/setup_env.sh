#!/usr/bin/env bash
# Create (or reuse) .venv with the pinned runtime + test packages. Idempotent: reinstalls only
# when requirements*.txt changed. Source-able: leaves $PY pointing at the venv's python.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${CLIPA_VENV:-$ROOT/.venv}"
STAMP="$VENV/.clipa-requirements.sha256"
WANT="$(cat "$ROOT/requirements.txt" "$ROOT/requirements-test.txt" | sha256sum | cut -d' ' -f1)"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV (first run: ~5 min, ~9 GB: torch, torch_xla, tensorflow)" >&2
  python3 -m venv "$VENV"
fi
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
  echo "[setup] installing requirements into $VENV" >&2
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -r "$ROOT/requirements-test.txt"
  echo "$WANT" > "$STAMP"
fi
PY="$VENV/bin/python"
export PY
