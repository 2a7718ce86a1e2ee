#!/usr/bin/env bash
# Runs one fanout node on the embedded memory backend with the demo chat at http://127.0.0.1:8765/
# (installing fanout into .venv first if needed). FANOUT_* variables in the environment apply.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/fanout-node ]; then
  "${PYTHON:-python3}" -m venv .venv
  # pip's build backend is chatty: keep its output for when it fails
  if ! { .venv/bin/python -m pip install --quiet --upgrade pip &&
         .venv/bin/python -m pip install --quiet -e '.[all]'; } >.venv/install.log 2>&1; then
    cat .venv/install.log >&2
    exit 1
  fi
fi
# presence in the demo chat's lobby (the page shows who is online) unless set otherwise
export FANOUT_PRESENCE=${FANOUT_PRESENCE-lobby}
exec .venv/bin/fanout-node "$@"
