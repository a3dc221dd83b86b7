#!/usr/bin/env bash
# A throwaway PostgreSQL cluster on a loopback port, for the tests and the benchmarks.
# Idempotent: installs Debian's postgresql when missing (needs root), initialises the cluster once,
# starts it when it is not running, creates the database, and prints its SQLAlchemy URL on stdout:
#     postgresql+psycopg://postgres@127.0.0.1:55432/sly
# Settings (environment):
#   SLY_PG_PORT   loopback port (default 55432)
#   SLY_PG_DIR    cluster directory (default /tmp/sly-ci-pg-$SLY_PG_PORT); `rm -rf` it to start over
#   SLY_PG_DB     database to create (default sly)
#   SLY_PG_FAST=1 run without fsync (tests: nothing in a throwaway cluster needs to survive a power loss)
# Stop it with: runuser -u postgres -- pg_ctl -D "$SLY_PG_DIR" stop   (pg_ctl from the PostgreSQL bin dir)
set -euo pipefail
PORT=${SLY_PG_PORT:-55432}
DIR=${SLY_PG_DIR:-/tmp/sly-ci-pg-$PORT}
DB=${SLY_PG_DB:-sly}

log() { echo "pg-up: $*" >&2; }

pg_bin() {  # the newest installed server's bin dir
  local d
  d=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
  [ -n "$d" ] && [ -x "$d/initdb" ] && echo "$d"
}

BIN=$(pg_bin || true)
if [ -z "$BIN" ]; then
  [ "$(id -u)" = 0 ] || { log "PostgreSQL is not installed; run as root to let me install Debian's postgresql"; exit 1; }
  log "installing Debian's postgresql"
  apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql >/dev/null
  BIN=$(pg_bin) || { log "postgresql installed but no initdb found under /usr/lib/postgresql"; exit 1; }
fi

as_pg() {  # the server refuses to run as root
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

if [ ! -f "$DIR/PG_VERSION" ]; then
  log "initdb $DIR"
  mkdir -p "$DIR"
  [ "$(id -u)" = 0 ] && chown postgres:postgres "$DIR"
  chmod 700 "$DIR"
  as_pg "$BIN/initdb" -D "$DIR" -A trust -U postgres -E UTF8 --locale=C.UTF-8 >/dev/null
fi

if ! as_pg "$BIN/pg_ctl" -D "$DIR" status >/dev/null 2>&1; then
  opts="-p $PORT -k $DIR -h 127.0.0.1 -c max_connections=300"
  [ "${SLY_PG_FAST:-0}" = 1 ] && opts="$opts -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
  log "starting on 127.0.0.1:$PORT"
  as_pg "$BIN/pg_ctl" -D "$DIR" -o "$opts" -l "$DIR/server.log" -w -t 60 start >/dev/null \
    || { tail -n 20 "$DIR/server.log" >&2; exit 1; }
fi

psql=("$BIN/psql" -h 127.0.0.1 -p "$PORT" -U postgres -d postgres -v ON_ERROR_STOP=1 -qtA)
if [ "$("${psql[@]}" -c "SELECT 1 FROM pg_database WHERE datname = '$DB'")" != 1 ]; then
  "${psql[@]}" -c "CREATE DATABASE \"$DB\"" >/dev/null
fi
echo "postgresql+psycopg://postgres@127.0.0.1:$PORT/$DB"
