#!/usr/bin/env bash
# Runs one fanout node on the embedded memory backend with the demo chat at http://127.0.0.1:8765/
# (installing fanout into .venv first if needed: requirements/test.lock's pins, as scripts/test.sh does).
# FANOUT_* variables in the environment apply.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.venv
. scripts/venv.sh
ensure_venv
# presence in the demo chat's lobby (the page shows who is online) unless set otherwise
export FANOUT_PRESENCE=${FANOUT_PRESENCE-lobby}
# and history for it: a page that reconnects (it asks for fanout.v1) gets what was said meanwhile
export FANOUT_HISTORY=${FANOUT_HISTORY-group:lobby}
exec .venv/bin/fanout-node "$@"
