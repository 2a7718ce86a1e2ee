# shellcheck shell=bash disable=SC2154  # ($venv: set by the script that sources this file)
# Sourced by scripts/test.sh and scripts/run-node.sh: makes sure $venv holds exactly what
# requirements/test.lock pins (hash-checked, nothing resolved at install time) plus fanout itself, editable.
# The venv is rebuilt when the lock or pyproject.toml changed since it was made, so a machine that ran an
# older checkout tests the same packages as a new one. Two other flavours check what pyproject.toml admits, in a
# fresh venv each time: flavour=latest takes the newest releases (scripts/test.sh --latest), to find drift before
# users do; flavour=lowest takes the lock, then the oldest release each runtime dependency admits (its `>=`).
python=${PYTHON:-python3}
flavour=${flavour:-locked}  # (scripts/run-node.sh sets none, and runs with `set -u`)

ensure_venv() {
  local stamp log
  if [ "$flavour" != locked ]; then
    stamp="$flavour $(date +%s)"
  else
    stamp=$(cat requirements/test.lock pyproject.toml | sha256sum | cut -c1-16)
    if [ -x "$venv/bin/python" ] && [ "$(cat "$venv/.fanout-lock" 2>/dev/null)" = "$stamp" ]; then
      return 0
    fi
  fi
  "$python" -m venv --clear "$venv"
  log=$venv/install.log
  # pip is chatty (and a machine's own pip settings may add notes): keep its output for when it fails
  if ! case $flavour in
         latest)
           "$venv/bin/python" -m pip install --upgrade pip &&
             "$venv/bin/python" -m pip install --upgrade --upgrade-strategy eager -e '.[test]' ;;
         *)
           "$venv/bin/python" -m pip install --require-hashes --no-deps -r requirements/test.lock &&
             "$venv/bin/python" -m pip install --no-deps --no-build-isolation -e . &&
             if [ "$flavour" = lowest ]; then
               # shellcheck disable=SC2046  # one argument per floor
               "$venv/bin/python" -m pip install $("$venv/bin/python" scripts/floors.py)
             fi &&
             "$venv/bin/python" -m pip check ;;
       esac >"$log" 2>&1; then
    cat "$log" >&2
    echo "${0##*/}: installing into $venv failed (log above, also in $log)" >&2
    return 1
  fi
  echo "$stamp" >"$venv/.fanout-lock"
}
