# Sourced by scripts/test.sh and scripts/run-node.sh: makes sure $venv holds exactly what
# requirements/test.lock pins (hash-checked, nothing resolved at install time) plus fanout itself, editable.
# The venv is rebuilt when the lock or pyproject.toml changed since it was made, so a machine that ran an
# older checkout tests the same packages as a new one. With latest=1 it instead builds a fresh venv from the
# newest releases pyproject.toml admits (scripts/test.sh --latest), to find drift before users do.
python=${PYTHON:-python3}

ensure_venv() {
  local stamp log
  if [ "${latest:-0}" = 1 ]; then
    stamp="latest $(date +%s)"
  else
    stamp=$(cat requirements/test.lock pyproject.toml | sha256sum | cut -c1-16)
    if [ -x "$venv/bin/python" ] && [ "$(cat "$venv/.fanout-lock" 2>/dev/null)" = "$stamp" ]; then
      return 0
    fi
  fi
  "$python" -m venv --clear "$venv"
  log=$venv/install.log
  # pip is chatty (and a machine's own pip settings may add notes): keep its output for when it fails
  if ! if [ "${latest:-0}" = 1 ]; then
         "$venv/bin/python" -m pip install --upgrade pip &&
           "$venv/bin/python" -m pip install --upgrade --upgrade-strategy eager -e '.[test]'
       else
         "$venv/bin/python" -m pip install --require-hashes --no-deps -r requirements/test.lock &&
           "$venv/bin/python" -m pip install --no-deps --no-build-isolation -e . &&
           "$venv/bin/python" -m pip check
       fi >"$log" 2>&1; then
    cat "$log" >&2
    echo "${0##*/}: installing into $venv failed (log above, also in $log)" >&2
    return 1
  fi
  echo "$stamp" >"$venv/.fanout-lock"
}
