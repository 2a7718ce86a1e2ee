# shellcheck shell=bash
# Sourced by scripts/test.sh: a PostgreSQL for the outbox tests when none listens on the tests' port.
# start_postgres PORT: installs Debian's postgresql when it is missing, then makes a throw-away cluster
# (initdb with trust auth for local connections, nothing shared with a system cluster) in
# ${FANOUT_TEST_PGDATA:-/var/tmp/fanout-postgres-PORT}, starts it on 127.0.0.1:PORT and creates the
# database `test` (the default FANOUT_TEST_DSN: postgresql://postgres@127.0.0.1:5432/test). It keeps running
# after the tests, like the Redis and RabbitMQ that test.sh starts; its pid is in the data folder's
# postmaster.pid.
start_postgres() {
  local port=$1 data bin
  data=${FANOUT_TEST_PGDATA:-/var/tmp/fanout-postgres-$port}
  bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
  if [ -z "$bin" ]; then
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
    bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
  fi
  # initdb and postgres refuse to run as root: as the postgres user when we are root
  if [ "$(id -u)" = 0 ]; then run() { runuser -u postgres -- "$@"; }; else run() { "$@"; }; fi
  if [ ! -f "$data/PG_VERSION" ]; then
    mkdir -p "$data"
    [ "$(id -u)" = 0 ] && chown postgres: "$data"
    run "$bin/initdb" -D "$data" -U postgres -A trust -E UTF8 >"$data.initdb.log" 2>&1 ||
      { cat "$data.initdb.log" >&2; return 1; }
  fi
  if ! run "$bin/pg_ctl" -D "$data" status >/dev/null 2>&1; then
    run "$bin/pg_ctl" -D "$data" -l "$data/server.log" -w \
      -o "-c listen_addresses=127.0.0.1 -p $port -k $data -c fsync=off" start >/dev/null ||
      { cat "$data/server.log" >&2; return 1; }
  fi
  run "$bin/psql" -h 127.0.0.1 -p "$port" -U postgres -d postgres -tAc \
    "SELECT 1 FROM pg_database WHERE datname = 'test'" | grep -q 1 ||
    run "$bin/createdb" -h 127.0.0.1 -p "$port" -U postgres test
}
