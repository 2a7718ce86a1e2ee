#!/usr/bin/env bash
# The HTTP API from a shell: push to a group, then read how many are in it.
#   FANOUT_API_URL=http://127.0.0.1:8765 FANOUT_API_KEY=... examples/http/curl.sh
set -euo pipefail
api=${FANOUT_API_URL:-http://127.0.0.1:8765}
auth="Authorization: Bearer ${FANOUT_API_KEY:?set FANOUT_API_KEY}"

# data as JSON: a string is sent as a text frame, anything else as JSON text
curl -sS --fail-with-body -X POST -H "$auth" -H 'Content-Type: application/json' \
  -d '{"groups": "lobby", "data": {"text": "hello from curl"}}' "$api/api/send_to_group"
echo
# binary: data_b64
curl -sS --fail-with-body -X POST -H "$auth" -d "{\"groups\": \"lobby\", \"data_b64\": \"$(printf '\x00\x01' | base64)\"}" \
  "$api/api/send_to_group"
echo
curl -sS --fail-with-body -X POST -H "$auth" -d '{"group": "lobby"}' "$api/api/get_group_count"
echo
