#!/usr/bin/env bash
# The README's first command: set up .venv if needed (same setup as the tests), then run the CPU demo
# (embedded data -> CLIPA pre-train + fine-tune vs baselines -> zero-shot table). Flags go to demo.py.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
for arg in "$@"; do
  if [ "$arg" = "-h" ] || [ "$arg" = "--help" ]; then   # help without installing the environment
    exec python3 -c 'import ast, sys; print(ast.get_docstring(ast.parse(open(sys.argv[1]).read())))' \
      "$ROOT/launch/demo.py"
  fi
done
source "$ROOT/launch/setup_env.sh"
cd "$ROOT"
export PJRT_DEVICE="${PJRT_DEVICE:-CPU}"
exec "$PY" launch/demo.py "$@"
