#!/usr/bin/env bash
# Re-pins the test environment: requirements/test.lock holds every package scripts/test.sh installs (fanout's
# extras, the test tools, the build backend and pip itself), each with the hashes of all its files on PyPI, for
# every platform and Python fanout supports. Run it when pyproject.toml's dependencies change, or to move the
# pins forward (after `scripts/test.sh --latest` passed), and commit the result.
set -euo pipefail
cd "$(dirname "$0")/.."

uv=${UV:-}
if [ -z "$uv" ]; then
  tools=${TMPDIR:-/tmp}/fanout-lock-tools
  [ -x "$tools/bin/uv" ] || { python3 -m venv "$tools" && "$tools/bin/pip" install --quiet uv; }
  uv=$tools/bin/uv
fi
"$uv" pip compile pyproject.toml requirements/build.in --extra test --generate-hashes --universal \
  --python-version 3.11 --custom-compile-command scripts/lock.sh --quiet -o requirements/test.lock "$@"
echo "requirements/test.lock: $(grep -c '^[a-z0-9].*==' requirements/test.lock) packages pinned"
