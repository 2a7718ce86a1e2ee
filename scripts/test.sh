#!/usr/bin/env bash
# Runs the whole test suite on a fresh machine: makes .venv from requirements/test.lock (exact versions,
# hash-checked; rebuilt when the lock changes), installs the system tools the tests use, starts Redis
# (127.0.0.1:6379), RabbitMQ (127.0.0.1:5672) and PostgreSQL (127.0.0.1:5432, database test; unless
# FANOUT_TEST_DSN names another) if they are not running, then runs ruff, mypy --strict and pytest. Extra
# arguments go to pytest (e.g. scripts/test.sh -k redis).
#   scripts/test.sh --latest [pytest args]   the same in a fresh .venv-latest with the newest releases that
#                                            pyproject.toml admits instead of the lock (finds drift early)
#   scripts/test.sh --lowest [pytest args]   the same in a fresh .venv-lowest with the oldest release of each
#                                            runtime dependency pyproject.toml admits (checks the floors)
set -euo pipefail
cd "$(dirname "$0")/.."

flavour=locked
venv=.venv
case ${1:-} in
  --latest | --lowest)
    flavour=${1#--}
    venv=.venv-$flavour
    shift ;;
esac
. scripts/venv.sh
ensure_venv

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
wait_port() {
  for _ in $(seq 1 120); do port_open "$1" && return 0; sleep 0.5; done
  echo "scripts/test.sh: nothing listens on 127.0.0.1:$1 after 60 s" >&2
  return 1
}

# System tools the tests use, installed from Debian's packages when missing: redis-server/redis-cli
# (throw-away servers and a local cluster), RabbitMQ, docker-compose (validates docker-compose.yml, no
# engine needed), chromium (the demo page in a real browser), php-cli with curl (the PHP example of the
# HTTP API), podman with runc and debootstrap (tests/test_containers.py builds and runs the images) and
# openssl (a certificate for the Redis TLS test).
missing=()
command -v redis-server >/dev/null && command -v redis-cli >/dev/null || missing+=(redis-server redis-tools)
command -v rabbitmq-server >/dev/null || missing+=(rabbitmq-server)
command -v docker-compose >/dev/null || missing+=(docker-compose)
command -v chromium >/dev/null || missing+=(chromium)
{ command -v php >/dev/null && php -m | grep -qx curl; } || missing+=(php-cli php-curl)
command -v podman >/dev/null && command -v runc >/dev/null && command -v debootstrap >/dev/null ||
  missing+=(podman runc debootstrap)
command -v openssl >/dev/null || missing+=(openssl)
if [ ${#missing[@]} -gt 0 ]; then
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
if ! port_open 6379; then
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no
fi
if ! port_open 5672; then
  as_root rabbitmq-server -detached
fi
if [ -z "${FANOUT_TEST_DSN:-}" ] && ! port_open 5432; then
  . scripts/postgres.sh  # the outbox tests' PostgreSQL: a throw-away cluster on 127.0.0.1:5432
  start_postgres 5432
fi
wait_port 6379
wait_port 5672
as_root rabbitmqctl await_startup >/dev/null

"$venv/bin/ruff" check .
"$venv/bin/ruff" format --check .
"$venv/bin/mypy"
"$venv/bin/pytest" "$@"
